// Counting the voxel bytes a file really holds, before ITK reads it: raw data by file size, gzip
// and zlib streams by decoding them chunk by chunk into a fixed buffer (nothing the size of
// the image is allocated), with the stream's own checksum verified. Also the shared refusal
// helpers and the geometry bounds of checks.h.
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "io/checks.h"
#include "io/io.h"

namespace mae::io_detail {
namespace {

namespace fs = std::filesystem;

constexpr size_t kChunk = 1 << 18;

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// Hands decoded bytes to the sink, dropping the first `skip` and everything past `expected`.
class Delivery {
 public:
  Delivery(const VoxelData& data, const ByteSink& sink) : data_(data), sink_(sink) {}
  void add(const unsigned char* p, size_t n) {
    decoded_ += n;
    if (!sink_) return;
    const uint64_t start = decoded_ - n;  // decoded offset of p[0]
    const uint64_t lo = std::max(start, data_.skip_decoded);
    const uint64_t hi = std::min(decoded_, data_.skip_decoded + data_.expected);
    if (hi > lo) sink_(p + (lo - start), static_cast<size_t>(hi - lo));
  }
  uint64_t decoded() const { return decoded_; }
  uint64_t voxel_bytes() const { return decoded_ > data_.skip_decoded ? decoded_ - data_.skip_decoded : 0; }

 private:
  const VoxelData& data_;
  const ByteSink& sink_;
  uint64_t decoded_ = 0;
};

[[noreturn]] void refuse_short_stream(const std::string& path, const char* what, const Delivery& out,
                                      const VoxelData& data) {
  refuse(path,
         std::string("truncated: the ") + what + " data ends after " + with_commas(out.voxel_bytes()) + " of " +
             with_commas(data.expected) + " voxel bytes",
         input_cause::kTruncatedData);
}

// Reads up to `want` bytes, honouring the compressed_limit.
size_t read_some(std::FILE* f, unsigned char* buf, size_t want, uint64_t& left) {
  if (left < want) want = static_cast<size_t>(left);
  const size_t got = std::fread(buf, 1, want, f);
  left -= got;
  return got;
}

void check_gzip(const std::string& path, std::FILE* f, const VoxelData& data, Delivery& out) {
  std::vector<unsigned char> in(kChunk), buf(kChunk);
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 32) != Z_OK) throw IoError(path + ": cannot start zlib");  // gzip or zlib header
  struct End {
    z_stream* z;
    ~End() { inflateEnd(z); }
  } end{&zs};
  uint64_t left = data.compressed_limit > 0 ? data.compressed_limit : UINT64_MAX;
  bool eof = false;
  bool member_done = false;
  for (;;) {
    if (zs.avail_in == 0 && !eof) {
      zs.avail_in = static_cast<uInt>(read_some(f, in.data(), in.size(), left));
      zs.next_in = in.data();
      eof = zs.avail_in == 0;
    }
    if (member_done) {
      // Another gzip member may follow (pigz, bgzip, cat a.gz b.gz); anything else ends the data.
      if (zs.avail_in == 0) break;
      if (zs.next_in[0] != 0x1f || (zs.avail_in > 1 && zs.next_in[1] != 0x8b)) break;
      inflateReset(&zs);
      member_done = false;
    }
    zs.next_out = buf.data();
    zs.avail_out = static_cast<uInt>(buf.size());
    const int ret = inflate(&zs, Z_NO_FLUSH);
    out.add(buf.data(), buf.size() - zs.avail_out);
    if (ret == Z_STREAM_END) {
      member_done = true;
      continue;
    }
    if (ret == Z_DATA_ERROR || ret == Z_NEED_DICT) {
      refuse(path,
             std::string("corrupt compressed data: zlib reports \"") + (zs.msg ? zs.msg : "invalid data") +
                 "\" after decoding " + with_commas(out.decoded()) + " bytes",
             input_cause::kCorruptCompressed);
    }
    if (ret == Z_MEM_ERROR) throw IoError(path + ": out of memory while decompressing");
    if (eof && zs.avail_in == 0 && zs.avail_out != 0) {
      // Input exhausted before the stream's end marker.
      if (out.voxel_bytes() < data.expected) refuse_short_stream(path, "compressed", out, data);
      refuse(path,
             "corrupt compressed data: the stream ends without its end marker and checksum (file cut short "
             "after the voxels?)",
             input_cause::kCorruptCompressed);
    }
  }
  if (out.voxel_bytes() < data.expected) refuse_short_stream(path, "compressed", out, data);
}

}  // namespace

void refuse(const std::string& path, const std::string& problem, const char* cause) {
  throw InputError(path + ": " + problem, cause);
}

std::string with_commas(uint64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string number_text(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream s;
  s.precision(7);
  s << v;
  return s.str();
}

void check_finite(const std::string& path, const std::string& field, double value) {
  if (!std::isfinite(value)) {
    refuse(path, field + " = " + number_text(value) + ": orientation and position must be finite numbers",
           input_cause::kImpossibleGeometry);
  }
}

void check_spacing(const std::string& path, const std::string& field, double value_mm, double shown) {
  if (!std::isfinite(value_mm) || value_mm <= 0) {
    refuse(path, field + " = " + number_text(shown) + ": a voxel spacing must be a positive finite number",
           input_cause::kImpossibleGeometry);
  }
  if (value_mm < kMinSpacingMm || value_mm > kMaxSpacingMm) {
    refuse(path,
           field + " = " + number_text(shown) + ": a voxel spacing of " + number_text(value_mm) +
               " mm is outside the plausible range [" + number_text(kMinSpacingMm) + ", " + number_text(kMaxSpacingMm) +
               "] mm",
           input_cause::kImpossibleGeometry);
  }
}

void check_origin(const std::string& path, const std::string& field, double value) {
  check_finite(path, field, value);
  if (std::abs(value) > kMaxOriginMm) {
    refuse(path,
           field + " = " + number_text(value) + ": a position more than " + number_text(kMaxOriginMm) +
               " mm from the scanner origin is not plausible",
           input_cause::kImpossibleGeometry);
  }
}

void check_voxel_data(const std::string& path, const VoxelData& data, const ByteSink& sink) {
  std::error_code ec;
  const auto size = fs::file_size(data.file, ec);
  if (ec) {
    refuse(path, "its voxel data file " + data.file + " cannot be read (" + ec.message() + ")",
           input_cause::kMissingFile);
  }
  if (data.encoding == Encoding::kRaw) {
    const uint64_t need = data.skip_decoded + data.expected;
    const uint64_t start = data.at_end ? (size > data.expected ? size - data.expected : 0) : data.offset;
    const uint64_t present = size > start + data.skip_decoded ? size - start - data.skip_decoded : 0;
    if (data.at_end ? size < data.expected : size < data.offset + need) {
      const std::string where = data.file == path ? "the file" : "its data file " + data.file;
      refuse(path,
             "truncated: the header promises " + with_commas(data.expected) + " voxel bytes from byte " +
                 with_commas(start + data.skip_decoded) + ", " + where + " holds " + with_commas(present),
             input_cause::kTruncatedData);
    }
    if (!sink) return;
    File f(std::fopen(data.file.c_str(), "rb"));
    if (!f || fseeko(f.get(), static_cast<off_t>(start + data.skip_decoded), SEEK_SET) != 0) {
      throw IoError(path + ": cannot read " + data.file);
    }
    std::vector<unsigned char> buf(kChunk);
    uint64_t left = data.expected;
    while (left > 0) {
      const size_t got = std::fread(buf.data(), 1, std::min<uint64_t>(left, buf.size()), f.get());
      if (got == 0) throw IoError(path + ": read error in " + data.file);
      sink(buf.data(), got);
      left -= got;
    }
    return;
  }
  if (data.compressed_limit > 0 && size < data.offset + data.compressed_limit) {
    refuse(path,
           "truncated: the header promises " + with_commas(data.compressed_limit) +
               " bytes of compressed data (CompressedDataSize) for " + with_commas(data.expected) + " voxel bytes, " +
               (data.file == path ? "the file" : data.file) + " holds " +
               with_commas(size > data.offset ? size - data.offset : 0),
           input_cause::kTruncatedData);
  }
  File f(std::fopen(data.file.c_str(), "rb"));
  if (!f || fseeko(f.get(), static_cast<off_t>(data.offset), SEEK_SET) != 0) {
    throw IoError(path + ": cannot read " + data.file);
  }
  Delivery out(data, sink);
  check_gzip(path, f.get(), data, out);
}

}  // namespace mae::io_detail
