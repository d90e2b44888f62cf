// mae's own reading of NIfTI-1/Analyze, MetaImage and NRRD headers, before ITK sees the file: ITK
// 5.2 repairs impossible geometry silently (pixdim 0 or NaN becomes 1, a NaN quaternion the
// identity), aborts on a non-finite sform, and allocates whatever a header claims before finding
// out that the file holds less. Each field that would be used is checked here and named in the
// refusal; the voxel bytes the header promises are counted in the file (or its decoded stream).
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "core/error.h"
#include "io/checks.h"
#include "io/io.h"

namespace mae::io_detail {
namespace {

namespace fs = std::filesystem;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

bool starts_with_gzip_magic(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  unsigned char m[2] = {0, 0};
  in.read(reinterpret_cast<char*>(m), 2);
  return in.gcount() == 2 && m[0] == 0x1f && m[1] == 0x8b;
}

// Product of sizes times bytes per element, refusing what does not fit in 63 bits.
uint64_t byte_count(const std::string& path, const std::vector<uint64_t>& sizes, uint64_t element_bytes) {
  unsigned __int128 n = element_bytes;
  for (uint64_t s : sizes) {
    n *= s;
    if (n > (unsigned __int128)(INT64_MAX)) {
      refuse(path, "the header's image size does not fit in 2^63 bytes", input_cause::kCorruptHeader);
    }
  }
  return static_cast<uint64_t>(n);
}

// ---------------------------------------------------------------------------------------------
// NIfTI-1 and Analyze 7.5 (.nii, .nii.gz, .hdr/.img, .hdr/.img.gz)

struct NiftiHeader {
  unsigned char h[348];
  bool swap = false;
  template <typename T>
  T get(int offset) const {
    T v;
    std::memcpy(&v, h + offset, sizeof(T));
    if (swap) {
      unsigned char* p = reinterpret_cast<unsigned char*>(&v);
      std::reverse(p, p + sizeof(T));
    }
    return v;
  }
  int16_t i16(int offset) const { return get<int16_t>(offset); }
  float f32(int offset) const { return get<float>(offset); }
};

// Bytes per voxel of a NIfTI datatype code; 0 for codes ITK cannot read.
unsigned nifti_bytes(int16_t datatype) {
  switch (datatype) {
    case 2:
    case 256:
      return 1;  // uint8, int8
    case 4:
    case 512:
      return 2;  // int16, uint16
    case 8:
    case 16:
    case 768:
    case 2304:
      return 4;  // int32, float32, uint32, RGBA32
    case 32:
    case 64:
    case 1024:
    case 1280:
      return 8;  // complex64, float64, int64, uint64
    case 128:
      return 3;  // RGB24
    case 1792:
      return 16;  // complex128
    default:
      return 0;
  }
}

// Header file and data file of a NIfTI/Analyze path; "" data file when it is missing.
void nifti_files(const std::string& path, std::string& header, std::string& data) {
  const std::string low = lower(path);
  header = data = path;
  const auto pick = [](const std::string& stem, const std::string& ext) {
    for (const std::string& candidate : {stem + ext, stem + ext + ".gz", stem + [&] {
                                           std::string up = ext;
                                           for (auto& c : up)
                                             c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
                                           return up;
                                         }()}) {
      std::error_code ec;
      if (fs::is_regular_file(candidate, ec)) return candidate;
    }
    return std::string();
  };
  if (ends_with(low, ".hdr") || ends_with(low, ".hdr.gz")) {
    data = pick(path.substr(0, low.rfind(".hdr")), ".img");
  } else if (ends_with(low, ".img") || ends_with(low, ".img.gz")) {
    header = pick(path.substr(0, low.rfind(".img")), ".hdr");
  }
}

PreflightResult preflight_nifti(const std::string& path) {
  std::string header_file, data_file;
  nifti_files(path, header_file, data_file);
  if (header_file.empty()) {
    refuse(path, "has no header file (" + fs::path(path).stem().string() + ".hdr) next to it",
           input_cause::kMissingFile);
  }
  NiftiHeader hdr;
  gzFile in = gzopen(header_file.c_str(), "rb");
  if (in == nullptr) refuse(path, "cannot be opened", input_cause::kMissingFile);
  std::memset(hdr.h, 0, sizeof(hdr.h));
  const int got = gzread(in, hdr.h, sizeof(hdr.h));
  gzclose(in);
  int32_t sizeof_hdr;
  std::memcpy(&sizeof_hdr, hdr.h, 4);
  hdr.swap = sizeof_hdr != 348;
  if (got != static_cast<int>(sizeof(hdr.h)) && starts_with_gzip_magic(header_file)) {
    // gzread gives up on a stream cut short or failing its CRC: say which, in the header's terms.
    VoxelData header;
    header.file = header_file;
    header.encoding = Encoding::kGzip;
    header.expected = sizeof(hdr.h);
    try {
      check_voxel_data(path, header);
    } catch (const InputError& e) {
      if (e.cause() != std::string(input_cause::kTruncatedData)) throw;
      refuse(path, "truncated: the compressed data ends inside the 348-byte NIfTI/Analyze header",
             input_cause::kTruncatedData);
    }
  }
  if (got < 4 || hdr.get<int32_t>(0) != 348) {
    refuse(path, "is not an image file mae can read (not NIfTI-1/Analyze: sizeof_hdr is not 348 in either byte order)",
           input_cause::kNotAnImage);
  }
  if (got != static_cast<int>(sizeof(hdr.h))) {
    refuse(header_file == path ? path : path + " (header " + header_file + ")",
           "truncated: the file ends inside the 348-byte NIfTI/Analyze header (" + std::to_string(got) + " bytes)",
           input_cause::kTruncatedData);
  }
  const bool nifti = std::memcmp(hdr.h + 344, "n+1", 4) == 0 || std::memcmp(hdr.h + 344, "ni1", 4) == 0;
  const bool single = std::memcmp(hdr.h + 344, "n+1", 4) == 0;
  if (data_file.empty()) {
    refuse(path, "has no voxel data file (" + fs::path(path).stem().string() + ".img) next to it",
           input_cause::kMissingFile);
  }

  // Dimensions and voxel type.
  const int16_t ndim = hdr.i16(40);
  if (ndim < 1 || ndim > 7) {
    refuse(path, "dim[0] = " + std::to_string(ndim) + ": the number of dimensions must be 1 to 7",
           input_cause::kCorruptHeader);
  }
  std::vector<uint64_t> sizes;
  for (int i = 1; i <= ndim; ++i) {
    const int16_t d = hdr.i16(40 + 2 * i);
    if (d < 1) {
      refuse(path, "dim[" + std::to_string(i) + "] = " + std::to_string(d) + ": an image size must be at least 1",
             input_cause::kCorruptHeader);
    }
    sizes.push_back(static_cast<uint64_t>(d));
  }
  const int16_t datatype = hdr.i16(70);
  const unsigned element = nifti_bytes(datatype);
  if (element == 0) {
    refuse(path, "datatype = " + std::to_string(datatype) + " is a voxel type mae cannot read",
           input_cause::kUnsupportedFormat);
  }

  // Geometry, in the fields ITK would use. xyzt_units scales pixdim to mm (ITK does the same).
  const int units = hdr.h[123] & 7;
  const double to_mm = units == 1 ? 1000.0 : units == 3 ? 0.001 : 1.0;
  for (int i = 1; i <= std::min<int>(ndim, 3); ++i) {
    const double p = hdr.f32(76 + 4 * i);
    check_spacing(path, "pixdim[" + std::to_string(i) + "]", p * to_mm, p);
  }
  if (nifti) {
    const int16_t qform_code = hdr.i16(252), sform_code = hdr.i16(254);
    if (qform_code > 0) {
      const char* names[6] = {"quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"};
      double q[3];
      for (int i = 0; i < 6; ++i) {
        const double v = hdr.f32(256 + 4 * i);
        if (i < 3) {
          check_finite(path, names[i], v);
          q[i] = v;
        } else {
          check_origin(path, names[i], v * to_mm);
        }
      }
      const double norm2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
      if (norm2 > 1.0 + 1e-3) {
        refuse(path,
               "quatern_b/c/d = (" + number_text(q[0]) + ", " + number_text(q[1]) + ", " + number_text(q[2]) +
                   ") is not a unit quaternion (b^2 + c^2 + d^2 > 1)",
               input_cause::kImpossibleGeometry);
      }
    }
    if (sform_code > 0) {
      const char* rows[3] = {"srow_x", "srow_y", "srow_z"};
      double m[3][4];
      for (int r = 0; r < 3; ++r) {
        for (int c = 0; c < 4; ++c) {
          const std::string field = std::string(rows[r]) + "[" + std::to_string(c) + "]";
          m[r][c] = hdr.f32(280 + 16 * r + 4 * c);
          if (c < 3) {
            check_finite(path, field, m[r][c]);
          } else {
            check_origin(path, field, m[r][c] * to_mm);
          }
        }
      }
      for (int c = 0; c < std::min<int>(ndim, 3); ++c) {
        const double len = std::sqrt(m[0][c] * m[0][c] + m[1][c] * m[1][c] + m[2][c] * m[2][c]);
        check_spacing(path, "the sform's axis " + std::to_string(c + 1) + " (srow_x/y/z[" + std::to_string(c) + "])",
                      len * to_mm, len);
      }
    }
  }

  // Where the voxels are and how many bytes they take.
  const float vox_offset_f = hdr.f32(108);
  if (!std::isfinite(vox_offset_f) || vox_offset_f < 0 || vox_offset_f > 1e12) {
    refuse(path, "vox_offset = " + number_text(vox_offset_f) + " is not a byte position in the file",
           input_cause::kCorruptHeader);
  }
  uint64_t vox_offset = static_cast<uint64_t>(vox_offset_f);
  if (single && vox_offset < 352) vox_offset = 352;  // the NIfTI-1 library reads a single file from 352 on
  VoxelData data;
  data.file = data_file;
  data.expected = byte_count(path, sizes, element);
  if (starts_with_gzip_magic(data_file)) {
    data.encoding = Encoding::kGzip;
    data.skip_decoded = vox_offset;
  } else {
    data.offset = vox_offset;
  }
  PreflightResult result;
  if (datatype != 16 && datatype != 64) {
    check_voxel_data(path, data);
    return result;
  }
  // ITK 5.2 turns stored NaN into 0: count non-finite float voxels in the same pass.
  const size_t bytes = datatype == 16 ? 4 : 8;
  unsigned char carry[8];
  size_t carried = 0;
  int64_t index = 0;
  const auto value = [&](const unsigned char* p) {
    unsigned char v[8];
    std::memcpy(v, p, bytes);
    if (hdr.swap) std::reverse(v, v + bytes);
    bool finite;
    if (bytes == 4) {
      float f;
      std::memcpy(&f, v, 4);
      finite = std::isfinite(f);
    } else {
      double d;
      std::memcpy(&d, v, 8);
      finite = std::isfinite(d);
    }
    if (!finite) {
      if (result.non_finite == 0) result.first_non_finite = index;
      ++result.non_finite;
    }
    ++index;
  };
  check_voxel_data(path, data, [&](const unsigned char* p, size_t n) {
    while (carried > 0 && n > 0) {
      carry[carried++] = *p++;
      --n;
      if (carried == bytes) {
        value(carry);
        carried = 0;
      }
    }
    for (; n >= bytes; n -= bytes, p += bytes) value(p);
    std::memcpy(carry, p, n);
    carried = n;
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// Text headers: MetaImage (.mha, .mhd) and NRRD (.nrrd, .nhdr)

// Parses whitespace (and for NRRD, comma and parenthesis) separated numbers; false on a word that
// is not one. "nan" and "inf" parse (and are refused by the geometry checks, naming the field).
bool parse_numbers(std::string text, std::vector<double>& out) {
  for (char& c : text) {
    if (c == ',' || c == '(' || c == ')') c = ' ';
  }
  std::istringstream in(text);
  std::string word;
  out.clear();
  while (in >> word) {
    char* end = nullptr;
    const double v = std::strtod(word.c_str(), &end);
    if (end == word.c_str() || *end != '\0') return false;
    out.push_back(v);
  }
  return true;
}

std::vector<double> numbers_of(const std::string& path, const std::string& key, const std::string& text, size_t count) {
  std::vector<double> v;
  if (!parse_numbers(text, v) || (count > 0 && v.size() != count)) {
    refuse(path,
           key + " = " + text + ": expected " + (count > 0 ? std::to_string(count) + " " : std::string()) + "numbers",
           input_cause::kCorruptHeader);
  }
  return v;
}

std::vector<uint64_t> sizes_of(const std::string& path, const std::string& key, const std::string& text, size_t count) {
  std::vector<uint64_t> sizes;
  for (double v : numbers_of(path, key, text, count)) {
    if (!(v >= 1) || v != std::floor(v) || v > 1e12) {
      refuse(path, key + " = " + text + ": image sizes must be whole numbers of at least 1",
             input_cause::kCorruptHeader);
    }
    sizes.push_back(static_cast<uint64_t>(v));
  }
  return sizes;
}

std::string field_value(const std::string& key, const std::string& text, size_t i, size_t n) {
  return key + " (value " + std::to_string(i + 1) + " of " + std::to_string(n) + " in \"" + text + "\")";
}

// Reads up to the end of a text header: lines until `stop(line)` says so, at most 1 MiB.
// `data_start` is the byte after the last header line.
std::vector<std::string> header_lines(const std::string& file, const std::function<bool(const std::string&)>& stop,
                                      uint64_t& data_start, bool& stopped) {
  std::ifstream in(file, std::ios::binary);
  std::vector<std::string> lines;
  std::string line;
  data_start = 0;
  stopped = false;
  while (data_start < (1u << 20) && std::getline(in, line)) {
    data_start = static_cast<uint64_t>(in.tellg() < 0 ? data_start + line.size() + 1 : uint64_t(in.tellg()));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
    if (stop(line)) {
      stopped = true;
      break;
    }
  }
  return lines;
}

std::string sibling(const std::string& header, const std::string& name) {
  const fs::path p(name);
  if (p.is_absolute()) return name;
  return (fs::path(header).parent_path() / p).string();
}

PreflightResult preflight_meta(const std::string& path) {
  uint64_t data_start = 0;
  bool stopped = false;
  const auto lines = header_lines(
      path, [](const std::string& l) { return lower(trim(l.substr(0, l.find('=')))) == "elementdatafile"; }, data_start,
      stopped);
  if (!stopped) return {};                    // not a MetaImage header mae understands: ITK says what it is
  std::map<std::string, std::string> fields;  // lower-case key -> value
  for (const auto& l : lines) {
    const auto eq = l.find('=');
    if (eq == std::string::npos) continue;
    fields[lower(trim(l.substr(0, eq)))] = trim(l.substr(eq + 1));
  }
  const auto has = [&](const char* k) { return fields.count(k) > 0; };
  if (!has("ndims") || !has("dimsize")) {
    refuse(path, std::string("MetaImage header lacks ") + (has("ndims") ? "DimSize" : "NDims"),
           input_cause::kCorruptHeader);
  }
  const auto ndims_v = numbers_of(path, "NDims", fields["ndims"], 1);
  if (!(ndims_v[0] >= 1 && ndims_v[0] <= 10) || ndims_v[0] != std::floor(ndims_v[0])) {
    refuse(path, "NDims = " + fields["ndims"] + ": the number of dimensions must be 1 to 10",
           input_cause::kCorruptHeader);
  }
  const size_t ndims = static_cast<size_t>(ndims_v[0]);
  const auto sizes = sizes_of(path, "DimSize", fields["dimsize"], ndims);
  const size_t spatial = std::min<size_t>(ndims, 3);
  for (const char* key : {"elementspacing", "elementsize"}) {
    if (!has(key)) continue;
    const std::string name = std::string(key) == "elementspacing" ? "ElementSpacing" : "ElementSize";
    const auto v = numbers_of(path, name, fields[key], ndims);
    for (size_t i = 0; i < spatial; ++i) check_spacing(path, field_value(name, fields[key], i, ndims), v[i], v[i]);
  }
  for (const char* key : {"offset", "origin", "position", "centerofrotation"}) {
    if (!has(key)) continue;
    const auto v = numbers_of(path, key, fields[key], ndims);
    for (size_t i = 0; i < spatial; ++i) check_origin(path, field_value(key, fields[key], i, ndims), v[i]);
  }
  for (const char* key : {"transformmatrix", "rotation", "orientation"}) {
    if (!has(key)) continue;
    const auto v = numbers_of(path, key, fields[key], ndims * ndims);
    for (size_t i = 0; i < v.size(); ++i) check_finite(path, field_value(key, fields[key], i, v.size()), v[i]);
  }

  // Voxel bytes. ASCII data, file lists and patterns are left to MetaIO.
  static const std::map<std::string, unsigned> kTypes = {{"met_char", 1},       {"met_uchar", 1}, {"met_short", 2},
                                                         {"met_ushort", 2},     {"met_int", 4},   {"met_uint", 4},
                                                         {"met_long", 4},       {"met_ulong", 4}, {"met_long_long", 8},
                                                         {"met_ulong_long", 8}, {"met_float", 4}, {"met_double", 8}};
  std::string type = lower(fields["elementtype"]);
  if (ends_with(type, "_array")) type = type.substr(0, type.size() - 6);
  const auto t = kTypes.find(type);
  if (t == kTypes.end()) return {};
  if (has("binarydata") && lower(fields["binarydata"]) == "false") return {};
  uint64_t channels = 1;
  if (has("elementnumberofchannels"))
    channels = sizes_of(path, "ElementNumberOfChannels", fields["elementnumberofchannels"], 1)[0];
  std::vector<uint64_t> all = sizes;
  all.push_back(channels);
  VoxelData data;
  data.expected = byte_count(path, all, t->second);
  const std::string file = trim(fields["elementdatafile"]);
  const std::string low = lower(file);
  if (low.rfind("list", 0) == 0 || file.find('%') != std::string::npos) return {};
  if (low == "local") {
    data.file = path;
    data.offset = data_start;
  } else {
    data.file = sibling(path, file);
    std::error_code ec;
    if (!fs::is_regular_file(data.file, ec)) {
      refuse(path, "its voxel data file " + data.file + " (ElementDataFile) does not exist", input_cause::kMissingFile);
    }
    if (has("headersize")) {
      const auto hs = numbers_of(path, "HeaderSize", fields["headersize"], 1)[0];
      if (hs == -1) {
        data.at_end = true;
      } else if (hs >= 0 && hs == std::floor(hs)) {
        data.offset = static_cast<uint64_t>(hs);
      } else {
        refuse(path, "HeaderSize = " + fields["headersize"] + " is not a byte count", input_cause::kCorruptHeader);
      }
    }
  }
  if (has("compresseddata") && lower(fields["compresseddata"]) == "true") {
    data.encoding = Encoding::kGzip;
    data.at_end = false;
    if (has("compresseddatasize")) {
      const auto cs = numbers_of(path, "CompressedDataSize", fields["compresseddatasize"], 1)[0];
      if (cs > 0 && cs == std::floor(cs)) data.compressed_limit = static_cast<uint64_t>(cs);
    }
  }
  check_voxel_data(path, data);
  return {};
}

// Bytes per value of an NRRD type name; 0 for types mae does not count ("block").
unsigned nrrd_bytes(const std::string& type) {
  const std::string t = lower(type);
  if (t == "float") return 4;
  if (t == "double") return 8;
  if (t == "block") return 0;
  if (t.find("char") != std::string::npos || t.find("int8") != std::string::npos) return 1;
  if (t.find("short") != std::string::npos || t.find("int16") != std::string::npos) return 2;
  if (t.find("long") != std::string::npos || t.find("int64") != std::string::npos) return 8;
  if (t.find("int") != std::string::npos) return 4;
  return 0;
}

PreflightResult preflight_nrrd(const std::string& path) {
  {
    std::ifstream in(path, std::ios::binary);
    char magic[8] = {};
    in.read(magic, 7);
    if (std::strncmp(magic, "NRRD000", 7) != 0) return {};  // ITK tells what it is
  }
  uint64_t data_start = 0;
  bool stopped = false;
  const auto lines = header_lines(
      path, [](const std::string& l) { return l.empty(); }, data_start, stopped);
  std::map<std::string, std::string> fields;
  std::vector<std::string> list_files;  // "data file: LIST" lines follow the header's last field
  bool in_list = false;
  for (size_t i = 1; i < lines.size(); ++i) {
    const auto& l = lines[i];
    if (l.empty() || l[0] == '#') continue;
    if (in_list) {
      list_files.push_back(trim(l));
      continue;
    }
    if (l.find(":=") != std::string::npos) continue;  // key/value pair, not a field
    const auto colon = l.find(": ");
    if (colon == std::string::npos) continue;
    std::string key = lower(trim(l.substr(0, colon)));
    key.erase(std::remove(key.begin(), key.end(), ' '), key.end());  // "data file" == "datafile"
    fields[key] = trim(l.substr(colon + 2));
    if (key == "datafile" && lower(fields[key]).rfind("list", 0) == 0) in_list = true;
  }
  const auto has = [&](const char* k) { return fields.count(k) > 0; };
  if (!has("dimension") || !has("sizes") || !has("type")) {
    refuse(path, "NRRD header lacks one of its required fields dimension, type, sizes", input_cause::kCorruptHeader);
  }
  const auto dim_v = numbers_of(path, "dimension", fields["dimension"], 1);
  if (!(dim_v[0] >= 1 && dim_v[0] <= 16) || dim_v[0] != std::floor(dim_v[0])) {
    refuse(path, "dimension = " + fields["dimension"] + ": the number of axes must be 1 to 16",
           input_cause::kCorruptHeader);
  }
  const size_t dims = static_cast<size_t>(dim_v[0]);
  const auto sizes = sizes_of(path, "sizes", fields["sizes"], dims);

  // Per-axis kinds: only domain (spatial) axes carry a spacing; "nan"/"none" is legal elsewhere.
  std::vector<bool> domain(dims, true);
  if (has("kinds")) {
    std::istringstream in(fields["kinds"]);
    std::string k;
    for (size_t i = 0; i < dims && in >> k; ++i) {
      k = lower(k);
      domain[i] = k == "domain" || k == "space" || k == "time" || k == "???" || k == "none";
    }
  }
  if (has("spacings")) {
    std::istringstream in(fields["spacings"]);
    std::string word;
    for (size_t i = 0; i < dims && in >> word; ++i) {
      if (!domain[i]) continue;
      const double v = std::strtod(word.c_str(), nullptr);
      check_spacing(path, field_value("spacings", fields["spacings"], i, dims), v, v);
    }
  }
  if (has("spacedirections")) {
    // "(a,b,c) (d,e,f) none ...": one vector (or none) per axis.
    const std::string text = fields["spacedirections"];
    size_t axis = 0, pos = 0;
    while (pos < text.size() && axis < dims) {
      const auto b = text.find_first_not_of(' ', pos);
      if (b == std::string::npos) break;
      if (text[b] == '(') {
        const auto e = text.find(')', b);
        if (e == std::string::npos) break;
        const std::string vec = text.substr(b, e - b + 1);
        const auto v = numbers_of(path, "space directions", vec, 0);
        double len2 = 0;
        for (size_t i = 0; i < v.size(); ++i) {
          check_finite(path, "space directions " + vec + " (axis " + std::to_string(axis + 1) + ")", v[i]);
          len2 += v[i] * v[i];
        }
        check_spacing(path, "the length of space directions " + vec + " (axis " + std::to_string(axis + 1) + ")",
                      std::sqrt(len2), std::sqrt(len2));
        pos = e + 1;
      } else {
        pos = text.find(' ', b);
        if (pos == std::string::npos) pos = text.size();
      }
      ++axis;
    }
  }
  if (has("spaceorigin")) {
    const auto v = numbers_of(path, "space origin", fields["spaceorigin"], 0);
    for (size_t i = 0; i < v.size(); ++i)
      check_origin(path, field_value("space origin", fields["spaceorigin"], i, v.size()), v[i]);
  }

  // Voxel bytes: raw and gzip in one attached or detached file; ascii/hex, lists and patterns are left to ITK.
  const unsigned element = nrrd_bytes(fields["type"]);
  if (element == 0) return {};
  const std::string encoding = lower(fields.count("encoding") ? fields["encoding"] : "raw");
  VoxelData data;
  if (encoding == "raw") {
    data.encoding = Encoding::kRaw;
  } else if (encoding == "gzip" || encoding == "gz") {
    data.encoding = Encoding::kGzip;
  } else if (encoding == "bzip2" || encoding == "bz2") {
    refuse(path,
           "encoding: " + fields["encoding"] +
               ": bzip2-compressed NRRD data is not supported (the NRRD reader has no bzip2); save it with "
               "encoding gzip or raw",
           input_cause::kUnsupportedFormat);
  } else {
    return {};
  }
  data.expected = byte_count(path, sizes, element);
  if (has("datafile")) {
    const std::string name = fields["datafile"];
    if (!list_files.empty() || name.find(' ') != std::string::npos) return {};  // list or sprintf pattern
    data.file = sibling(path, name);
    std::error_code ec;
    if (!fs::is_regular_file(data.file, ec)) {
      refuse(path, "its voxel data file " + data.file + " (data file) does not exist", input_cause::kMissingFile);
    }
    data.offset = 0;
  } else {
    if (!stopped) {
      refuse(path, "truncated: the file ends inside the NRRD header (no blank line before the voxel data)",
             input_cause::kTruncatedData);
    }
    data.file = path;
    data.offset = data_start;
  }
  if (has("lineskip")) {
    const auto n = numbers_of(path, "line skip", fields["lineskip"], 1)[0];
    std::ifstream in(data.file, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(data.offset));
    std::string skipped;
    for (int i = 0; i < static_cast<int>(n) && std::getline(in, skipped); ++i) {
    }
    data.offset = in ? static_cast<uint64_t>(in.tellg()) : data.offset;
  }
  if (has("byteskip")) {
    const auto n = numbers_of(path, "byte skip", fields["byteskip"], 1)[0];
    if (n == -1 && data.encoding == Encoding::kRaw) {
      data.at_end = true;
    } else if (n >= 0 && n == std::floor(n)) {
      if (data.encoding == Encoding::kRaw) {
        data.offset += static_cast<uint64_t>(n);
      } else {
        data.skip_decoded = static_cast<uint64_t>(n);
      }
    } else {
      refuse(path, "byte skip = " + fields["byteskip"] + " is not a byte count", input_cause::kCorruptHeader);
    }
  }
  check_voxel_data(path, data);
  return {};
}

}  // namespace

PreflightResult preflight_file(const std::string& path) {
  const std::string low = lower(path);
  if (ends_with(low, ".nii") || ends_with(low, ".nii.gz") || ends_with(low, ".hdr") || ends_with(low, ".hdr.gz") ||
      ends_with(low, ".img") || ends_with(low, ".img.gz")) {
    return preflight_nifti(path);
  }
  if (ends_with(low, ".mha") || ends_with(low, ".mhd")) return preflight_meta(path);
  if (ends_with(low, ".nrrd") || ends_with(low, ".nhdr")) return preflight_nrrd(path);
  return {};
}

}  // namespace mae::io_detail
