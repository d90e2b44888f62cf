// Every class of bad input is refused with one InputError line that names the file and the
// problem: 4D, 5D, multi-component, truncated DICOM, NIfTI-2, non-orthonormal direction, empty,
// non-image, missing, NaN/Inf voxels, 2D.
#include <ATen/ATen.h>
#include <itkVectorImage.h>
#include <zlib.h>

#include <cmath>
#include <fstream>
#include <limits>

#include "core/error.h"
#include "io/io.h"
#include "test_util.h"

namespace mae::test {
namespace {

namespace fs = std::filesystem;

class BadInputTest : public TempDirTest {};

template <unsigned N>
typename itk::Image<float, N>::Pointer make_nd(const std::array<size_t, N>& sizes) {
  using Image = itk::Image<float, N>;
  auto image = Image::New();
  typename Image::SizeType size;
  for (unsigned i = 0; i < N; ++i) size[i] = sizes[i];
  image->SetRegions(size);
  image->Allocate();
  image->FillBuffer(1.0f);
  return image;
}

TEST_F(BadInputTest, FourDimensionalFile) {
  for (const char* name : {"four.nii.gz", "four.mha"}) {
    write_itk(make_nd<4>({4, 4, 4, 3}).GetPointer(), path(name));
    expect_error<InputError>([&] { read_volume(path(name)); },
                             {path(name), "is 4D (4x4x4x3)", "time_point"});
  }
}

TEST_F(BadInputTest, FiveDimensionalFile) {
  write_itk(make_nd<5>({4, 4, 4, 2, 2}).GetPointer(), path("five.mha"));
  ReadOptions options;
  options.time_point = 0;
  expect_error<InputError>([&] { read_volume(path("five.mha"), options); },
                           {path("five.mha"), "is 5D (4x4x4x2x2)"});
}

TEST_F(BadInputTest, MultiComponentPixels) {
  using Vector = itk::VectorImage<float, 3>;
  auto image = Vector::New();
  Vector::SizeType size;
  size.Fill(4);
  image->SetRegions(size);
  image->SetNumberOfComponentsPerPixel(3);
  image->Allocate();
  itk::VariableLengthVector<float> pixel(3);
  pixel.Fill(1.0f);
  image->FillBuffer(pixel);
  write_itk(image.GetPointer(), path("rgbish.mha"));
  expect_error<InputError>([&] { read_volume(path("rgbish.mha")); },
                           {path("rgbish.mha"), "3 components per voxel", "fourth_axis_as_channels"});
}

TEST_F(BadInputTest, TruncatedDicomPixelData) {
  auto image = make_image({1, 0, 0, 0, 1, 0, 0, 0, 1});
  write_dicom_series(image, path("cut"), "1.2.826.0.1.3680043.2.1125.30", "to be truncated");
  ASSERT_NO_THROW(read_volume(path("cut")));
  const std::string victim = path("cut/slice_1.dcm");
  fs::resize_file(victim, fs::file_size(victim) - 16);  // pixel data is the last element
  expect_error<InputError>([&] { read_volume(path("cut")); },
                           {path("cut"), "slice_1.dcm", "is truncated"});
}

void write_nifti2_header(const std::string& file, bool gzip) {
  std::string header(540 + 4 + 8, '\0');
  const int32_t sizeof_hdr = 540;
  std::memcpy(&header[0], &sizeof_hdr, 4);
  std::memcpy(&header[4], "n+2\0\r\n\032\n", 8);
  if (gzip) {
    gzFile out = gzopen(file.c_str(), "wb");
    gzwrite(out, header.data(), static_cast<unsigned>(header.size()));
    gzclose(out);
  } else {
    std::ofstream(file, std::ios::binary).write(header.data(), static_cast<std::streamsize>(header.size()));
  }
}

TEST_F(BadInputTest, Nifti2IsRefusedWithAHint) {
  write_nifti2_header(path("two.nii"), false);
  write_nifti2_header(path("two.nii.gz"), true);
  for (const char* name : {"two.nii", "two.nii.gz"}) {
    expect_error<InputError>([&] { read_volume(path(name)); },
                             {path(name), "NIfTI-2", "not supported", "convert it to NIfTI-1"});
  }
}

TEST_F(BadInputTest, NonOrthonormalDirection) {
  auto image = make_image({1, 0.3, 0, 0, 1, 0, 0, 0, 1});
  write_itk(image.GetPointer(), path("shear.mha"));
  expect_error<InputError>([&] { read_volume(path("shear.mha")); },
                           {path("shear.mha"), "non-orthonormal direction"});
}

TEST_F(BadInputTest, ZeroByteFile) {
  std::ofstream(path("empty.nii.gz")).close();
  expect_error<InputError>([&] { read_volume(path("empty.nii.gz")); },
                           {path("empty.nii.gz"), "is empty (0 bytes)"});
}

TEST_F(BadInputTest, NonImageFile) {
  for (const char* name : {"notes.txt", "notes.nii"}) {
    std::ofstream(path(name)) << "these are not voxels\n";
    expect_error<InputError>([&] { read_volume(path(name)); },
                             {path(name), "not an image file"});
  }
}

TEST_F(BadInputTest, MissingFile) {
  expect_error<InputError>([&] { read_volume(path("nothing.nii.gz")); },
                           {path("nothing.nii.gz"), "does not exist"});
}

TEST_F(BadInputTest, FolderWithoutDicom) {
  fs::create_directories(path("plain"));
  std::ofstream(path("plain/readme.txt")) << "no DICOM here\n";
  expect_error<InputError>([&] { read_volume(path("plain")); },
                           {path("plain"), "without DICOM series"});
}

TEST_F(BadInputTest, NanAndInfiniteVoxels) {
  auto image = make_image({1, 0, 0, 0, 1, 0, 0, 0, 1});
  image->SetPixel({{3, 2, 1}}, std::numeric_limits<float>::quiet_NaN());
  write_itk(image.GetPointer(), path("nan.nii.gz"));
  expect_error<InputError>([&] { read_volume(path("nan.nii.gz")); },
                           {path("nan.nii.gz"), "1 NaN or infinite voxel(s)", "(3, 2, 1)"});
  image->SetPixel({{3, 2, 1}}, 1.0f);
  image->SetPixel({{0, 0, 2}}, -std::numeric_limits<float>::infinity());
  write_itk(image.GetPointer(), path("inf.mha"));
  expect_error<InputError>([&] { read_volume(path("inf.mha")); },
                           {path("inf.mha"), "NaN or infinite", "(0, 0, 2)"});
}

TEST_F(BadInputTest, TwoDimensionalImage) {
  write_itk(make_nd<2>({6, 5}).GetPointer(), path("flat.nii.gz"));
  write_itk(make_nd<3>({6, 5, 1}).GetPointer(), path("slab.mha"));
  for (const char* name : {"flat.nii.gz", "slab.mha"}) {
    expect_error<InputError>([&] { read_volume(path(name)); },
                             {path(name), "is 2D", "allow_2d"});
  }
}

}  // namespace
}  // namespace mae::test
