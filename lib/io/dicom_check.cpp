// Checks on one DICOM series before ITK reads it. ITK stacks the files in the order GDCM sorted them
// and derives the slice spacing from the first and last position only; it warns (for 1e-4 relative
// deviation, so for ordinary scanner jitter) but reads gaps, duplicates and mixed orientations
// anyway, and zero-fills pixel data that is cut short. Here the positions along the slice normal
// are computed from each file's header and judged against a stated tolerance, and each file's
// pixel data must be complete (uncompressed) or decode (compressed transfer syntaxes).
#include <gdcmAttribute.h>
#include <gdcmImageReader.h>
#include <gdcmReader.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "io/checks.h"
#include "io/io.h"

namespace mae::io_detail {
namespace {

namespace fs = std::filesystem;

// Largest difference between two files' ImageOrientationPatient values (direction cosines written
// as decimal strings, typically to 6 digits) that still counts as the same orientation.
constexpr double kOrientationTolerance = 1e-3;

std::string name_of(const std::string& file) { return fs::path(file).filename().string(); }

std::string mm(double v) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(std::abs(v) < 100 ? 2 : 1);
  s << v;
  return s.str();
}

// Values of a DS (decimal string) element; empty when absent. Unparsable values become NaN.
std::vector<double> ds_values(const gdcm::DataSet& ds, const gdcm::Tag& tag) {
  std::vector<double> out;
  if (!ds.FindDataElement(tag)) return out;
  const gdcm::DataElement& de = ds.GetDataElement(tag);
  const gdcm::ByteValue* bv = de.GetByteValue();
  if (bv == nullptr) return out;
  std::string text(bv->GetPointer(), bv->GetLength());
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, '\\')) {
    const auto b = item.find_first_not_of(" \0", 0, 2);
    if (b == std::string::npos) {
      out.push_back(std::nan(""));
      continue;
    }
    char* end = nullptr;
    const double v = std::strtod(item.c_str() + b, &end);
    const std::string rest = end ? std::string(end) : "";
    out.push_back(end == item.c_str() + b || rest.find_first_not_of(std::string(" \0", 2)) != std::string::npos
                      ? std::nan("")
                      : v);
  }
  return out;
}

struct Slice {
  std::string file;
  double position = 0;  // along the slice normal, mm
};

void check_pixel_data(const std::string& dir, const std::string& file, gdcm::Reader& reader) {
  const gdcm::DataSet& ds = reader.GetFile().GetDataSet();
  const bool encapsulated = reader.GetFile().GetHeader().GetDataSetTransferSyntax().IsEncapsulated();
  if (encapsulated) {
    // Compressed pixel data: only decoding tells whether every fragment is there and intact.
    gdcm::ImageReader image_reader;
    image_reader.SetFileName(file.c_str());
    if (!image_reader.Read()) {
      refuse(dir, "DICOM file " + file + " is truncated or damaged: its compressed pixel data cannot be parsed",
             input_cause::kTruncatedData);
    }
    const gdcm::Image& image = image_reader.GetImage();
    std::vector<char> buffer(image.GetBufferLength());
    if (buffer.empty() || !image.GetBuffer(buffer.data())) {
      refuse(dir, "DICOM file " + file + ": its compressed pixel data does not decode (cut short or damaged)",
             input_cause::kCorruptCompressed);
    }
    return;
  }
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
  if (rows.GetValue() == 0 || columns.GetValue() == 0) {
    refuse(dir, "DICOM file " + file + " has Rows or Columns 0: it holds no image", input_cause::kCorruptHeader);
  }
  const uint64_t expected = uint64_t(rows.GetValue()) * columns.GetValue() * std::max<uint64_t>(1, samples.GetValue()) *
                            std::max<int64_t>(1, frames.GetValue()) * ((bits_allocated.GetValue() + 7) / 8);
  std::error_code ec;
  const uint64_t size = fs::file_size(file, ec);
  const uint64_t position = reader.GetStreamCurrentPosition();
  // ReadUpToTag stops right after the pixel data element's tag and length.
  const uint64_t available = size > position ? size - position : 0;
  if (!ec && available < expected) {
    refuse(dir,
           "DICOM file " + file + " is truncated: its pixel data needs " + with_commas(expected) +
               " bytes, the file holds at most " + with_commas(available),
           input_cause::kTruncatedData);
  }
}

}  // namespace

void check_dicom_series(const std::string& dir, const std::string& series, const std::vector<std::string>& files,
                        double tolerance) {
  const gdcm::Tag pixel_data(0x7fe0, 0x0010);
  const gdcm::Tag ipp_tag(0x0020, 0x0032), iop_tag(0x0020, 0x0037), spacing_tag(0x0028, 0x0030);
  std::vector<Slice> slices;
  std::array<double, 6> first_iop{};
  std::string first_iop_file;
  std::array<double, 3> normal{};
  bool geometry_known = true;
  for (const auto& file : files) {
    gdcm::Reader reader;
    reader.SetFileName(file.c_str());
    if (!reader.ReadUpToTag(pixel_data, std::set<gdcm::Tag>{pixel_data})) {
      refuse(dir, "DICOM file " + file + " cannot be parsed (damaged or not DICOM)", input_cause::kNotAnImage);
    }
    const gdcm::DataSet& ds = reader.GetFile().GetDataSet();
    const auto spacing = ds_values(ds, spacing_tag);
    for (size_t i = 0; i < spacing.size() && i < 2; ++i) {
      check_spacing(dir, "DICOM file " + name_of(file) + ": PixelSpacing (0028,0030) value " + std::to_string(i + 1),
                    spacing[i], spacing[i]);
    }
    check_pixel_data(dir, file, reader);
    const auto ipp = ds_values(ds, ipp_tag);
    const auto iop = ds_values(ds, iop_tag);
    if (ipp.size() != 3 || iop.size() != 6) {
      geometry_known = false;
      continue;
    }
    for (size_t i = 0; i < 3; ++i) {
      check_origin(dir,
                   "DICOM file " + name_of(file) + ": ImagePositionPatient (0020,0032) value " + std::to_string(i + 1),
                   ipp[i]);
    }
    for (size_t i = 0; i < 6; ++i) {
      check_finite(
          dir, "DICOM file " + name_of(file) + ": ImageOrientationPatient (0020,0037) value " + std::to_string(i + 1),
          iop[i]);
    }
    if (first_iop_file.empty()) {
      std::copy(iop.begin(), iop.end(), first_iop.begin());
      first_iop_file = file;
      const double* r = first_iop.data();
      const double* c = first_iop.data() + 3;
      normal = {r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]};
      const double n = std::sqrt(normal[0] * normal[0] + normal[1] * normal[1] + normal[2] * normal[2]);
      if (!(n > 0.5)) {
        refuse(dir,
               "DICOM file " + name_of(file) +
                   ": ImageOrientationPatient (0020,0037) rows and columns are not perpendicular unit vectors",
               input_cause::kImpossibleGeometry);
      }
      for (double& v : normal) v /= n;
    } else {
      double diff = 0;
      for (size_t i = 0; i < 6; ++i) diff = std::max(diff, std::abs(iop[i] - first_iop[i]));
      if (diff > kOrientationTolerance) {
        refuse(dir,
               "series " + series + " mixes slice orientations: " + name_of(file) + " and " + name_of(first_iop_file) +
                   " differ in ImageOrientationPatient (0020,0037) by up to " + number_text(diff),
               input_cause::kDicomSliceSpacing);
      }
    }
    slices.push_back({file, ipp[0] * normal[0] + ipp[1] * normal[1] + ipp[2] * normal[2]});
  }
  if (files.size() < 2) return;
  if (!geometry_known) {
    // Without positions ITK stacks the files at 1 mm: refuse rather than invent a geometry.
    refuse(dir,
           "series " + series +
               " has files without ImagePositionPatient/ImageOrientationPatient, so its slice positions are unknown",
           input_cause::kDicomSliceSpacing);
  }
  std::sort(slices.begin(), slices.end(), [](const Slice& a, const Slice& b) { return a.position < b.position; });
  std::vector<double> gaps;
  for (size_t i = 1; i < slices.size(); ++i) gaps.push_back(slices[i].position - slices[i - 1].position);
  std::vector<double> sorted = gaps;
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  const double median = sorted[sorted.size() / 2];
  for (size_t i = 0; i < gaps.size(); ++i) {
    const Slice& a = slices[i];
    const Slice& b = slices[i + 1];
    // Two images at one position: several echoes, phases or a copied file in one series.
    if (gaps[i] <= std::max(1e-3, 1e-3 * median)) {
      refuse(dir,
             "series " + series + " has two slices at the same position z=" + mm(a.position) + " mm (" +
                 name_of(a.file) + " and " + name_of(b.file) +
                 "): several images per position (echoes, time points?) or a copied file",
             input_cause::kDicomSliceSpacing);
    }
  }
  for (size_t i = 0; i < gaps.size(); ++i) {
    const Slice& a = slices[i];
    const Slice& b = slices[i + 1];
    // A gap of one and a half spacings or more is a missing slice; a smaller deviation is unevenness.
    if (gaps[i] > (1 + tolerance) * median && gaps[i] >= 1.5 * median) {
      const double missing = gaps[i] / median - 1;
      refuse(dir,
             "series " + series + ": missing slice" + (missing > 1.5 ? "s" : "") + " between z=" + mm(a.position) +
                 " and z=" + mm(b.position) + " mm (" + name_of(a.file) + ", " + name_of(b.file) + "): " + mm(gaps[i]) +
                 " mm apart, the series' slice spacing is " + mm(median) + " mm (tolerance " +
                 number_text(tolerance * 100) + " %)",
             input_cause::kDicomSliceSpacing);
    }
    if (std::abs(gaps[i] - median) > tolerance * median) {
      refuse(dir,
             "series " + series + ": uneven slice spacing: z=" + mm(a.position) + " and z=" + mm(b.position) + " mm (" +
                 name_of(a.file) + ", " + name_of(b.file) + ") are " + mm(gaps[i]) +
                 " mm apart, the series' slice spacing is " + mm(median) + " mm (tolerance " +
                 number_text(tolerance * 100) + " %)",
             input_cause::kDicomSliceSpacing);
    }
  }
}

}  // namespace mae::io_detail
