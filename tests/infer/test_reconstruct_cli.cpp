// mae-reconstruct as a user runs it: a bounded --overlap, and a progress line on stderr when a
// reconstruction runs many windows.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "../core/run_binary.h"
#include "helpers.h"
#include "io/io.h"

namespace mae {
namespace {

#ifdef MAE_RECONSTRUCT_BIN
TEST(ReconstructCli, BoundsTheOverlapAndShowsProgressOnManyWindows) {
  const test::TempDir dir("mae3d_reconstruct_cli");
  const std::string volume = dir / "volume.nii.gz";
  write_volume(test::synthetic_volume(18, 24, 20), volume);
  const std::string run = test::train_tiny(volume, dir.path.string());
  const std::string big = dir / "big.nii.gz";
  write_volume(test::synthetic_volume(40, 40, 40, 9), big);

  auto r = test::run_binary(MAE_RECONSTRUCT_BIN,
                            {"--checkpoint", run, "--input", big, "--out", dir / "out", "--overlap", "0.999"},
                            dir.path.string());
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("--overlap: 0.999 is out of range; allowed: 0 .. 0.75"), std::string::npos) << r.err;

  // 40³ with 16³ windows at overlap 0.75: stride 4, 7 windows per axis, 343 in all.
  r = test::run_binary(
      MAE_RECONSTRUCT_BIN,
      {"--checkpoint", run, "--input", big, "--out", dir / "out", "--overlap", "0.75", "--threads", "1"},
      dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("343 windows"), std::string::npos) << r.out;
  const auto lines = test::lines_of(r.err);
  const auto progress = std::count_if(lines.begin(), lines.end(),
                                      [](const std::string& l) { return l.rfind("mae-reconstruct: window ", 0) == 0; });
  EXPECT_GE(progress, 2) << r.err;
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << "not a terminal: plain lines";
  EXPECT_NE(r.err.find("mae-reconstruct: window 343/343 (100%)"), std::string::npos) << r.err;

  // A few windows: no progress line.
  r = test::run_binary(MAE_RECONSTRUCT_BIN, {"--checkpoint", run, "--input", volume, "--out", dir / "out2"},
                       dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err.find("mae-reconstruct: window"), std::string::npos) << r.err;
}
#endif

}  // namespace
}  // namespace mae
