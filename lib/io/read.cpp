// read_volume and list_dicom_series: reading files and DICOM folders with ITK, and the checks ITK
// 5.2 does not make (dimensions, components, NIfTI-2, truncated DICOM, directions, non-finite
// voxels). Every failure becomes one InputError line that names the path and the problem.
#include <ATen/ATen.h>
#include <gdcmAttribute.h>
#include <gdcmReader.h>
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

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw InputError(path + ": " + problem);
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

// What the header says, before any voxel is read.
struct ImageInfo {
  std::vector<size_t> sizes;                         // per ITK axis (x, y, z, t, ...)
  unsigned components = 1;                           // values per voxel
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
    fail(path, "is " + std::to_string(dims) + "D (" + shape +
                   "); only 3D volumes, or 4D with time_point or fourth_axis_as_channels, are read");
  }
  if (info.components > 1) {
    if (dims == 4) {
      fail(path, "is 4D (" + shape + ") with " + std::to_string(info.components) +
                     " components per voxel; only one of the two can be read as channels");
    }
    if (!options.fourth_axis_as_channels) {
      fail(path, "has " + std::to_string(info.components) +
                     " components per voxel (vector or RGB pixels); set fourth_axis_as_channels "
                     "to read them as channels");
    }
  }
  if (dims == 4) {
    if (options.time_point >= 0) {
      if (options.time_point >= static_cast<int64_t>(info.sizes[3])) {
        fail(path, "is 4D (" + shape + ") with " + std::to_string(info.sizes[3]) +
                       " time points; time_point " + std::to_string(options.time_point) +
                       " is out of range");
      }
    } else if (!options.fourth_axis_as_channels) {
      fail(path, "is 4D (" + shape +
                     "); set time_point to read one volume or fourth_axis_as_channels to read "
                     "the 4th axis as channels");
    }
  }
  const bool is_2d = dims < 3 || info.sizes[2] == 1;
  if (is_2d && !options.allow_2d) {
    fail(path, "is 2D (" + shape + "); a 3D volume is expected (allow_2d reads it as depth 1)");
  }
  const double err = io_detail::orthonormality_error(info.direction);
  if (err > kOrthonormalTolerance) {
    std::ostringstream msg;
    msg << "has non-orthonormal direction cosines (largest |D^T D - I| entry " << err
        << "); fix the header or resample the image";
    fail(path, msg.str());
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
    fail(path, "is NIfTI-2 (sizeof_hdr 540), which is not supported; convert it to NIfTI-1 "
               "(e.g. nibabel: nib.Nifti1Image(img.dataobj, img.affine, img.header))");
  }
}

// Warnings turn into errors: ITK 5.2 only warns about truncated DICOM pixel data (and zero-fills),
// and a reader that had to warn produced voxels we should not train on.
void refuse_warnings(const std::string& path, const io_detail::WarningCapture& capture) {
  const auto messages = capture.messages();
  if (messages.empty()) return;
  std::string text = messages.front();
  if (text.size() > 400) text = text.substr(0, 400) + "...";
  std::string more;
  if (messages.size() > 1) more = " (and " + std::to_string(messages.size() - 1) + " more)";
  fail(path, "the reader warned, so the voxels cannot be trusted (truncated or damaged file?): " +
                 one_line(text) + more);
}


// ITK 5.2 (GDCM 3.0) reads explicit-VR DICOM whose pixel data is cut short without any warning and
// zero-fills the rest. Each uncompressed file must hold all the bytes its header promises: read
// the header up to the pixel data element and compare the bytes left in the file.
void refuse_truncated_dicom(const std::string& dir, const std::vector<std::string>& files) {
  const gdcm::Tag pixel_data(0x7fe0, 0x0010);
  for (const auto& file : files) {
    gdcm::Reader reader;
    reader.SetFileName(file.c_str());
    if (!reader.ReadUpToTag(pixel_data, std::set<gdcm::Tag>{pixel_data})) {
      fail(dir, "DICOM file " + file + " cannot be parsed");
    }
    if (reader.GetFile().GetHeader().GetDataSetTransferSyntax().IsEncapsulated()) continue;
    const gdcm::DataSet& ds = reader.GetFile().GetDataSet();
    gdcm::Attribute<0x0028, 0x0010> rows{};
    gdcm::Attribute<0x0028, 0x0011> columns{};
    gdcm::Attribute<0x0028, 0x0100> bits_allocated{};
    gdcm::Attribute<0x0028, 0x0002> samples{};
    gdcm::Attribute<0x0028, 0x0008> frames{};
    rows.SetFromDataSet(ds);
    columns.SetFromDataSet(ds);
    bits_allocated.SetFromDataSet(ds);
    samples.SetValue(1);
    if (ds.FindDataElement(samples.GetTag())) samples.SetFromDataSet(ds);
    frames.SetValue(1);
    if (ds.FindDataElement(frames.GetTag())) frames.SetFromDataSet(ds);
    const uint64_t expected = uint64_t(rows.GetValue()) * columns.GetValue() *
                              std::max<uint64_t>(1, samples.GetValue()) *
                              std::max<int64_t>(1, frames.GetValue()) *
                              ((bits_allocated.GetValue() + 7) / 8);
    std::error_code ec;
    const uint64_t size = fs::file_size(file, ec);
    const uint64_t position = reader.GetStreamCurrentPosition();
    // ReadUpToTag stops right after the pixel data element's tag and length.
    const uint64_t available = size > position ? size - position : 0;
    if (!ec && available < expected) {
      fail(dir, "DICOM file " + file + " is truncated: its pixel data needs " +
                    std::to_string(expected) + " bytes, the file holds at most " +
                    std::to_string(available));
    }
  }
}

// ITK 5.2's NiftiImageIO turns NaN voxels into 0 while reading, so non-finite values must be found
// in the file itself: for float32/float64 NIfTI-1/Analyze data, scan the stored voxels (one more
// pass of decompression). Returns the count and sets `first` to the first bad voxel's number.
int64_t count_non_finite_nifti(const std::string& path, int64_t& first) {
  auto lower = path;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const auto ends = [&](const std::string& suffix) {
    return lower.size() >= suffix.size() &&
           lower.compare(lower.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  std::string header_file = path, data_file = path;
  if (ends(".hdr") || ends(".hdr.gz")) {
    data_file = path.substr(0, lower.rfind(".hdr")) + ".img" + (ends(".gz") ? ".gz" : "");
  } else if (ends(".img") || ends(".img.gz")) {
    header_file = path.substr(0, lower.rfind(".img")) + ".hdr" + (ends(".gz") ? ".gz" : "");
  } else if (!ends(".nii") && !ends(".nii.gz")) {
    return 0;
  }
  unsigned char h[348];
  gzFile in = gzopen(header_file.c_str(), "rb");
  if (in == nullptr) return 0;
  const int got = gzread(in, h, sizeof(h));
  gzclose(in);
  if (got != static_cast<int>(sizeof(h))) return 0;
  int32_t sizeof_hdr;
  std::memcpy(&sizeof_hdr, h, 4);
  const bool swap = sizeof_hdr != 348;
  auto get16 = [&](int offset) {
    uint16_t v;
    std::memcpy(&v, h + offset, 2);
    return static_cast<int16_t>(swap ? __builtin_bswap16(v) : v);
  };
  uint32_t raw_offset;
  std::memcpy(&raw_offset, h + 108, 4);
  if (swap) raw_offset = __builtin_bswap32(raw_offset);
  float vox_offset;
  std::memcpy(&vox_offset, &raw_offset, 4);
  const int16_t datatype = get16(70);
  if (datatype != 16 && datatype != 64) return 0;  // only FLOAT32 and FLOAT64 can hold NaN
  int64_t count = 1;
  const int16_t ndim = get16(40);
  for (int i = 1; i <= ndim && i <= 7; ++i) count *= std::max<int16_t>(1, get16(40 + 2 * i));
  const size_t bytes = datatype == 16 ? 4 : 8;

  in = gzopen(data_file.c_str(), "rb");
  if (in == nullptr) return 0;
  gzbuffer(in, 1 << 18);
  if (gzseek(in, static_cast<z_off_t>(vox_offset), SEEK_SET) < 0) {
    gzclose(in);
    return 0;
  }
  std::vector<unsigned char> chunk(bytes << 16);
  int64_t done = 0, bad = 0;
  while (done < count) {
    const int64_t n = std::min<int64_t>(count - done, 1 << 16);
    const int read = gzread(in, chunk.data(), static_cast<unsigned>(n * bytes));
    if (read <= 0) break;
    const int64_t values = read / static_cast<int64_t>(bytes);
    for (int64_t i = 0; i < values; ++i) {
      unsigned char* p = chunk.data() + i * bytes;
      if (swap) std::reverse(p, p + bytes);
      bool finite;
      if (bytes == 4) {
        float f;
        std::memcpy(&f, p, 4);
        finite = std::isfinite(f);
      } else {
        double d;
        std::memcpy(&d, p, 8);
        finite = std::isfinite(d);
      }
      if (!finite) {
        if (bad == 0) first = done + i;
        ++bad;
      }
    }
    done += values;
  }
  gzclose(in);
  return bad;
}

void report_non_finite(const std::string& path, const at::Tensor& data, int64_t bad,
                       int64_t first) {
  // Report the first bad voxel as ITK index (x, y, z) and channel.
  const int64_t w = data.size(3), h = data.size(2), d = data.size(1);
  const int64_t x = first % w, y = (first / w) % h, z = (first / (w * h)) % d;
  const int64_t c = first / (w * h * d);
  fail(path, "contains " + std::to_string(bad) + " NaN or infinite voxel(s), first at index (" +
                 std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                 ") channel " + std::to_string(c));
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

void refuse_bad_direction(const std::string& path, const Volume& volume) {
  const double err = io_detail::orthonormality_error(volume.direction);
  if (err > kOrthonormalTolerance) {
    fail(path, "has non-orthonormal direction cosines (largest |D^T D - I| entry " +
                   std::to_string(err) + "); fix the header or resample the image");
  }
}

// A vector image's buffer is (D, H, W, C); a Volume wants (C, D, H, W).
Volume volume_from_vector_image(FloatVectorImage* image) {
  Volume volume;
  io_detail::get_itk_geometry(image, volume);
  const auto dhw = io_detail::dhw_from_xyz(image->GetLargestPossibleRegion().GetSize());
  const int64_t c = image->GetNumberOfComponentsPerPixel();
  const auto interleaved = at::from_blob(image->GetBufferPointer(), {dhw[0], dhw[1], dhw[2], c},
                                         at::TensorOptions().dtype(at::kFloat));
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
  if (ec) fail(path, "cannot be read (" + ec.message() + ")");
  if (bytes == 0) fail(path, "is empty (0 bytes)");
  refuse_nifti2(path);

  io_detail::WarningCapture capture;
  auto io = itk::ImageIOFactory::CreateImageIO(path.c_str(), itk::ImageIOFactory::ReadMode);
  if (!io) {
    fail(path, "is not an image file mae can read (supported: .nii, .nii.gz, .hdr/.img, .mha, "
               ".mhd, .nrrd, .nhdr, DICOM folder)");
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
    fail(path, "ITK could not read it: " + one_line(e.GetDescription()));
  }
  refuse_warnings(path, capture);
  refuse_bad_direction(path, volume);
  refuse_non_finite(path, volume.data);
  int64_t first = 0;
  const int64_t bad = count_non_finite_nifti(path, first);
  // A time_point read holds one volume of the file: only the whole file's count is meaningful.
  if (bad > 0) {
    report_non_finite(path, options.time_point >= 0 ? volume.data.expand({1 << 30, -1, -1, -1})
                                                    : volume.data,
                      bad, first);
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
    fail(dir, "cannot scan the DICOM folder: " + one_line(e.GetDescription()));
  }
  // Series details can split one SeriesInstanceUID in two; the UID alone then names neither.
  for (auto& entry : entries) {
    const auto same = std::count_if(entries.begin(), entries.end(), [&](const SeriesEntry& o) {
      return o.info.uid == entry.info.uid;
    });
    if (same > 1) entry.info.uid = entry.itk_id;
  }
  if (entries.empty()) fail(dir, "is a folder without DICOM series");
  return entries;
}

std::string describe(const std::vector<SeriesEntry>& entries) {
  std::string out;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& s = entries[i].info;
    out += (i ? "; " : "") + s.uid + " \"" + s.description + "\" (" +
           std::to_string(s.num_slices) + " slices)";
  }
  return out;
}

template <typename Image>
typename Image::Pointer read_series(const std::vector<std::string>& files) {
  auto reader = itk::ImageSeriesReader<Image>::New();
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
      fail(dir, "holds " + std::to_string(entries.size()) +
                    " DICOM series; set series_uid to one of: " + describe(entries));
    }
    chosen = &entries.front();
  } else {
    for (const auto& entry : entries) {
      if (entry.info.uid == options.series_uid || entry.itk_id == options.series_uid) {
        chosen = &entry;
      }
    }
    if (chosen == nullptr) {
      fail(dir, "has no DICOM series " + options.series_uid + "; it holds: " + describe(entries));
    }
  }

  io_detail::WarningCapture capture;
  Volume volume;
  try {
    auto io = itk::GDCMImageIO::New();
    io->SetFileName(chosen->files.front());
    io->ReadImageInformation();
    ImageInfo info = info_from_io(io);
    if (info.sizes.size() >= 3 && info.sizes[2] > 1 && chosen->files.size() > 1) {
      fail(dir, "series " + chosen->info.uid + " has " + std::to_string(chosen->files.size()) +
                    " multi-frame files; only one multi-frame file or single-frame slices are read");
    }
    // The series is a stack of the first file's slices: its header stands for the whole.
    info.sizes.resize(2);
    info.sizes.push_back(chosen->files.size() > 1 ? chosen->files.size()
                                                  : io->GetNumberOfDimensions() > 2
                                                        ? io->GetDimensions(2)
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
    fail(dir, "ITK could not read DICOM series " + chosen->info.uid + ": " +
                  one_line(e.GetDescription()));
  }
  refuse_warnings(dir, capture);
  refuse_truncated_dicom(dir, chosen->files);
  refuse_bad_direction(dir, volume);
  refuse_non_finite(dir, volume.data);
  return volume;
}

}  // namespace

Volume read_volume(const std::string& path, const ReadOptions& options) {
  io_detail::ensure_itk_setup();
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) fail(path, "does not exist");
  if (fs::is_directory(status)) return read_dicom_dir(path, options);
  return read_file(path, options);
}

std::vector<DicomSeriesInfo> list_dicom_series(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, "is not a folder");
  std::vector<DicomSeriesInfo> out;
  for (const auto& entry : scan_dicom_dir(dir)) out.push_back(entry.info);
  return out;
}

}  // namespace mae
