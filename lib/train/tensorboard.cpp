// TensorBoard event files; see tensorboard.h for the format and the resume rules.
#include "train/tensorboard.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"
#include "io/png.h"

namespace fs = std::filesystem;

namespace mae {

namespace tb {
namespace {

constexpr uint32_t kCastagnoli = 0x82F63B78u;  // reflected
constexpr uint32_t kMaskDelta = 0xa282ead8u;

std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kCastagnoli : c >> 1;
    t[i] = c;
  }
  return t;
}

uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

uint64_t get_u64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// Protobuf wire format: a key is (field << 3) | wire type; 0 = varint, 1 = 64-bit, 2 = length-delimited, 5 = 32-bit.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, int field, int wire) { put_varint(out, (static_cast<uint64_t>(field) << 3) | wire); }
void put_varint_field(std::string& out, int field, uint64_t v) {
  put_key(out, field, 0);
  put_varint(out, v);
}
void put_bytes_field(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}
void put_double_field(std::string& out, int field, double v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 1);
  put_le(out, bits, 8);
}
void put_float_field(std::string& out, int field, float v) {
  uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 5);
  put_le(out, bits, 4);
}

// One field of a message being read: its number, wire type and value (varint / fixed bits, or the
// bytes of a length-delimited field).
struct Field {
  int number = 0;
  int wire = 0;
  uint64_t bits = 0;
  std::string bytes;
};

bool read_varint(const std::string& d, size_t& pos, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= d.size()) return false;
    const auto b = static_cast<unsigned char>(d[pos++]);
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;  // more than 10 bytes
}

// Calls `on_field` for every field of the message in `d`; false when it is not well formed.
template <typename F>
bool for_each_field(const std::string& d, F&& on_field) {
  size_t pos = 0;
  while (pos < d.size()) {
    uint64_t key = 0;
    if (!read_varint(d, pos, key)) return false;
    Field f;
    f.number = static_cast<int>(key >> 3);
    f.wire = static_cast<int>(key & 7);
    if (f.number == 0) return false;
    switch (f.wire) {
      case 0:
        if (!read_varint(d, pos, f.bits)) return false;
        break;
      case 1:
        if (d.size() - pos < 8) return false;
        f.bits = get_u64(d.data() + pos);
        pos += 8;
        break;
      case 5:
        if (d.size() - pos < 4) return false;
        f.bits = get_u32(d.data() + pos);
        pos += 4;
        break;
      case 2: {
        uint64_t n = 0;
        if (!read_varint(d, pos, n) || n > d.size() - pos) return false;
        f.bytes = d.substr(pos, n);
        pos += n;
        break;
      }
      default:
        return false;  // groups (3, 4) are not used by these messages
    }
    if (!on_field(f)) return false;
  }
  return true;
}

std::optional<ImageValue> decode_image(const std::string& d) {
  ImageValue im;
  const bool ok = for_each_field(d, [&](const Field& f) {
    if (f.number >= 1 && f.number <= 3 && f.wire == 0) {
      const auto v = static_cast<int64_t>(static_cast<int32_t>(f.bits));
      (f.number == 1 ? im.height : f.number == 2 ? im.width : im.colorspace) = v;
    } else if (f.number == 4 && f.wire == 2) {
      im.encoded = f.bytes;
    }
    return true;
  });
  if (!ok) return std::nullopt;
  return im;
}

std::optional<SummaryValue> decode_value(const std::string& d) {
  SummaryValue v;
  const bool ok = for_each_field(d, [&](const Field& f) {
    if (f.number == 1 && f.wire == 2) {
      v.tag = f.bytes;
    } else if (f.number == 2 && f.wire == 5) {
      float x = 0;
      const auto bits = static_cast<uint32_t>(f.bits);
      std::memcpy(&x, &bits, sizeof x);
      v.simple_value = x;
    } else if (f.number == 4 && f.wire == 2) {
      v.image = decode_image(f.bytes);
      return v.image.has_value();
    }
    return true;
  });
  if (!ok) return std::nullopt;
  return v;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + kMaskDelta;
}

std::string frame_record(const std::string& data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(out, data.size(), 8);
  put_le(out, masked_crc32c(out.data(), 8), 4);
  out += data;
  put_le(out, masked_crc32c(data.data(), data.size()), 4);
  return out;
}

std::vector<std::string> parse_records(const std::string& bytes, size_t* valid_end) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (bytes.size() - pos >= 12) {
    const char* head = bytes.data() + pos;
    if (get_u32(head + 8) != masked_crc32c(head, 8)) break;
    const uint64_t n = get_u64(head);
    if (n > bytes.size() - pos - 12 || bytes.size() - pos - 12 - n < 4) break;
    const char* data = head + 12;
    if (get_u32(data + n) != masked_crc32c(data, n)) break;
    out.emplace_back(data, n);
    pos += 12 + n + 4;
  }
  if (valid_end) *valid_end = pos;
  return out;
}

std::string encode_event(const Event& e) {
  std::string out;
  if (e.wall_time != 0.0) put_double_field(out, 1, e.wall_time);
  if (e.step != 0) put_varint_field(out, 2, static_cast<uint64_t>(e.step));
  if (!e.file_version.empty()) put_bytes_field(out, 3, e.file_version);
  if (e.has_summary || !e.summary.empty()) {
    std::string summary;
    for (const auto& v : e.summary) {
      std::string value;
      put_bytes_field(value, 1, v.tag);
      if (v.simple_value) put_float_field(value, 2, *v.simple_value);
      if (v.image) {
        std::string image;
        if (v.image->height) put_varint_field(image, 1, static_cast<uint64_t>(v.image->height));
        if (v.image->width) put_varint_field(image, 2, static_cast<uint64_t>(v.image->width));
        if (v.image->colorspace) put_varint_field(image, 3, static_cast<uint64_t>(v.image->colorspace));
        if (!v.image->encoded.empty()) put_bytes_field(image, 4, v.image->encoded);
        put_bytes_field(value, 4, image);
      }
      put_bytes_field(summary, 1, value);
    }
    put_bytes_field(out, 5, summary);
  }
  if (e.session_status) {
    std::string log;
    if (*e.session_status != 0) put_varint_field(log, 1, static_cast<uint64_t>(*e.session_status));
    put_bytes_field(out, 7, log);
  }
  return out;
}

std::optional<Event> decode_event(const std::string& data) {
  Event e;
  const bool ok = for_each_field(data, [&](const Field& f) {
    if (f.number == 1 && f.wire == 1) {
      std::memcpy(&e.wall_time, &f.bits, sizeof e.wall_time);
    } else if (f.number == 2 && f.wire == 0) {
      e.step = static_cast<int64_t>(f.bits);
    } else if (f.number == 3 && f.wire == 2) {
      e.file_version = f.bytes;
    } else if (f.number == 5 && f.wire == 2) {
      e.has_summary = true;
      return for_each_field(f.bytes, [&](const Field& v) {
        if (v.number != 1 || v.wire != 2) return true;
        auto value = decode_value(v.bytes);
        if (!value) return false;
        e.summary.push_back(std::move(*value));
        return true;
      });
    } else if (f.number == 7 && f.wire == 2) {
      int status = 0;
      const bool log_ok = for_each_field(f.bytes, [&](const Field& s) {
        if (s.number == 1 && s.wire == 0) status = static_cast<int>(s.bits);
        return true;
      });
      e.session_status = status;
      return log_ok;
    }
    return true;
  });
  if (!ok) return std::nullopt;
  return e;
}

}  // namespace tb

namespace {

constexpr const char* kPrefix = "events.out.tfevents.";
constexpr int kSessionStart = 1;  // SessionLog.START

bool is_events_file(const fs::directory_entry& entry) {
  std::error_code ec;
  return entry.path().filename().string().rfind(kPrefix, 0) == 0 &&
         entry.symlink_status(ec).type() == fs::file_type::regular;
}

// The <unix time> of an events file name, or -1 when it has none.
int64_t name_time(const std::string& name) {
  const std::string rest = name.substr(std::strlen(kPrefix));
  size_t digits = 0;
  while (digits < rest.size() && digits < 18 && rest[digits] >= '0' && rest[digits] <= '9') ++digits;
  return digits == 0 ? -1 : std::stoll(rest.substr(0, digits));
}

std::string host_name() {
  char buf[256] = {};
  std::string h = ::gethostname(buf, sizeof buf - 1) == 0 ? std::string(buf) : std::string();
  for (char& c : h) {
    const bool plain =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_';
    if (!plain) c = '_';
  }
  return h.empty() ? "localhost" : h;
}

double wall_time_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string scalar_tag(const std::string& key) {
  for (const char* group : {"val", "probe"}) {
    const std::string prefix = std::string(group) + "_";
    if (key.size() > prefix.size() && key.rfind(prefix, 0) == 0)
      return std::string(group) + "/" + key.substr(prefix.size());
  }
  return "train/" + key;
}

std::vector<std::pair<std::string, float>> record_scalars(const nlohmann::json& record) {
  std::vector<std::pair<std::string, float>> out;
  for (const auto& [key, value] : record.items()) {
    if (key == "step" || !value.is_number()) continue;
    const double v = value.get<double>();
    if (std::isfinite(v)) out.emplace_back(scalar_tag(key), static_cast<float>(v));
  }
  return out;
}

EventsTruncation truncate_events(const std::string& dir, int64_t keep_step) {
  EventsTruncation result;
  std::error_code ec;
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (is_events_file(entry)) files.push_back(entry.path());
  }
  if (ec) throw IoError(dir + ": cannot list the folder for TensorBoard event files: " + ec.message());
  for (const auto& file : files) {
    std::ifstream in(file, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) throw IoError(file.string() + ": cannot read the TensorBoard event file");
    size_t valid_end = 0;
    const auto records = tb::parse_records(bytes, &valid_end);
    size_t keep_bytes = 0;
    size_t kept = 0;
    bool has_summary = false;
    for (const auto& r : records) {
      const auto event = tb::decode_event(r);
      if (!event || event->step > keep_step) break;
      has_summary = has_summary || event->has_summary;
      keep_bytes += r.size() + 16;
      ++kept;
    }
    if (!has_summary) {
      if (!fs::remove(file, ec) || ec) {
        throw IoError(file.string() + ": cannot delete the TensorBoard event file: " + ec.message());
      }
      result.files_removed.push_back(file.string());
      continue;
    }
    if (keep_bytes < bytes.size()) {
      result.records_removed += static_cast<int64_t>(records.size() - kept) + (valid_end < bytes.size() ? 1 : 0);
      if (::truncate(file.c_str(), static_cast<off_t>(keep_bytes)) != 0) {
        throw IoError(file.string() + ": cannot cut the TensorBoard event file back to step " +
                      std::to_string(keep_step) + ": " + std::strerror(errno));
      }
    }
  }
  return result;
}

EventWriter::EventWriter(const std::string& dir, int64_t start_step) {
  // A name later than every existing file's, so that TensorBoard reads the files in start order.
  int64_t t = static_cast<int64_t>(std::floor(wall_time_now()));
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (is_events_file(entry)) t = std::max(t, name_time(entry.path().filename().string()) + 1);
  }
  const std::string host = host_name();
  for (int attempt = 0; fd_ < 0; ++attempt, ++t) {
    path_ = (fs::path(dir) / (kPrefix + std::to_string(t) + "." + host)).string();
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0 && (errno != EEXIST || attempt >= 100)) {
      throw IoError(path_ + ": cannot create the TensorBoard event file: " + std::strerror(errno));
    }
  }
  tb::Event version;
  version.wall_time = wall_time_now();
  version.file_version = "brain.Event:2";
  write_event(version);
  tb::Event start;
  start.wall_time = version.wall_time;
  start.step = start_step;
  start.session_status = kSessionStart;
  write_event(start);
}

EventWriter::~EventWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void EventWriter::write_event(const tb::Event& event) {
  const std::string record = tb::frame_record(tb::encode_event(event));
  size_t done = 0;
  while (done < record.size()) {
    const ssize_t n = ::write(fd_, record.data() + done, record.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw IoError(path_ + ": cannot write (disk full?): " + std::strerror(n < 0 ? errno : ENOSPC));
    done += static_cast<size_t>(n);
  }
}

void EventWriter::write_scalars(int64_t step, const std::vector<std::pair<std::string, float>>& values) {
  if (values.empty()) return;
  tb::Event e;
  e.wall_time = wall_time_now();
  e.step = step;
  e.has_summary = true;
  for (const auto& [tag, value] : values) {
    tb::SummaryValue v;
    v.tag = tag;
    v.simple_value = value;
    e.summary.push_back(std::move(v));
  }
  write_event(e);
}

void EventWriter::write_image(int64_t step, const std::string& tag, const at::Tensor& image) {
  tb::ImageValue im;
  im.encoded = encode_png(image);  // checks dtype and shape
  im.height = image.size(0);
  im.width = image.size(1);
  im.colorspace = image.dim() == 3 && image.size(2) == 3 ? 3 : 1;
  tb::Event e;
  e.wall_time = wall_time_now();
  e.step = step;
  e.has_summary = true;
  tb::SummaryValue v;
  v.tag = tag;
  v.image = std::move(im);
  e.summary.push_back(std::move(v));
  write_event(e);
}

void EventWriter::sync() {
  if (::fsync(fd_) != 0) throw IoError(path_ + ": cannot sync to disk: " + std::strerror(errno));
}

}  // namespace mae
