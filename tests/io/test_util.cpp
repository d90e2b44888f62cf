// Implementation of the io test helpers (see test_util.h).
#include "test_util.h"

#include <itkGDCMImageIO.h>
#include <itkMetaDataObject.h>

#include <cmath>
#include <cstdlib>
#include <random>

#include "io/itk_bridge.h"

namespace mae::test {

void TempDirTest::SetUp() {
  io_detail::ensure_itk_setup();  // registers the IO factories the tests write with
  std::random_device rd;
  dir_ = std::filesystem::temp_directory_path() / ("mae_io_test_" + std::to_string(rd()) + "_" +
                                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
  std::filesystem::create_directories(dir_);
}

void TempDirTest::TearDown() {
  if (std::getenv("MAE_IO_KEEP_TMP") != nullptr) return;  // keep inputs for debugging
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::array<double, 9> oblique_direction() {
  // Rotation about z by 20 degrees, then about x by 10 degrees: Rx * Rz.
  const double a = 20.0 * M_PI / 180.0, b = 10.0 * M_PI / 180.0;
  const double rz[9] = {std::cos(a), -std::sin(a), 0, std::sin(a), std::cos(a), 0, 0, 0, 1};
  const double rx[9] = {1, 0, 0, 0, std::cos(b), -std::sin(b), 0, std::sin(b), std::cos(b)};
  std::array<double, 9> out{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) out[i * 3 + j] += rx[i * 3 + k] * rz[k * 3 + j];
  return out;
}

itk::Image<float, 3>::Pointer make_image(const std::array<double, 9>& direction) {
  using Image = itk::Image<float, 3>;
  auto image = Image::New();
  Image::SizeType size;
  size[0] = 5;
  size[1] = 4;
  size[2] = 3;
  image->SetRegions(size);
  image->Allocate();
  Image::SpacingType spacing;
  spacing[0] = 0.5;
  spacing[1] = 0.75;
  spacing[2] = 1.25;
  image->SetSpacing(spacing);
  Image::PointType origin;
  origin[0] = 10;
  origin[1] = -20;
  origin[2] = 30;
  image->SetOrigin(origin);
  Image::DirectionType d;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) d(i, j) = direction[i * 3 + j];
  image->SetDirection(d);
  for (itk::IndexValueType z = 0; z < 3; ++z)
    for (itk::IndexValueType y = 0; y < 4; ++y)
      for (itk::IndexValueType x = 0; x < 5; ++x) image->SetPixel({{x, y, z}}, voxel_value(x, y, z));
  return image;
}

void write_dicom_series(const itk::Image<float, 3>* image, const std::string& dir, const std::string& series_uid,
                        const std::string& description) {
  using Slice = itk::Image<int16_t, 3>;
  io_detail::WarningCapture quiet;  // GDCM notes on the headers ITK writes (no PhotometricInterpretation)
  std::filesystem::create_directories(dir);
  const auto size = image->GetLargestPossibleRegion().GetSize();
  for (itk::IndexValueType k = 0; k < static_cast<itk::IndexValueType>(size[2]); ++k) {
    auto slice = Slice::New();
    Slice::SizeType slice_size = size;
    slice_size[2] = 1;
    slice->SetRegions(slice_size);
    slice->Allocate();
    slice->SetSpacing(image->GetSpacing());
    slice->SetDirection(image->GetDirection());
    Slice::PointType origin;
    image->TransformIndexToPhysicalPoint({{0, 0, k}}, origin);
    slice->SetOrigin(origin);
    for (itk::IndexValueType y = 0; y < static_cast<itk::IndexValueType>(size[1]); ++y)
      for (itk::IndexValueType x = 0; x < static_cast<itk::IndexValueType>(size[0]); ++x)
        slice->SetPixel({{x, y, 0}}, static_cast<int16_t>(image->GetPixel({{x, y, k}})));
    auto io = itk::GDCMImageIO::New();
    io->KeepOriginalUIDOn();
    auto& dict = slice->GetMetaDataDictionary();
    itk::EncapsulateMetaData<std::string>(dict, "0020|000e", series_uid);
    itk::EncapsulateMetaData<std::string>(dict, "0020|000d", "1.2.826.0.1.3680043.2.1125.1");
    itk::EncapsulateMetaData<std::string>(dict, "0020|0052", "1.2.826.0.1.3680043.2.1125.2");
    itk::EncapsulateMetaData<std::string>(dict, "0008|0018", series_uid + "." + std::to_string(k + 1));
    itk::EncapsulateMetaData<std::string>(dict, "0020|0013", std::to_string(k + 1));
    itk::EncapsulateMetaData<std::string>(dict, "0008|103e", description);
    itk::EncapsulateMetaData<std::string>(dict, "0008|0060", "CT");
    auto writer = itk::ImageFileWriter<Slice>::New();
    writer->SetInput(slice);
    writer->SetImageIO(io);
    writer->SetFileName(dir + "/slice_" + std::to_string(k) + ".dcm");
    writer->Update();
  }
}

std::array<double, 3> physical_point(const Volume& v, int64_t d, int64_t h, int64_t w) {
  const double idx[3] = {static_cast<double>(w), static_cast<double>(h), static_cast<double>(d)};
  std::array<double, 3> p = v.origin;
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) p[r] += v.direction[r * 3 + c] * v.spacing[c] * idx[c];
  return p;
}

}  // namespace mae::test
