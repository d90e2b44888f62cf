// write_volume and write_png: Volumes (with geometry) and 8-bit pictures to disk through ITK,
// wrapping the tensors' memory instead of copying it where the layouts agree.
#include <ATen/ATen.h>
#include <itkImageFileWriter.h>
#include <itkImportImageFilter.h>
#include <itkRGBPixel.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <unistd.h>

#include "core/error.h"
#include "io/io.h"
#include "io/itk_bridge.h"

namespace mae {
namespace {

bool ends_with(std::string text, const std::string& suffix) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ITK's NIfTI writer only prints an error when it cannot open the file: check the folder before
// and the file after. The image goes to a temporary name first (same folder and extension, so
// ITK picks the same format) and is renamed into place, so an old file of the same name is never
// taken for a new one, and a failed write never leaves a half-written file under the final name.
template <typename Image>
void write_image(const Image* image, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path target = fs::absolute(path, ec);
  const fs::path parent = target.parent_path();
  if (!fs::is_directory(parent, ec)) {
    throw IoError(path + ": cannot write: folder " + parent.string() + " does not exist");
  }
  // Header + data formats name their data file after the header: write those in place, after
  // removing the old header so it cannot pass the check below.
  const bool two_files = ends_with(path, ".mhd") || ends_with(path, ".nhdr") || ends_with(path, ".hdr");
  const fs::path tmp =
      two_files ? target : parent / (".tmp-" + std::to_string(::getpid()) + "-" + target.filename().string());
  fs::remove(tmp, ec);
  try {
    auto writer = itk::ImageFileWriter<Image>::New();
    writer->SetInput(image);
    writer->SetFileName(tmp.string());
    writer->SetUseCompression(ends_with(path, ".gz") || ends_with(path, ".mha") ||
                              ends_with(path, ".nrrd") || ends_with(path, ".png"));
    writer->Update();
  } catch (const itk::ExceptionObject& e) {
    fs::remove(tmp, ec);
    std::string what = e.GetDescription();
    std::replace(what.begin(), what.end(), '\n', ' ');
    throw IoError(path + ": cannot write: " + what);
  }
  if (!fs::is_regular_file(tmp, ec) || fs::file_size(tmp, ec) == 0) {
    fs::remove(tmp, ec);
    throw IoError(path + ": cannot write: the file was not created (permissions or disk full?)");
  }
  if (!two_files) fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw IoError(path + ": cannot write: " + ec.message());
  }
}

template <typename Pixel>
typename itk::Image<Pixel, 2>::Pointer import_2d(Pixel* data, int64_t h, int64_t w) {
  using Importer = itk::ImportImageFilter<Pixel, 2>;
  auto importer = Importer::New();
  typename Importer::SizeType size;
  size[0] = static_cast<itk::SizeValueType>(w);
  size[1] = static_cast<itk::SizeValueType>(h);
  typename Importer::IndexType start;
  start.Fill(0);
  importer->SetRegion(typename Importer::RegionType(start, size));
  importer->SetImportPointer(data, static_cast<itk::SizeValueType>(h * w), false);
  importer->Update();
  typename itk::Image<Pixel, 2>::Pointer image = importer->GetOutput();
  image->DisconnectPipeline();
  return image;
}

}  // namespace

void write_volume(const Volume& volume, const std::string& path) {
  io_detail::ensure_itk_setup();
  const bool known = ends_with(path, ".nii") || ends_with(path, ".nii.gz") ||
                     ends_with(path, ".mha") || ends_with(path, ".mhd") ||
                     ends_with(path, ".nrrd") || ends_with(path, ".nhdr");
  if (!known) {
    throw ConfigError(path + ": cannot write a volume with this extension (use .nii.gz, .nii, "
                             ".mha, .mhd or .nrrd)");
  }
  if (!volume.data.defined() || volume.data.dim() != 4 || volume.data.numel() == 0) {
    throw IoError(path + ": cannot write: volume data must be a non-empty (C, D, H, W) tensor");
  }
  const Volume cpu{volume.data.to(at::kCPU, at::kFloat).contiguous(), volume.spacing,
                   volume.origin, volume.direction};
  if (cpu.channels() == 1) {
    write_image(io_detail::itk_from_volume(cpu, 0).GetPointer(), path);
    return;
  }
  // A vector image interleaves channels: buffer (D, H, W, C).
  const at::Tensor interleaved = cpu.data.permute({1, 2, 3, 0}).contiguous();
  const auto dhw = cpu.shape_dhw();
  auto image = io_detail::FloatVectorImage::New();
  io_detail::FloatVectorImage::SizeType size;
  size[0] = static_cast<itk::SizeValueType>(dhw[2]);
  size[1] = static_cast<itk::SizeValueType>(dhw[1]);
  size[2] = static_cast<itk::SizeValueType>(dhw[0]);
  image->SetRegions(size);
  image->SetNumberOfComponentsPerPixel(static_cast<unsigned>(cpu.channels()));
  image->GetPixelContainer()->SetImportPointer(
      interleaved.data_ptr<float>(), static_cast<itk::SizeValueType>(interleaved.numel()), false);
  io_detail::set_itk_geometry(image, cpu);
  write_image(image.GetPointer(), path);
}

void write_png(const at::Tensor& image, const std::string& path) {
  io_detail::ensure_itk_setup();
  const bool grey = image.dim() == 2;
  const bool rgb = image.dim() == 3 && image.size(2) == 3;
  if (!image.defined() || image.scalar_type() != at::kByte || !(grey || rgb) ||
      image.numel() == 0) {
    throw IoError(path + ": cannot write PNG: image must be a non-empty uint8 (H, W) or (H, W, 3) "
                         "tensor");
  }
  const at::Tensor pixels = image.cpu().contiguous();
  const int64_t h = pixels.size(0), w = pixels.size(1);
  if (grey) {
    write_image(import_2d<uint8_t>(pixels.data_ptr<uint8_t>(), h, w).GetPointer(), path);
  } else {
    using Rgb = itk::RGBPixel<uint8_t>;
    static_assert(sizeof(Rgb) == 3, "RGBPixel must be three packed bytes");
    auto* data = reinterpret_cast<Rgb*>(pixels.data_ptr<uint8_t>());
    write_image(import_2d<Rgb>(data, h, w).GetPointer(), path);
  }
}

}  // namespace mae
