// The montage: --slice parsing, slice location from the orientation, square pixels in mm, the font.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/error.h"
#include "helpers.h"
#include "infer/montage.h"
#include "io/io.h"

namespace mae {
namespace {

Volume ras_volume(int64_t d, int64_t h, int64_t w, std::array<double, 3> spacing) {
  Volume v;
  v.data = at::rand({1, d, h, w});
  v.spacing = spacing;
  v.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};  // RAS in ITK's LPS terms
  return v;
}

TEST(SliceSpec, ParsesPlanesAndIndices) {
  EXPECT_EQ(parse_slice_spec("axial").plane, "axial");
  EXPECT_FALSE(parse_slice_spec("axial").index.has_value());
  EXPECT_EQ(*parse_slice_spec("Coronal:7").index, 7);
  EXPECT_EQ(parse_slice_spec("sagittal:0").plane, "sagittal");
  for (const char* bad : {"transverse:3", "axial:", "axial:-1", "axial:x", "axial:3:4", ""}) {
    test::expect_error<ConfigError>([&] { parse_slice_spec(bad); }, {"--slice"});
  }
}

TEST(SliceSpec, LocatesPlanesFromTheOrientation) {
  const Volume ras = ras_volume(10, 12, 14, {1, 1, 1});
  ASSERT_EQ(orientation_code(ras), "RAS");
  const auto s = resolve_slices(ras, {});
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].axis, 0);
  EXPECT_EQ(s[0].index, 5);
  EXPECT_EQ(s[0].label, "axial z=5");
  EXPECT_EQ(s[1].axis, 1);
  EXPECT_EQ(s[1].label, "coronal y=6");
  EXPECT_EQ(s[2].axis, 2);
  EXPECT_EQ(s[2].label, "sagittal x=7");
  // Orientation PRS: x runs A-P, so the coronal plane is perpendicular to x (tensor axis W).
  Volume prs = test::synthetic_volume(10, 12, 14);
  ASSERT_EQ(orientation_code(prs), "PRS");
  const auto p = resolve_slices(prs, {{"coronal", 3}, {"sagittal", std::nullopt}});
  EXPECT_EQ(p[0].axis, 2);
  EXPECT_EQ(p[0].label, "coronal x=3");
  EXPECT_EQ(p[1].axis, 1);
  EXPECT_EQ(p[1].index, 6);
  test::expect_error<ConfigError>([&] { resolve_slices(ras, {{"sagittal", 14}}); }, {"--slice sagittal:14", "0..13"});
}

TEST(Montage, PixelsAreSquareInMillimetres) {
  // Axial slice of a RAS volume: x across (40 voxels of 2 mm, the largest extent), y down. Doubling
  // the y spacing doubles the panel's height, so the montage grows by exactly that.
  auto height_for = [](double spacing_y) {
    const Volume v = ras_volume(4, 6, 40, {2.0, spacing_y, 1.0});
    MontageInputs in;
    in.input = &v;
    in.reconstruction = v.data;
    in.mask = at::zeros_like(v.data);
    in.slices = resolve_slices(v, {{"axial", 1}});
    in.target_panel_px = 400;  // 80 mm across -> 5 px per mm
    const auto img = render_montage(in);
    EXPECT_EQ(img.scalar_type(), at::kByte);
    EXPECT_EQ(img.size(2), 3);
    return img.size(0);
  };
  // 6 voxels of 5 mm = 30 mm = 150 px; of 10 mm = 300 px (both taller than the row label).
  EXPECT_EQ(height_for(10.0) - height_for(5.0), 150);
}

TEST(Montage, BitmapFontDrawsInsideItsBox) {
  at::Tensor img = at::zeros({20, 40, 3}, at::kByte);
  EXPECT_EQ(text_width("AB", 2), 22);
  draw_text(img, 1, 1, "ab", 2, {255, 0, 0});
  const auto red = img.select(2, 0);
  EXPECT_GT(red.sum().item<int64_t>(), 0);
  EXPECT_EQ(red.narrow(1, 1 + 22, 40 - 23).sum().item<int64_t>(), 0);  // nothing right of the text
  EXPECT_EQ(img.select(2, 1).sum().item<int64_t>(), 0);
  draw_text(img, 35, 15, "W?", 2, {0, 255, 0});  // clipped at the edges, no crash
}

}  // namespace
}  // namespace mae
