// Deterministic preprocessing and the on-disk cache of its results; see cache.h.
#include "data/cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "data/transforms.h"
#include "io/io.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

constexpr char kMagic[8] = {'M', 'A', 'E', '3', 'D', 'V', 'C', '\0'};  // mae3d volume cache
constexpr uint32_t kVersion = 2;    // bump when the layout or the preprocessing changes
constexpr uint32_t kDtypeHalf = 1;  // payload dtypes
constexpr uint32_t kDtypeFloat = 2;
constexpr double kHalfMax = 65000.0;  // float16's largest finite value is 65504

struct CacheHeader {
  char magic[8];
  uint32_t version;
  uint32_t dtype;
  uint64_t key;
  int64_t shape[4];  // C, D, H, W
  double spacing[3];
  double origin[3];
  double direction[9];
  int64_t src_channels;
  int64_t src_shape[3];
  double src_spacing[3];
  char src_orientation[8];
  double src_min;
  double src_max;
  uint64_t payload_bytes;
  uint64_t checksum;  // over the header (this field zero) and the payload
};
static_assert(sizeof(CacheHeader) == 8 + 4 + 4 + 8 + 32 + 24 + 24 + 72 + 8 + 24 + 24 + 8 + 16 + 8 + 8,
              "CacheHeader must have no padding");

constexpr uint64_t kFnvBasis = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;

uint64_t fnv1a(const std::string& s) {
  uint64_t h = kFnvBasis;
  for (unsigned char c : s) h = (h ^ c) * kFnvPrime;
  return h;
}

// FNV-1a over 64-bit words in four interleaved lanes (fast enough to check a warm cache at memory
// speed); any change of a single word changes the result, as every step is a bijection of the state.
uint64_t checksum(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t lane[4] = {h, h ^ 0x1ULL, h ^ 0x2ULL, h ^ 0x3ULL};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      lane[k] = (lane[k] ^ w) * kFnvPrime;
    }
  }
  uint64_t out = kFnvBasis;
  for (int k = 0; k < 4; ++k) out = (out ^ lane[k]) * kFnvPrime;
  for (; i < n; ++i) out = (out ^ p[i]) * kFnvPrime;
  return (out ^ n) * kFnvPrime;
}

std::string hexf(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", v);
  return buf;
}

// Bytes hashed at each end of a source file: a NIfTI header and the first and last voxels; for
// gzip files the last 8 bytes are the CRC-32 and length of the whole uncompressed content.
constexpr size_t kSampleBytes = 4096;

// What identifies one source file's content without reading it all: size and modification time
// (what a copy or an edit changes), inode and status-change time (what replacing or rewriting a
// file changes even when its old modification time is restored: ctime cannot be set by `touch`)
// and a hash of its first and last 4 KiB (for file systems whose ctime or inodes are not kept).
std::string file_facts(const fs::path& p) {
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return p.string() + ":unreadable:" + std::to_string(errno);
  std::string s = p.string() + ":" + std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
                  std::to_string(st.st_mtim.tv_nsec) + ":ino" + std::to_string(st.st_ino) + ":ctime" +
                  std::to_string(st.st_ctim.tv_sec) + "." + std::to_string(st.st_ctim.tv_nsec);
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return s + ":unopenable";
  std::vector<unsigned char> buf(2 * kSampleBytes);
  const auto size = static_cast<size_t>(std::max<off_t>(st.st_size, 0));
  const size_t head = std::min(size, kSampleBytes);
  const size_t tail_at = size > 2 * kSampleBytes ? size - kSampleBytes : head;
  const size_t tail = std::min(size - tail_at, kSampleBytes);
  ssize_t got = ::pread(fd, buf.data(), head, 0);
  ssize_t got_tail = tail > 0 ? ::pread(fd, buf.data() + head, tail, static_cast<off_t>(tail_at)) : 0;
  ::close(fd);
  if (got < 0 || got_tail < 0) return s + ":unreadable";
  char hex[24];
  std::snprintf(hex, sizeof hex, ":%016llx",
                static_cast<unsigned long long>(checksum(buf.data(), static_cast<size_t>(got + got_tail), kFnvBasis)));
  return s + hex;
}

// The regular files of a folder, sorted, never throwing (entries that cannot be examined count by name).
std::vector<fs::path> folder_files(const fs::path& dir, std::string* unreadable) {
  std::vector<fs::path> out;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  for (const fs::directory_iterator end; !ec && it != end; it.increment(ec)) {
    std::error_code fe;
    if (fs::is_regular_file(it->path(), fe)) {
      out.push_back(it->path());
    } else if (fe) {
      *unreadable += "|bad:" + it->path().string();
    }
  }
  if (ec) *unreadable += "|unlisted:" + ec.message();
  std::sort(out.begin(), out.end());
  return out;
}

bool same_grid(const Volume& a, const Volume& b) {
  if (a.shape_dhw() != b.shape_dhw()) return false;
  for (int i = 0; i < 3; ++i) {
    if (std::abs(a.spacing[i] - b.spacing[i]) > 1e-4 * std::abs(a.spacing[i])) return false;
    if (std::abs(a.origin[i] - b.origin[i]) > 1e-3) return false;
  }
  for (int i = 0; i < 9; ++i) {
    if (std::abs(a.direction[i] - b.direction[i]) > 1e-4) return false;
  }
  return true;
}

std::string error_text(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string stem_of(const DatasetEntry& entry) {
  std::string s = fs::path(entry.paths.front()).filename().string();
  for (const char* ext : {".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr"}) {
    const std::string e(ext);
    if (s.size() > e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0) {
      s.resize(s.size() - e.size());
      break;
    }
  }
  for (char& c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  }
  if (s.size() > 48) s.resize(48);
  return s;
}

}  // namespace

const char* to_string(CacheState state) {
  switch (state) {
    case CacheState::off:
      return "off";
    case CacheState::hit:
      return "hit";
    case CacheState::built:
      return "built";
    case CacheState::rebuilt:
      return "rebuilt";
  }
  return "?";
}

at::Tensor round_for_cache(const at::Tensor& x) {
  at::Tensor f = x.to(at::kFloat).contiguous();
  if (f.numel() == 0 || f.abs().max().item<double>() > kHalfMax) return f;
  return f.to(at::kHalf).to(at::kFloat);
}

uint64_t cache_key(const DatasetEntry& entry, const DataConfig& c) {
  std::string s = "mae3d-cache-v" + std::to_string(kVersion);
  for (const auto& p : entry.paths) {
    std::error_code ec;
    fs::path abs = fs::absolute(p, ec);
    abs = abs.lexically_normal();
    if (fs::is_directory(abs, ec)) {
      s += "|dir:" + abs.string();
      for (const auto& f : folder_files(abs, &s)) s += "|" + file_facts(f);
    } else {
      s += "|" + file_facts(abs);
      // A MetaImage/NRRD/Analyze header's data file (x.raw, x.zraw, x.raw.gz, x.img, x.img.gz, ...)
      // changes without the header changing: every file beside it with the header's stem counts.
      std::string ext = abs.extension().string();
      std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return std::tolower(ch); });
      if (ext == ".mhd" || ext == ".nhdr" || ext == ".hdr") {
        const std::string prefix = abs.stem().string() + ".";
        std::string ignored;
        for (const auto& d : folder_files(abs.parent_path(), &ignored)) {
          if (d != abs && d.filename().string().rfind(prefix, 0) == 0) s += "|" + file_facts(d);
        }
      }
    }
  }
  s += "|series=" + entry.series_uid + "|tp=" + std::to_string(c.time_point) +
       "|4ch=" + std::to_string(c.fourth_axis_as_channels) + "|dtol=" + hexf(c.dicom_slice_tolerance) +
       "|orient=" + c.orientation;
  s += "|spacing=" + (c.spacing_mm
                          ? hexf((*c.spacing_mm)[0]) + "," + hexf((*c.spacing_mm)[1]) + "," + hexf((*c.spacing_mm)[2])
                          : std::string("native"));
  const auto& in = c.intensity;
  s += "|int=" + in.mode;
  if (in.mode == "ct_window") s += hexf(in.a_min) + "," + hexf(in.a_max);
  if (in.mode == "ct_window" || in.mode == "percentile")
    s += "," + hexf(in.b_min) + "," + hexf(in.b_max) + "," + std::to_string(in.clip);
  if (in.mode == "percentile") s += "," + hexf(in.lower_percentile) + "," + hexf(in.upper_percentile);
  s += "|fg=" + (c.foreground_threshold ? hexf(*c.foreground_threshold) : std::string("off"));
  return fnv1a(s);
}

PreprocessedVolume preprocess_volume(const DatasetEntry& entry, const DataConfig& config) {
  if (entry.paths.empty()) throw InputError("a dataset entry has no image path");
  for (const auto& p : entry.paths) {
    std::string cause;
    const std::string problem = path_problem(p, &cause);
    if (!problem.empty()) throw InputError(printable(p + ": " + problem), cause);
  }
  try {
    ReadOptions ro;
    ro.series_uid = entry.series_uid;
    ro.time_point = config.time_point;
    ro.fourth_axis_as_channels = config.fourth_axis_as_channels;
    ro.slice_spacing_tolerance = config.dicom_slice_tolerance;
    Volume v = read_volume(entry.paths[0], ro);
    for (size_t i = 1; i < entry.paths.size(); ++i) {
      Volume o = read_volume(entry.paths[i], ro);
      if (!same_grid(o, v)) o = resample_like(o, v);
      v.data = at::cat({v.data, o.data}, 0).contiguous();
    }
    PreprocessedVolume out;
    out.source.channels = v.channels();
    out.source.shape_dhw = v.shape_dhw();
    out.source.spacing = v.spacing;
    out.source.orientation = orientation_code(v);
    if (v.data.numel() > 0) {
      const auto [lo, hi] = at::aminmax(v.data);
      out.source.min = lo.item<double>();
      out.source.max = hi.item<double>();
    }
    if (!config.orientation.empty() && out.source.orientation != config.orientation)
      v = reorient(v, config.orientation);
    if (config.spacing_mm) {
      bool same = true;
      for (int i = 0; i < 3; ++i) same = same && std::abs(v.spacing[i] - (*config.spacing_mm)[i]) < 1e-6;
      if (!same) v = resample(v, *config.spacing_mm);
    }
    v.data = apply_intensity(v.data, config.intensity).contiguous();
    if (config.foreground_threshold) v = crop_foreground(v, *config.foreground_threshold);
    out.volume = std::move(v);
    return out;
  } catch (const InputError& e) {
    throw InputError(printable(e.what()), e.cause());  // a path may hold a newline: keep it one line
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw InputError(printable(entry.name() + ": preprocessing failed: " + error_text(e)), "preprocessing failed");
  }
}

VolumeCache::VolumeCache(DataConfig config) : config_(std::move(config)) {
  if (config_.cache_dir.empty()) return;
  std::error_code ec;
  fs::create_directories(config_.cache_dir, ec);
  if (ec || !fs::is_directory(config_.cache_dir)) {
    throw IoError(config_.cache_dir + ": cannot create the cache folder (\"data.cache_dir\"): " + ec.message());
  }
}

std::string VolumeCache::file_for(const DatasetEntry& entry) const {
  if (config_.cache_dir.empty()) return "";
  return file_for(entry, cache_key(entry, config_));
}

std::string VolumeCache::file_for(const DatasetEntry& entry, uint64_t key) const {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(key));
  return (fs::path(config_.cache_dir) / (stem_of(entry) + "-" + hex + ".mvc")).string();
}

PreprocessedVolume VolumeCache::load(const DatasetEntry& entry, CacheState* state) const {
  // The key reads a little of every source file: compute it once per load.
  const uint64_t key = config_.cache_dir.empty() ? 0 : cache_key(entry, config_);
  const std::string file = config_.cache_dir.empty() ? std::string() : file_for(entry, key);
  CacheState st = CacheState::off;
  if (!file.empty()) {
    st = CacheState::built;
    std::error_code ec;
    if (fs::exists(file, ec)) {
      try {
        PreprocessedVolume v = read_cache_file(file, key);
        if (state) *state = CacheState::hit;
        return v;
      } catch (const Error& e) {
        spdlog::warn("damaged cache file for {}: {}; rebuilding it", entry.name(), e.what());
        st = CacheState::rebuilt;
      }
    }
  }
  PreprocessedVolume v = preprocess_volume(entry, config_);
  v.volume.data = round_for_cache(v.volume.data);
  if (!file.empty()) {
    try {
      write_cache_file(file, key, v);
    } catch (const Error& e) {
      spdlog::warn("{}; continuing without caching this volume", e.what());
    }
  }
  if (state) *state = st;
  return v;
}

PreprocessedVolume read_cache_file(const std::string& path, uint64_t expected_key) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw InputError(path + ": cannot open the cache file");
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> guard(f, &std::fclose);
  CacheHeader h;
  if (std::fread(&h, sizeof h, 1, f) != 1) throw InputError(path + ": truncated cache header");
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) throw InputError(path + ": not a mae3d cache file (bad magic)");
  if (h.version != kVersion)
    throw InputError(path + ": cache version " + std::to_string(h.version) + ", expected " + std::to_string(kVersion));
  if (h.key != expected_key) throw InputError(path + ": cache key does not match its source");
  if (h.dtype != kDtypeHalf && h.dtype != kDtypeFloat) throw InputError(path + ": unknown cache dtype");
  int64_t numel = 1;
  for (int i = 0; i < 4; ++i) {
    if (h.shape[i] < 0 || h.shape[i] > (int64_t{1} << 32)) throw InputError(path + ": bad shape in the cache header");
    numel *= h.shape[i];
  }
  const size_t elem = h.dtype == kDtypeHalf ? 2 : 4;
  if (h.payload_bytes != static_cast<uint64_t>(numel) * elem)
    throw InputError(path + ": payload size does not match the shape");
  at::Tensor raw = at::empty({h.shape[0], h.shape[1], h.shape[2], h.shape[3]},
                             at::TensorOptions().dtype(h.dtype == kDtypeHalf ? at::kHalf : at::kFloat));
  if (h.payload_bytes > 0 && std::fread(raw.data_ptr(), 1, h.payload_bytes, f) != h.payload_bytes) {
    throw InputError(path + ": truncated cache payload");
  }
  char extra;
  if (std::fread(&extra, 1, 1, f) != 0) throw InputError(path + ": trailing bytes after the cache payload");
  const uint64_t stored = h.checksum;
  h.checksum = 0;
  if (checksum(raw.data_ptr(), h.payload_bytes, checksum(&h, sizeof h, kFnvBasis)) != stored) {
    throw InputError(path + ": checksum mismatch (damaged cache file)");
  }
  PreprocessedVolume v;
  v.volume.data = h.dtype == kDtypeHalf ? raw.to(at::kFloat) : raw;
  for (int i = 0; i < 3; ++i) {
    v.volume.spacing[i] = h.spacing[i];
    v.volume.origin[i] = h.origin[i];
    v.source.shape_dhw[i] = h.src_shape[i];
    v.source.spacing[i] = h.src_spacing[i];
  }
  for (int i = 0; i < 9; ++i) v.volume.direction[i] = h.direction[i];
  v.source.channels = h.src_channels;
  v.source.orientation = std::string(h.src_orientation, strnlen(h.src_orientation, sizeof h.src_orientation));
  v.source.min = h.src_min;
  v.source.max = h.src_max;
  return v;
}

void write_cache_file(const std::string& path, uint64_t key, const PreprocessedVolume& v) {
  const at::Tensor& x = v.volume.data;
  TORCH_CHECK(x.dim() == 4, "write_cache_file: expected (C, D, H, W), got ", x.sizes());
  const bool half = x.numel() == 0 || x.abs().max().item<double>() <= kHalfMax;
  at::Tensor payload = (half ? x.to(at::kHalf) : x.to(at::kFloat)).contiguous();
  CacheHeader h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  h.dtype = half ? kDtypeHalf : kDtypeFloat;
  h.key = key;
  for (int i = 0; i < 4; ++i) h.shape[i] = x.size(i);
  for (int i = 0; i < 3; ++i) {
    h.spacing[i] = v.volume.spacing[i];
    h.origin[i] = v.volume.origin[i];
    h.src_shape[i] = v.source.shape_dhw[i];
    h.src_spacing[i] = v.source.spacing[i];
  }
  for (int i = 0; i < 9; ++i) h.direction[i] = v.volume.direction[i];
  h.src_channels = v.source.channels;
  std::strncpy(h.src_orientation, v.source.orientation.c_str(), sizeof h.src_orientation - 1);
  h.src_min = v.source.min;
  h.src_max = v.source.max;
  h.payload_bytes = static_cast<uint64_t>(payload.numel()) * payload.element_size();
  h.checksum = checksum(payload.data_ptr(), h.payload_bytes, checksum(&h, sizeof h, kFnvBasis));

  // Through a flushed temporary renamed into place, so a reader never sees half a file (and two
  // loader threads building the same volume each write their own temporary).
  write_file_atomically(path, [&](const ByteSink& sink) {
    sink(&h, sizeof h);
    if (h.payload_bytes > 0) sink(payload.data_ptr(), h.payload_bytes);
  });
}

uint64_t voxel_hash(const at::Tensor& x) {
  const at::Tensor f = x.to(at::kFloat).contiguous();
  uint64_t h = kFnvBasis;
  for (int64_t i = 0; i < f.dim(); ++i) h = (h ^ static_cast<uint64_t>(f.size(i))) * kFnvPrime;
  return checksum(f.data_ptr(), static_cast<size_t>(f.numel()) * sizeof(float), h);
}

std::string default_cache_dir() {
  if (const char* d = std::getenv("MAE3D_CACHE_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return (fs::path(x) / "mae3d" / "volumes").string();
  if (const char* h = std::getenv("HOME"); h && *h) return (fs::path(h) / ".cache" / "mae3d" / "volumes").string();
  return "";
}

}  // namespace mae
