// read_volume and list_dicom_series: reading files and DICOM folders with ITK, and the checks ITK
// 5.2 does not make (headers and voxel byte counts before ITK sees a file, see checks.h; then
// dimensions, components, NIfTI-2, directions, non-finite voxels). Every failure becomes one
// InputError line that names the path and the problem, with a cause from io.h's input_cause.
#include <ATen/ATen.h>
#include <itkGDCMImageIO.h>
#include <itkGDCMSeriesFileNames.h>
#include <itkImageFileReader.h>
#include <itkImageIOFactory.h>
#include <itkImageSeriesReader.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/checks.h"
#include "io/io.h"
#include "io/itk_bridge.h"

namespace mae {
namespace {

namespace fs = std::filesystem;
using io_detail::FloatImage;
using io_detail::FloatImage4;
using io_detail::FloatVectorImage;

// Largest tolerated |D^T D - I| entry: NIfTI stores directions as float32 and DICOM as decimal
// strings, so real files are off by ~1e-6; sheared headers are off by far more.
constexpr double kOrthonormalTolerance = 1e-3;

[[noreturn]] void fail(const std::string& path, const std::string& problem, const char* cause) {
  throw InputError(path + ": " + problem, cause);
}

// ITK descriptions span lines; an error message must be one line.
std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  const auto last = text.find_last_not_of(' ');
  text.erase(last == std::string::npos ? 0 : last + 1);
  return text;
}

std::string trim(std::string s) {
  const auto not_space = [](char c) { return c != ' ' && c != '\0' && c != '\t'; };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

std::string join_sizes(const std::vector<size_t>& sizes) {
  std::string out;
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? "x" : "") + std::to_string(sizes[i]);
  return out;
}

// What an image with fewer than three axes longer than one voxel is, in words.
std::string describe_small(const std::vector<size_t>& sizes, size_t long_axes) {
  const std::string shape = join_sizes(sizes);
  if (long_axes == 0) return "is a single voxel (" + shape + "), not a volume";
  if (long_axes == 1) {
    size_t n = 1;
    for (size_t s : sizes) n = std::max(n, s);
    return "is 1D: a single line of " + std::to_string(n) + " voxels (" + shape + "), not a volume";
  }
  return "is 2D: a single slice (" + shape + ")";
}

// What the header says, before any voxel is read.
struct ImageInfo {
  std::vector<size_t> sizes;                                   // per ITK axis (x, y, z, t, ...)
  unsigned components = 1;                                     // values per voxel
  std::array<double, 9> direction{1, 0, 0, 0, 1, 0, 0, 0, 1};  // spatial 3x3, row-major
};

ImageInfo info_from_io(itk::ImageIOBase* io) {
  ImageInfo info;
  const unsigned dims = io->GetNumberOfDimensions();
  for (unsigned i = 0; i < dims; ++i) info.sizes.push_back(io->GetDimensions(i));
  info.components = io->GetNumberOfComponents();
  const unsigned spatial = std::min(dims, 3u);
  for (unsigned col = 0; col < spatial; ++col) {
    const auto axis = io->GetDirection(col);
    for (unsigned row = 0; row < spatial && row < axis.size(); ++row) {
      info.direction[row * 3 + col] = axis[row];
    }
  }
  return info;
}

// How the voxels will be read once the header passed the checks.
enum class Layout { kScalar3d, kFourD, kVector3d };

// The checks on the header. Returns the layout to read with.
Layout check_info(const std::string& path, ImageInfo info, const ReadOptions& options) {
  // Trailing axes of size 1 carry nothing (a NIfTI may say 5D with nt = nu = 1).
  while (info.sizes.size() > 3 && info.sizes.back() == 1) info.sizes.pop_back();
  const std::string shape = join_sizes(info.sizes);
  const size_t dims = info.sizes.size();
  if (dims >= 5) {
    fail(path,
         "is " + std::to_string(dims) + "D (" + shape +
             "); only 3D volumes, or 4D with time_point or fourth_axis_as_channels, are read",
         input_cause::kUnsupportedDimensions);
  }
  if (info.components > 1) {
    if (dims == 4) {
      fail(path,
           "is 4D (" + shape + ") with " + std::to_string(info.components) +
               " components per voxel; only one of the two can be read as channels",
           input_cause::kUnsupportedDimensions);
    }
    if (!options.fourth_axis_as_channels) {
      fail(path,
           "has " + std::to_string(info.components) +
               " components per voxel (vector or RGB pixels); set fourth_axis_as_channels "
               "to read them as channels",
           input_cause::kUnsupportedDimensions);
    }
  }
  if (dims == 4) {
    if (options.time_point >= 0) {
      if (options.time_point >= static_cast<int64_t>(info.sizes[3])) {
        fail(path,
             "is 4D (" + shape + ") with " + std::to_string(info.sizes[3]) + " time points; time_point " +
                 std::to_string(options.time_point) + " is out of range",
             input_cause::kUnsupportedDimensions);
      }
    } else if (!options.fourth_axis_as_channels) {
      fail(path,
           "is 4D (" + shape +
               "); set time_point to read one volume or fourth_axis_as_channels to read "
               "the 4th axis as channels",
           input_cause::kUnsupportedDimensions);
    }
  }
  // A volume has three axes longer than one voxel; fewer is a slice, a line or a single voxel.
  size_t long_axes = 0;
  for (size_t i = 0; i < std::min<size_t>(dims, 3); ++i) long_axes += info.sizes[i] > 1 ? 1 : 0;
  if (long_axes < 2) {
    fail(path, describe_small(info.sizes, long_axes) + "; at least a 2D slice is needed",
         input_cause::kUnsupportedDimensions);
  }
  if (long_axes == 2 && !options.allow_2d) {
    fail(path,
         describe_small(info.sizes, long_axes) +
             "; a 3D volume is expected (allow_2d reads a slice as a volume "
             "one voxel thick)",
         input_cause::kUnsupportedDimensions);
  }
  const double err = io_detail::orthonormality_error(info.direction);
  if (err > kOrthonormalTolerance) {
    std::ostringstream msg;
    msg << "has non-orthonormal direction cosines (largest |D^T D - I| entry " << err
        << "); fix the header or resample the image";
    fail(path, msg.str(), input_cause::kImpossibleGeometry);
  }
  if (dims == 4) return Layout::kFourD;
  return info.components > 1 ? Layout::kVector3d : Layout::kScalar3d;
}

// NIfTI-2 starts with sizeof_hdr = 540 (NIfTI-1: 348), in either byte order; gzread reads plain
// and gzipped files alike.
void refuse_nifti2(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) return;  // ITK reports the open failure with its own words below
  uint8_t head[4] = {0, 0, 0, 0};
  const int got = gzread(file, head, 4);
  gzclose(file);
  if (got != 4) return;
  const uint32_t little = head[0] | (head[1] << 8) | (head[2] << 16) | (uint32_t(head[3]) << 24);
  const uint32_t big = head[3] | (head[2] << 8) | (head[1] << 16) | (uint32_t(head[0]) << 24);
  if (little == 540 || big == 540) {
    fail(path,
         "is NIfTI-2 (sizeof_hdr 540), which is not supported; convert it to NIfTI-1 "
         "(e.g. nibabel: nib.Nifti1Image(img.dataobj, img.affine, img.header))",
         input_cause::kUnsupportedFormat);
  }
}

// What a reader's warning means, in a user's words; the raw ITK/GDCM text is not shown.
std::string explain_warning(const std::string& text) {
  const auto has = [&](const char* needle) { return text.find(needle) != std::string::npos; };
  if (has("orthonormal")) return "its orientation (qform/sform or direction cosines) is not a rotation";
  if (has("Non uniform sampling") || has("missing slices")) return "its slices are not evenly spaced";
  if (has("not read completely") || has("runcat") || has("premature") || has("Premature")) {
    return "the voxel data is shorter than the header promises";
  }
  if (has("GDCM") || has("gdcm")) return "the DICOM decoder reported a damaged or unusual file";
  return "the image reader reported a damaged or unusual file";
}

// Warnings turn into errors: a reader that had to warn produced voxels we should not train on.
// The checks before ITK catch the known cases with better words; this is the net below them.
void refuse_warnings(const std::string& path, const io_detail::WarningCapture& capture) {
  const auto messages = capture.messages();
  if (messages.empty()) return;
  std::string more;
  if (messages.size() > 1) more = " (and " + std::to_string(messages.size() - 1) + " more warnings)";
  fail(path, "refused because " + explain_warning(messages.front()) + more + ", so its voxels cannot be trusted",
       input_cause::kUnreadable);
}

void report_non_finite(const std::string& path, const at::Tensor& data, int64_t bad, int64_t first) {
  // Report the first bad voxel as ITK index (x, y, z) and channel.
  const int64_t w = data.size(3), h = data.size(2), d = data.size(1);
  const int64_t x = first % w, y = (first / w) % h, z = (first / (w * h)) % d;
  const int64_t c = first / (w * h * d);
  fail(path,
       "contains " + std::to_string(bad) + " NaN or infinite voxel(s), first at index (" + std::to_string(x) + ", " +
           std::to_string(y) + ", " + std::to_string(z) + ") channel " + std::to_string(c),
       input_cause::kNonFiniteVoxels);
}

void refuse_non_finite(const std::string& path, const at::Tensor& data) {
  const float* p = data.data_ptr<float>();
  const int64_t n = data.numel();
  int64_t bad = 0;
  int64_t first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  if (bad > 0) report_non_finite(path, data, bad, first);
}

// The geometry ITK produced, whatever the format: the net below the per-format header checks.
void refuse_bad_geometry(const std::string& path, const Volume& volume) {
  for (int i = 0; i < 3; ++i) {
    io_detail::check_spacing(path, std::string("spacing along ") + "xyz"[i], volume.spacing[i], volume.spacing[i]);
    io_detail::check_origin(path, std::string("origin ") + "xyz"[i], volume.origin[i]);
  }
  for (int i = 0; i < 9; ++i) {
    io_detail::check_finite(path, "direction cosine " + std::to_string(i / 3) + "," + std::to_string(i % 3),
                            volume.direction[i]);
  }
  const double err = io_detail::orthonormality_error(volume.direction);
  if (err > kOrthonormalTolerance) {
    fail(path,
         "has non-orthonormal direction cosines (largest |D^T D - I| entry " + std::to_string(err) +
             "); fix the header or resample the image",
         input_cause::kImpossibleGeometry);
  }
}

// A vector image's buffer is (D, H, W, C); a Volume wants (C, D, H, W).
Volume volume_from_vector_image(FloatVectorImage* image) {
  Volume volume;
  io_detail::get_itk_geometry(image, volume);
  const auto dhw = io_detail::dhw_from_xyz(image->GetLargestPossibleRegion().GetSize());
  const int64_t c = image->GetNumberOfComponentsPerPixel();
  const auto interleaved =
      at::from_blob(image->GetBufferPointer(), {dhw[0], dhw[1], dhw[2], c}, at::TensorOptions().dtype(at::kFloat));
  volume.data = interleaved.permute({3, 0, 1, 2}).contiguous();
  return volume;
}

// A 4D image's buffer is (T, D, H, W) already: the 4th axis becomes channels without reordering.
Volume volume_from_4d(FloatImage4* image, int64_t time_point) {
  Volume volume;
  const auto size = image->GetLargestPossibleRegion().GetSize();
  for (unsigned i = 0; i < 3; ++i) {
    volume.spacing[i] = image->GetSpacing()[i];
    volume.origin[i] = image->GetOrigin()[i];
    for (unsigned j = 0; j < 3; ++j) volume.direction[i * 3 + j] = image->GetDirection()(i, j);
  }
  const auto all = at::from_blob(image->GetBufferPointer(),
                                 {static_cast<int64_t>(size[3]), static_cast<int64_t>(size[2]),
                                  static_cast<int64_t>(size[1]), static_cast<int64_t>(size[0])},
                                 at::TensorOptions().dtype(at::kFloat));
  volume.data = time_point >= 0 ? all.narrow(0, time_point, 1).clone() : all.clone();
  return volume;
}

Volume read_file(const std::string& path, const ReadOptions& options) {
  std::error_code ec;
  const auto bytes = fs::file_size(path, ec);
  if (ec) fail(path, "cannot be read (" + ec.message() + ")", input_cause::kMissingFile);
  if (bytes == 0) fail(path, "is empty (0 bytes)", input_cause::kNotAnImage);
  refuse_nifti2(path);
  const io_detail::PreflightResult preflight = io_detail::preflight_file(path);

  io_detail::WarningCapture capture;
  auto io = itk::ImageIOFactory::CreateImageIO(path.c_str(), itk::ImageIOFactory::ReadMode);
  if (!io) {
    fail(path,
         "is not an image file mae can read (supported: .nii, .nii.gz, .hdr/.img, .mha, "
         ".mhd, .nrrd, .nhdr, DICOM folder)",
         input_cause::kNotAnImage);
  }
  Volume volume;
  try {
    io->SetFileName(path);
    io->ReadImageInformation();
    const Layout layout = check_info(path, info_from_io(io), options);
    switch (layout) {
      case Layout::kScalar3d: {
        auto reader = itk::ImageFileReader<FloatImage>::New();
        reader->SetImageIO(io);
        reader->SetFileName(path);
        reader->Update();
        volume = io_detail::volume_from_itk(reader->GetOutput());
        break;
      }
      case Layout::kVector3d: {
        auto reader = itk::ImageFileReader<FloatVectorImage>::New();
        reader->SetImageIO(io);
        reader->SetFileName(path);
        reader->Update();
        volume = volume_from_vector_image(reader->GetOutput());
        break;
      }
      case Layout::kFourD: {
        auto reader = itk::ImageFileReader<FloatImage4>::New();
        reader->SetImageIO(io);
        reader->SetFileName(path);
        reader->Update();
        volume = volume_from_4d(reader->GetOutput(), options.time_point);
        break;
      }
    }
  } catch (const itk::ExceptionObject& e) {
    fail(path, "ITK could not read it: " + one_line(e.GetDescription()), input_cause::kUnreadable);
  }
  refuse_warnings(path, capture);
  refuse_bad_geometry(path, volume);
  refuse_non_finite(path, volume.data);
  // A time_point read holds one volume of the file: only the whole file's count is meaningful.
  if (preflight.non_finite > 0) {
    report_non_finite(path, options.time_point >= 0 ? volume.data.expand({1 << 30, -1, -1, -1}) : volume.data,
                      preflight.non_finite, preflight.first_non_finite);
  }
  return volume;
}

// One series of a folder: what the user sees, plus ITK's identifier and the sorted files.
struct SeriesEntry {
  DicomSeriesInfo info;
  std::string itk_id;
  std::vector<std::string> files;
};

std::vector<SeriesEntry> scan_dicom_dir(const std::string& dir) {
  io_detail::ensure_itk_setup();
  io_detail::WarningCapture capture;  // GDCM chatters about non-DICOM files while scanning
  std::vector<SeriesEntry> entries;
  try {
    auto names = itk::GDCMSeriesFileNames::New();
    names->SetUseSeriesDetails(true);  // splits series whose slices differ in size or orientation
    names->SetDirectory(dir);
    for (const auto& id : names->GetSeriesUIDs()) {
      SeriesEntry entry;
      entry.itk_id = id;
      entry.files = names->GetFileNames(id);
      entry.info.num_slices = static_cast<int64_t>(entry.files.size());
      entry.info.uid = id;
      if (!entry.files.empty()) {
        auto io = itk::GDCMImageIO::New();
        io->SetFileName(entry.files.front());
        io->ReadImageInformation();
        std::string value;
        if (io->GetValueFromTag("0020|000e", value)) entry.info.uid = trim(value);
        value.clear();
        if (io->GetValueFromTag("0008|103e", value)) entry.info.description = trim(value);
      }
      entries.push_back(std::move(entry));
    }
  } catch (const itk::ExceptionObject& e) {
    fail(dir, "cannot scan the DICOM folder: " + one_line(e.GetDescription()), input_cause::kUnreadable);
  }
  // Series details can split one SeriesInstanceUID in two; the UID alone then names neither.
  for (auto& entry : entries) {
    const auto same = std::count_if(entries.begin(), entries.end(),
                                    [&](const SeriesEntry& o) { return o.info.uid == entry.info.uid; });
    if (same > 1) entry.info.uid = entry.itk_id;
  }
  if (entries.empty()) fail(dir, "is a folder without DICOM series", input_cause::kNotAnImage);
  return entries;
}

std::string describe(const std::vector<SeriesEntry>& entries) {
  std::string out;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& s = entries[i].info;
    out += (i ? "; " : "") + s.uid + " \"" + s.description + "\" (" + std::to_string(s.num_slices) + " slices)";
  }
  return out;
}

template <typename Image>
typename Image::Pointer read_series(const std::vector<std::string>& files) {
  auto reader = itk::ImageSeriesReader<Image>::New();
  // check_dicom_series judged the slice spacing already, with a stated tolerance.
  reader->SetSpacingWarningRelThreshold(1e30);
  reader->SetImageIO(itk::GDCMImageIO::New());
  reader->SetFileNames(files);
  reader->Update();
  typename Image::Pointer image = reader->GetOutput();
  image->DisconnectPipeline();
  return image;
}

Volume read_dicom_dir(const std::string& dir, const ReadOptions& options) {
  const auto entries = scan_dicom_dir(dir);
  const SeriesEntry* chosen = nullptr;
  if (options.series_uid.empty()) {
    if (entries.size() > 1) {
      fail(dir,
           "holds " + std::to_string(entries.size()) + " DICOM series; set series_uid to one of: " + describe(entries),
           input_cause::kAmbiguousSeries);
    }
    chosen = &entries.front();
  } else {
    for (const auto& entry : entries) {
      if (entry.info.uid == options.series_uid || entry.itk_id == options.series_uid) {
        chosen = &entry;
      }
    }
    if (chosen == nullptr) {
      fail(dir, "has no DICOM series " + options.series_uid + "; it holds: " + describe(entries),
           input_cause::kAmbiguousSeries);
    }
  }

  if (!(options.slice_spacing_tolerance >= 0 && options.slice_spacing_tolerance < 1)) {
    throw ConfigError("slice_spacing_tolerance must be in [0, 1), got " +
                      io_detail::number_text(options.slice_spacing_tolerance));
  }
  {
    io_detail::WarningCapture quiet;  // GDCM's notes while parsing headers; the checks refuse on their own
    io_detail::check_dicom_series(dir, chosen->info.uid, chosen->files, options.slice_spacing_tolerance);
  }
  io_detail::WarningCapture capture;
  Volume volume;
  try {
    auto io = itk::GDCMImageIO::New();
    io->SetFileName(chosen->files.front());
    io->ReadImageInformation();
    ImageInfo info = info_from_io(io);
    if (info.sizes.size() >= 3 && info.sizes[2] > 1 && chosen->files.size() > 1) {
      fail(dir,
           "series " + chosen->info.uid + " has " + std::to_string(chosen->files.size()) +
               " multi-frame files; only one multi-frame file or single-frame slices are read",
           input_cause::kUnsupportedFormat);
    }
    // The series is a stack of the first file's slices: its header stands for the whole.
    info.sizes.resize(2);
    info.sizes.push_back(chosen->files.size() > 1          ? chosen->files.size()
                         : io->GetNumberOfDimensions() > 2 ? io->GetDimensions(2)
                                                           : 1);
    const Layout layout = check_info(dir, info, options);
    if (layout == Layout::kVector3d) {
      auto image = read_series<FloatVectorImage>(chosen->files);
      volume = volume_from_vector_image(image);
    } else {
      auto image = read_series<FloatImage>(chosen->files);
      volume = io_detail::volume_from_itk(image);
    }
  } catch (const itk::ExceptionObject& e) {
    fail(dir, "ITK could not read DICOM series " + chosen->info.uid + ": " + one_line(e.GetDescription()),
         input_cause::kUnreadable);
  }
  refuse_warnings(dir, capture);
  refuse_bad_geometry(dir, volume);
  refuse_non_finite(dir, volume.data);
  return volume;
}

}  // namespace

Volume read_volume(const std::string& path, const ReadOptions& options) {
  io_detail::ensure_itk_setup();
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) fail(path, "does not exist", input_cause::kMissingFile);
  if (fs::is_directory(status)) return read_dicom_dir(path, options);
  return read_file(path, options);
}

std::vector<DicomSeriesInfo> list_dicom_series(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, "is not a folder", input_cause::kMissingFile);
  std::vector<DicomSeriesInfo> out;
  for (const auto& entry : scan_dicom_dir(dir)) out.push_back(entry.info);
  return out;
}

}  // namespace mae
