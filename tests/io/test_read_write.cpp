// Reading and writing volumes: the tensor <-> ITK axis order, geometry round trips through every
// format, DICOM series (synthetic and real), 4D and multi-channel options, PNG output.
#include <ATen/ATen.h>
#include <gdcmTrace.h>
#include <itkOutputWindow.h>
#include <itkImageFileReader.h>
#include <itkRGBPixel.h>
#include <itkVectorImage.h>

#include <filesystem>
#include <thread>

#include "core/error.h"
#include "io/io.h"
#include "io/itk_bridge.h"
#include "test_util.h"

namespace mae::test {
namespace {

namespace fs = std::filesystem;

class ReadWriteTest : public TempDirTest {};

// Voxel (d, h, w) of the tensor must be ITK pixel index (w, h, d), geometry unchanged.
void expect_matches_synthetic(const Volume& v, const std::array<double, 9>& direction,
                              double tol = 1e-5) {
  ASSERT_EQ(v.data.sizes(), (std::vector<int64_t>{1, 3, 4, 5}));
  ASSERT_EQ(v.data.scalar_type(), at::kFloat);
  ASSERT_TRUE(v.data.is_contiguous());
  auto a = v.data.accessor<float, 4>();
  for (int64_t d = 0; d < 3; ++d)
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t w = 0; w < 5; ++w) ASSERT_EQ(a[0][d][h][w], voxel_value(w, h, d));
  const std::array<double, 3> spacing{0.5, 0.75, 1.25}, origin{10, -20, 30};
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(v.spacing[i], spacing[i], tol);
    EXPECT_NEAR(v.origin[i], origin[i], 1e-4);
  }
  for (int i = 0; i < 9; ++i) EXPECT_NEAR(v.direction[i], direction[i], tol) << "entry " << i;
}

TEST_F(ReadWriteTest, BridgeReversesAxisOrderOnObliqueNonCubicImage) {
  auto image = make_image(oblique_direction());
  Volume v = io_detail::volume_from_itk(image);
  expect_matches_synthetic(v, oblique_direction(), 1e-12);
  auto back = io_detail::itk_from_volume(v, 0);
  EXPECT_EQ(back->GetLargestPossibleRegion().GetSize()[0], 5u);
  EXPECT_EQ(back->GetLargestPossibleRegion().GetSize()[2], 3u);
  EXPECT_EQ(back->GetPixel({{4, 1, 2}}), voxel_value(4, 1, 2));
  EXPECT_EQ(back->GetDirection(), make_image(oblique_direction())->GetDirection());
  // The view shares memory with the tensor: no copy.
  EXPECT_EQ(back->GetBufferPointer(), v.data.data_ptr<float>());
}

TEST_F(ReadWriteTest, ReadsItkWrittenFilesInEveryFormat) {
  for (const char* name : {"a.nii", "a.nii.gz", "a.mha", "a.nrrd", "a.hdr", "a.mhd"}) {
    SCOPED_TRACE(name);
    write_itk(make_image(oblique_direction()).GetPointer(), path(name));
    expect_matches_synthetic(read_volume(path(name)), oblique_direction());
  }
}

TEST_F(ReadWriteTest, WriteVolumeRoundTripsGeometry) {
  const Volume v = io_detail::volume_from_itk(make_image(oblique_direction()));
  for (const char* name : {"b.nii", "b.nii.gz", "b.mha", "b.nrrd"}) {
    SCOPED_TRACE(name);
    write_volume(v, path(name));
    expect_matches_synthetic(read_volume(path(name)), oblique_direction());
  }
}

TEST_F(ReadWriteTest, MultiChannelWritesVectorImageAndReadsBackAsChannels) {
  Volume v = io_detail::volume_from_itk(make_image(oblique_direction()));
  v.data = at::cat({v.data, v.data * 2 + 1}, 0);
  for (const char* name : {"c.mha", "c.nii.gz", "c.nrrd"}) {
    SCOPED_TRACE(name);
    write_volume(v, path(name));
    expect_error<InputError>([&] { read_volume(path(name)); }, {path(name), "2 components"});
    ReadOptions options;
    options.fourth_axis_as_channels = true;
    const Volume back = read_volume(path(name), options);
    ASSERT_EQ(back.data.sizes(), v.data.sizes());
    EXPECT_TRUE(at::equal(back.data, v.data));
  }
}

TEST_F(ReadWriteTest, WriteVolumeRefusesUnknownExtensionAndUnwritablePath) {
  const Volume v = io_detail::volume_from_itk(make_image(oblique_direction()));
  expect_error<ConfigError>([&] { write_volume(v, path("v.png")); }, {"v.png", "extension"});
  const std::string bad = path("no/such/folder/v.nii.gz");
  expect_error<IoError>([&] { write_volume(v, bad); }, {bad, "cannot write", "does not exist"});
}

TEST_F(ReadWriteTest, FourDimensionalTimePointAndChannels) {
  using Image4 = itk::Image<float, 4>;
  auto image = Image4::New();
  Image4::SizeType size;
  size[0] = 4;
  size[1] = 3;
  size[2] = 2;
  size[3] = 3;
  image->SetRegions(size);
  image->Allocate();
  for (itk::IndexValueType t = 0; t < 3; ++t)
    for (itk::IndexValueType z = 0; z < 2; ++z)
      for (itk::IndexValueType y = 0; y < 3; ++y)
        for (itk::IndexValueType x = 0; x < 4; ++x)
          image->SetPixel({{x, y, z, t}}, voxel_value(x, y, z) + 1000.0f * t);
  write_itk(image.GetPointer(), path("t.nii.gz"));

  ReadOptions pick;
  pick.time_point = 2;
  const Volume one = read_volume(path("t.nii.gz"), pick);
  ASSERT_EQ(one.data.sizes(), (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(one.data[0][1][2][3].item<float>(), voxel_value(3, 2, 1) + 2000.0f);

  ReadOptions channels;
  channels.fourth_axis_as_channels = true;
  const Volume all = read_volume(path("t.nii.gz"), channels);
  ASSERT_EQ(all.data.sizes(), (std::vector<int64_t>{3, 2, 3, 4}));
  EXPECT_EQ(all.data[1][1][0][2].item<float>(), voxel_value(2, 0, 1) + 1000.0f);

  pick.time_point = 3;
  expect_error<InputError>([&] { read_volume(path("t.nii.gz"), pick); },
                           {path("t.nii.gz"), "time_point 3 is out of range"});
}

TEST_F(ReadWriteTest, TwoDimensionalImageWhenAllowed) {
  using Image2 = itk::Image<float, 2>;
  auto image = Image2::New();
  Image2::SizeType size;
  size[0] = 6;
  size[1] = 5;
  image->SetRegions(size);
  image->Allocate();
  image->FillBuffer(2.5f);
  image->SetPixel({{5, 1}}, 7.0f);
  write_itk(image.GetPointer(), path("flat.nii.gz"));
  ReadOptions options;
  options.allow_2d = true;
  const Volume v = read_volume(path("flat.nii.gz"), options);
  ASSERT_EQ(v.data.sizes(), (std::vector<int64_t>{1, 1, 5, 6}));
  EXPECT_EQ(v.data[0][0][1][5].item<float>(), 7.0f);
}

TEST_F(ReadWriteTest, DicomSeriesRoundTripWithObliqueDirection) {
  const auto direction = oblique_direction();
  auto image = make_image(direction);
  write_dicom_series(image, path("dcm"), "1.2.826.0.1.3680043.2.1125.10", "synthetic oblique");
  const auto series = list_dicom_series(path("dcm"));
  ASSERT_EQ(series.size(), 1u);
  EXPECT_EQ(series[0].uid, "1.2.826.0.1.3680043.2.1125.10");
  EXPECT_EQ(series[0].description, "synthetic oblique");
  EXPECT_EQ(series[0].num_slices, 3);
  // DICOM keeps geometry as decimal strings: compare to 1e-4.
  expect_matches_synthetic(read_volume(path("dcm")), direction, 1e-4);
}

TEST_F(ReadWriteTest, DicomFolderWithTwoSeriesNeedsSeriesUid) {
  auto image = make_image({1, 0, 0, 0, 1, 0, 0, 0, 1});
  write_dicom_series(image, path("two"), "1.2.826.0.1.3680043.2.1125.21", "first");
  fs::rename(path("two/slice_0.dcm"), path("two/a0.dcm"));
  fs::rename(path("two/slice_1.dcm"), path("two/a1.dcm"));
  fs::rename(path("two/slice_2.dcm"), path("two/a2.dcm"));
  auto other = make_image({1, 0, 0, 0, 1, 0, 0, 0, 1});
  other->FillBuffer(5.0f);
  write_dicom_series(other, path("two"), "1.2.826.0.1.3680043.2.1125.22", "second");
  expect_error<InputError>([&] { read_volume(path("two")); },
                           {path("two"), "2 DICOM series", "1.2.826.0.1.3680043.2.1125.21",
                            "\"first\"", "1.2.826.0.1.3680043.2.1125.22", "(3 slices)"});
  ReadOptions options;
  options.series_uid = "1.2.826.0.1.3680043.2.1125.22";
  const Volume v = read_volume(path("two"), options);
  ASSERT_EQ(v.data.sizes(), (std::vector<int64_t>{1, 3, 4, 5}));
  EXPECT_EQ(v.data.min().item<float>(), 5.0f);
  EXPECT_EQ(v.data.max().item<float>(), 5.0f);
  options.series_uid = "9.9.9";
  expect_error<InputError>([&] { read_volume(path("two"), options); },
                           {path("two"), "no DICOM series 9.9.9"});
}

TEST_F(ReadWriteTest, WritePngGreyAndRgb) {
  at::Tensor grey = at::arange(0, 64 * 48, at::kInt).remainder(256).to(at::kByte).reshape({48, 64});
  write_png(grey, path("grey.png"));
  auto grey_back = itk::ReadImage<itk::Image<uint8_t, 2>>(path("grey.png"));
  EXPECT_EQ(grey_back->GetLargestPossibleRegion().GetSize()[0], 64u);
  EXPECT_EQ(grey_back->GetLargestPossibleRegion().GetSize()[1], 48u);
  EXPECT_EQ(grey_back->GetPixel({{10, 2}}), grey[2][10].item<uint8_t>());

  at::Tensor rgb = at::zeros({32, 40, 3}, at::kByte);
  rgb.select(2, 0).narrow(1, 0, 20).fill_(255);  // left half red
  rgb.select(2, 2).narrow(0, 16, 16).fill_(200);  // bottom half blue
  write_png(rgb, path("rgb.png"));
  auto rgb_back = itk::ReadImage<itk::Image<itk::RGBPixel<uint8_t>, 2>>(path("rgb.png"));
  const auto pixel = rgb_back->GetPixel({{5, 20}});
  EXPECT_EQ(pixel[0], 255);
  EXPECT_EQ(pixel[1], 0);
  EXPECT_EQ(pixel[2], 200);

  expect_error<IoError>([&] { write_png(at::zeros({4, 4}), path("f.png")); }, {"f.png", "uint8"});
}

TEST(WarningCapture, CollectsItkAndGdcmMessagesOfThisThreadOnly) {
  io_detail::ensure_itk_setup();
  io_detail::WarningCapture capture;
  itk::OutputWindow::GetInstance()->DisplayWarningText("itk says\nsomething odd");
  gdcm::Trace::GetWarningStream() << "gdcm says hello\n\n";
  std::thread other([] { io_detail::WarningCapture own; });  // another thread's capture is its own
  other.join();
  const auto messages = capture.messages();
  ASSERT_EQ(messages.size(), 2u);
  EXPECT_EQ(messages[0], "itk says something odd");
  EXPECT_EQ(messages[1], "gdcm says hello");
}

TEST(RealData, Ch2TemplateReadsWithShapeAndOrientation) {
  const std::string file = "/usr/share/mricron/templates/ch2.nii.gz";
  if (!fs::exists(file)) GTEST_SKIP() << file << " not installed (Debian package mricron-data)";
  const Volume v = read_volume(file);
  EXPECT_EQ(v.data.sizes(), (std::vector<int64_t>{1, 181, 217, 181}));
  EXPECT_EQ(orientation_code(v), "RAS");
  for (double s : v.spacing) EXPECT_NEAR(s, 1.0, 1e-6);
  EXPECT_GT(v.data.max().item<float>(), 0.0f);
}

TEST(RealData, PydicomCt5nSeriesReadsAsFiveSlices) {
  std::string dir;
  const fs::path root = "/usr/lib/python3/dist-packages/pydicom/data/test_files/dicomdirtests";
  if (fs::exists(root)) {
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
      if (entry.is_directory() && entry.path().filename() == "CT5N") dir = entry.path().string();
    }
  }
  if (dir.empty()) GTEST_SKIP() << "CT5N series of python3-pydicom's test files not installed";
  const auto series = list_dicom_series(dir);
  ASSERT_EQ(series.size(), 1u);
  EXPECT_EQ(series[0].num_slices, 5);
  const Volume v = read_volume(dir);
  EXPECT_EQ(v.data.size(0), 1);
  EXPECT_EQ(v.data.size(1), 5);
  EXPECT_GT(v.data.size(2), 1);
  EXPECT_GT(v.data.size(3), 1);
  EXPECT_GT(v.data.max().item<float>(), v.data.min().item<float>());
}

}  // namespace
}  // namespace mae::test
