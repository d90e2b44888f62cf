// Helpers shared by the io tests: a temporary folder per test, synthetic ITK images with known
// voxels and geometry, a DICOM series writer, and checks on error messages.
#pragma once

#include <gtest/gtest.h>
#include <itkImage.h>
#include <itkImageFileWriter.h>

#include <array>
#include <filesystem>
#include <string>

#include "../common/expect_error.h"
#include "io/volume.h"

namespace mae::test {

/// A fresh folder under the system temp dir, removed when the fixture ends.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;
  /// Path of `name` inside the temp folder.
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

/// Voxel value used by synthetic images: distinct for every index (x, y, z).
inline float voxel_value(int64_t x, int64_t y, int64_t z) {
  return static_cast<float>(x + 10 * y + 100 * z);
}

/// Row-major rotation (det +1) that is oblique to every axis.
std::array<double, 9> oblique_direction();

/// Synthetic 3D float image of size (x, y, z) = (5, 4, 3), voxel_value(x, y, z), spacing
/// (0.5, 0.75, 1.25), origin (10, -20, 30) and the given direction.
itk::Image<float, 3>::Pointer make_image(const std::array<double, 9>& direction);

/// Writes any ITK image with ImageFileWriter (format from the extension).
template <typename Image>
void write_itk(const Image* image, const std::string& path) {
  auto writer = itk::ImageFileWriter<Image>::New();
  writer->SetInput(image);
  writer->SetFileName(path);
  writer->Update();
}

/// Writes `image` (converted to int16) as a DICOM series: one file per z slice, named
/// slice_<k>.dcm in `dir`, with the given SeriesInstanceUID and description.
void write_dicom_series(const itk::Image<float, 3>* image, const std::string& dir,
                        const std::string& series_uid, const std::string& description);

/// Physical LPS position of tensor voxel (d, h, w) of a volume.
std::array<double, 3> physical_point(const Volume& volume, int64_t d, int64_t h, int64_t w);

}  // namespace mae::test
