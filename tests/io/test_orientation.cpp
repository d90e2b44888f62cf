// Orientation codes (nibabel/MONAI convention) and reorientation: known answers, and the physical
// position of every voxel kept.
#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "io/io.h"
#include "test_util.h"

namespace mae::test {
namespace {

Volume make_volume(const std::array<double, 9>& direction) {
  Volume v;
  v.data = at::arange(2 * 3 * 4 * 5, at::kFloat).reshape({2, 3, 4, 5});
  v.spacing = {0.5, 0.75, 1.25};
  v.origin = {10, -20, 30};
  v.direction = direction;
  return v;
}

// Every voxel of `out` sits at the physical position of the `in` voxel with the same value.
void expect_same_physical_positions(const Volume& in, const Volume& out) {
  ASSERT_EQ(in.data.numel(), out.data.numel());
  auto a = in.data.accessor<float, 4>();
  auto b = out.data.accessor<float, 4>();
  for (int64_t d = 0; d < out.data.size(1); ++d)
    for (int64_t h = 0; h < out.data.size(2); ++h)
      for (int64_t w = 0; w < out.data.size(3); ++w) {
        const auto p = physical_point(out, d, h, w);
        // Invert p = o + D S idx (D orthonormal): idx = S^-1 D^T (p - o).
        double idx[3];
        for (int c = 0; c < 3; ++c) {
          double s = 0;
          for (int r = 0; r < 3; ++r) s += in.direction[r * 3 + c] * (p[r] - in.origin[r]);
          idx[c] = s / in.spacing[c];
        }
        const int64_t x = std::llround(idx[0]), y = std::llround(idx[1]), z = std::llround(idx[2]);
        ASSERT_NEAR(idx[0], x, 1e-9);
        ASSERT_NEAR(idx[1], y, 1e-9);
        ASSERT_NEAR(idx[2], z, 1e-9);
        for (int64_t c = 0; c < in.data.size(0); ++c) ASSERT_EQ(b[c][d][h][w], a[c][z][y][x]);
      }
}

TEST(Orientation, CodesOfKnownDirections) {
  EXPECT_EQ(orientation_code(make_volume({1, 0, 0, 0, 1, 0, 0, 0, 1})), "LPS");
  EXPECT_EQ(orientation_code(make_volume({-1, 0, 0, 0, -1, 0, 0, 0, 1})), "RAS");
  EXPECT_EQ(orientation_code(make_volume({-1, 0, 0, 0, 0, 1, 0, -1, 0})), "RIP");
  // Columns: x -> +z (S), y -> +x (L), z -> -y (A).
  EXPECT_EQ(orientation_code(make_volume({0, 1, 0, 0, 0, -1, 1, 0, 0})), "SLA");
  EXPECT_EQ(orientation_code(make_volume(oblique_direction())), "LPS");
}

TEST(Orientation, LpsToRasFlipsXAndY) {
  const Volume in = make_volume({1, 0, 0, 0, 1, 0, 0, 0, 1});
  const Volume out = reorient(in, "RAS");
  EXPECT_EQ(orientation_code(out), "RAS");
  EXPECT_TRUE(at::equal(out.data, in.data.flip({2, 3})));
  const std::array<double, 9> ras{-1, 0, 0, 0, -1, 0, 0, 0, 1};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(out.direction[i], ras[i]);
  EXPECT_DOUBLE_EQ(out.origin[0], 10 + 4 * 0.5);
  EXPECT_DOUBLE_EQ(out.origin[1], -20 + 3 * 0.75);
  EXPECT_DOUBLE_EQ(out.origin[2], 30);
  expect_same_physical_positions(in, out);
}

TEST(Orientation, PermutedDirectionToLps) {
  const Volume in = make_volume({0, 1, 0, 0, 0, -1, 1, 0, 0});  // "SLA"
  const Volume out = reorient(in, "LPS");
  EXPECT_EQ(orientation_code(out), "LPS");
  // LPS x was index y, P was index z reversed, S was index x.
  EXPECT_EQ(out.data.sizes(), (std::vector<int64_t>{2, 5, 3, 4}));
  EXPECT_EQ((std::array<double, 3>{out.spacing}), (std::array<double, 3>{0.75, 1.25, 0.5}));
  for (int i = 0; i < 9; ++i) EXPECT_EQ(out.direction[i], (i % 4 == 0 ? 1.0 : 0.0));
  expect_same_physical_positions(in, out);
}

TEST(Orientation, EveryTargetKeepsPhysicalPositionsOfObliqueVolume) {
  const Volume in = make_volume(oblique_direction());
  for (const char* code : {"RAS", "LPS", "LAS", "RPI", "SAR", "IPL", "ASL"}) {
    SCOPED_TRACE(code);
    const Volume out = reorient(in, code);
    EXPECT_EQ(orientation_code(out), code);
    expect_same_physical_positions(in, out);
    const Volume back = reorient(out, "LPS");
    EXPECT_TRUE(at::equal(back.data, in.data));
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(back.origin[i], in.origin[i], 1e-9);
  }
}

TEST(Orientation, LowercaseCodeAccepted) {
  EXPECT_EQ(orientation_code(reorient(make_volume({1, 0, 0, 0, 1, 0, 0, 0, 1}), "ras")), "RAS");
}

TEST(Orientation, InvalidCodesAreConfigErrors) {
  const Volume v = make_volume({1, 0, 0, 0, 1, 0, 0, 0, 1});
  for (const char* code : {"", "RA", "RASL", "RAX", "RRS", "RLS", "LPA"}) {
    SCOPED_TRACE(code);
    expect_error<ConfigError>([&] { reorient(v, code); },
                              {"orientation code '" + std::string(code) + "'"});
  }
}

}  // namespace
}  // namespace mae::test
