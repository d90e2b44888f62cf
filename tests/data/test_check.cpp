// The pre-flight check beyond reading: constant volumes, identical voxels under two names, paths
// with control characters, link loops, and the summary that counts refusals by cause.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "data/check.h"
#include "helpers.h"
#include "io/io.h"

namespace mae {
namespace {

namespace fs = std::filesystem;
using test::make_volume;
using test::TempDir;

struct CheckTest : ::testing::Test {
  TempDir dir;
  DataConfig config;
  void SetUp() override {
    config.cache_dir = dir / "cache";
    config.orientation = "RAS";
  }
  /// Writes a volume of (1, 6, 7, 8) voxels in [lo, hi) (a constant when lo == hi) and returns its entry.
  DatasetEntry volume(const std::string& name, double lo, double hi, uint64_t seed = 1) {
    Volume v = make_volume(1, 6, 7, 8, lo, hi, {1.0, 1.0, 1.0}, seed);
    if (lo == hi) v.data.fill_(lo);
    write_volume(v, dir / name);
    return {{dir / name}, ""};
  }
};

TEST_F(CheckTest, ConstantVolumesAreRefusedWithTheirCause) {
  const std::vector<DatasetEntry> entries = {volume("good.nii.gz", 0, 100), volume("zeros.nii.gz", 0, 0),
                                             volume("sevens.nii", 7, 7), volume("bright.nii.gz", 1000, 2000, 2)};
  config.intensity.mode = "ct_window";  // -175 .. 250 HU: "bright" becomes 1 everywhere
  const CheckReport r = check_data(entries, config, 2);
  ASSERT_EQ(r.volumes.size(), 4u);
  EXPECT_TRUE(r.volumes[0].ok) << r.volumes[0].failure();
  for (size_t i = 1; i < 4; ++i) {
    EXPECT_FALSE(r.volumes[i].ok) << entries[i].name();
    EXPECT_EQ(r.volumes[i].cause, "constant volume") << r.volumes[i].failure();
    EXPECT_NE(r.volumes[i].failure().find(entries[i].paths[0]), std::string::npos) << r.volumes[i].failure();
  }
  EXPECT_NE(r.volumes[1].failure().find("every voxel is 0 as read"), std::string::npos) << r.volumes[1].failure();
  EXPECT_NE(r.volumes[2].failure().find("every voxel is 7 as read"), std::string::npos) << r.volumes[2].failure();
  EXPECT_NE(r.volumes[3].failure().find("after preprocessing"), std::string::npos) << r.volumes[3].failure();
  EXPECT_NE(r.volumes[3].failure().find("data.intensity"), std::string::npos) << r.volumes[3].failure();
  // Warm from the cache: the same verdicts.
  const CheckReport warm = check_data(entries, config, 1);
  EXPECT_EQ(warm.volumes[1].cache, CacheState::hit);
  EXPECT_EQ(warm.failures(), 3);
  // "error" refuses with the cause; "skip" trains on the rest.
  try {
    usable_entries(r, config);
    ADD_FAILURE() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(e.cause(), "constant volume");
    EXPECT_NE(std::string(e.what()).find("zeros.nii.gz"), std::string::npos) << e.what();
  }
  config.on_bad_volume = "skip";
  test::LogCapture log;
  EXPECT_EQ(usable_entries(r, config).size(), 1u);
}

TEST_F(CheckTest, IdenticalVoxelsUnderAnotherNameAreRefused) {
  const DatasetEntry a = volume("a.nii.gz", 0, 100, 5);
  const DatasetEntry other = volume("b.nii.gz", 0, 100, 6);
  fs::copy_file(a.paths[0], dir / "copy_of_a.nii.gz");
  const DatasetEntry copy{{dir / "copy_of_a.nii.gz"}, ""};
  const CheckReport r = check_data({a, other, copy}, config, 2);
  EXPECT_TRUE(r.volumes[0].ok);
  EXPECT_TRUE(r.volumes[1].ok);
  ASSERT_FALSE(r.volumes[2].ok);
  EXPECT_EQ(r.volumes[2].cause, "duplicate volume");
  EXPECT_NE(r.volumes[2].failure().find("copy_of_a.nii.gz"), std::string::npos) << r.volumes[2].failure();
  EXPECT_NE(r.volumes[2].failure().find("same voxels as " + a.paths[0]), std::string::npos) << r.volumes[2].failure();
}

TEST_F(CheckTest, ControlCharactersInPathsAreEscaped) {
  const DatasetEntry good = volume("new\nline.nii.gz", 0, 100);
  const DatasetEntry missing{{dir / "tab\tand\x1b[31mred.nii.gz"}, ""};
  const CheckReport r = check_data({good, missing}, config, 1);
  ASSERT_TRUE(r.volumes[0].ok) << r.volumes[0].failure();
  const std::string line = r.volumes[0].line();
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  EXPECT_NE(line.find("new\\nline.nii.gz"), std::string::npos) << line;
  ASSERT_FALSE(r.volumes[1].ok);
  for (const std::string& s : {r.volumes[1].line(), r.volumes[1].failure()}) {
    EXPECT_EQ(s.find('\t'), std::string::npos) << s;
    EXPECT_EQ(s.find('\x1b'), std::string::npos) << s;
    EXPECT_NE(s.find("tab\\tand\\x1b[31mred.nii.gz"), std::string::npos) << s;
  }
  // The report holds exactly one line per volume, the summary and one line per failure.
  const std::string text = r.text();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2 + 1 + 1 + 1) << text;
}

TEST_F(CheckTest, LinkLoopsAndBrokenLinksAreRefusedByName) {
  const DatasetEntry good = volume("good.nii.gz", 0, 100);
  fs::create_symlink("loop.nii.gz", dir.path / "loop.nii.gz");
  fs::create_symlink("gone.nii.gz", dir.path / "broken.nii.gz");
  const CheckReport r = check_data({good, {{dir / "loop.nii.gz"}, ""}, {{dir / "broken.nii.gz"}, ""}}, config, 1);
  EXPECT_TRUE(r.volumes[0].ok);
  ASSERT_FALSE(r.volumes[1].ok);
  EXPECT_EQ(r.volumes[1].cause, "symlink loop");
  EXPECT_NE(r.volumes[1].failure().find(dir / "loop.nii.gz" + ": symbolic link loop"), std::string::npos)
      << r.volumes[1].failure();
  ASSERT_FALSE(r.volumes[2].ok);
  EXPECT_EQ(r.volumes[2].cause, "missing file");
  EXPECT_NE(r.volumes[2].failure().find("broken symbolic link"), std::string::npos) << r.volumes[2].failure();
}

TEST_F(CheckTest, SummaryCountsRefusalsByCause) {
  const std::vector<DatasetEntry> entries = {volume("a.nii.gz", 0, 100, 1),
                                             {{dir / "missing1.nii.gz"}, ""},
                                             volume("flat.nii.gz", 3, 3),
                                             {{dir / "missing2.nii.gz"}, ""},
                                             volume("b.nii.gz", 0, 100, 2)};
  const CheckReport r = check_data(entries, config, 2);
  EXPECT_EQ(r.summary(), "checked 5 volumes: 2 ok, 3 refused (2 missing file, 1 constant volume)");
  const std::string text = r.text();
  EXPECT_NE(text.find("\n" + r.summary() + "\nfailures:\n  "), std::string::npos) << text;
  EXPECT_NE(text.find("FAIL " + dir / "missing1.nii.gz"), std::string::npos) << text;
  EXPECT_NE(text.find("[missing file]"), std::string::npos) << text;
  // Unclassified refusals count as "other"; ties are listed by name; all ok says so.
  CheckReport manual;
  manual.volumes.resize(4);
  manual.volumes[0].ok = true;
  manual.volumes[1].cause = "truncated data";
  manual.volumes[2].cause = "";
  manual.volumes[3].cause = "impossible geometry";
  EXPECT_EQ(manual.summary(), "checked 4 volumes: 1 ok, 3 refused (1 impossible geometry, 1 other, 1 truncated data)");
  CheckReport fine;
  fine.volumes.resize(1);
  fine.volumes[0].ok = true;
  EXPECT_EQ(fine.summary(), "checked 1 volume: 1 ok, 0 refused");
}

}  // namespace
}  // namespace mae
