// The deterministic half of preprocessing (read -> reorient -> resample -> intensity -> foreground
// crop) and its on-disk cache: one file per volume, keyed by a hash of the source files (path, size,
// modification time, inode, status-change time and a hash of the first and last 4 KiB) and the
// deterministic settings, holding float16 voxels (float32 when a value
// exceeds float16's range) after a small header (magic, version, shape, geometry, source facts) and
// a checksum. A damaged file is rebuilt with a warning, never trusted; files are written to a
// temporary name and renamed, so a crash never leaves a half-written cache file.
//
// Voxels are always rounded as they are stored, also with no cache, so a run gives the same values
// whether the cache was cold, warm or off.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "data/config.h"
#include "data/dataset.h"
#include "io/volume.h"

namespace mae {

/// Facts about a volume as it was read, before preprocessing.
struct SourceInfo {
  int64_t channels = 0;                       ///< C
  std::array<int64_t, 3> shape_dhw{0, 0, 0};  ///< (D, H, W) as read
  std::array<double, 3> spacing{0, 0, 0};     ///< mm (x, y, z) as read
  std::string orientation;                    ///< orientation code as read
  double min = 0.0;                           ///< smallest voxel as read (all channels)
  double max = 0.0;                           ///< largest voxel as read (all channels)
};

/// A preprocessed volume and the facts about its source.
struct PreprocessedVolume {
  Volume volume;      ///< float32 (C, D, H, W), deterministic preprocessing applied
  SourceInfo source;  ///< the volume as read
};

/// Where a volume came from when it was loaded.
enum class CacheState {
  off,      ///< no cache folder: preprocessed from the source
  hit,      ///< read from a valid cache file
  built,    ///< preprocessed and written to the cache (no file before)
  rebuilt,  ///< the cache file was damaged: preprocessed again and rewritten (a warning was logged)
};

/// "off", "hit", "built" or "rebuilt".
const char* to_string(CacheState state);

/// Reads all channels of `entry` (channels with another grid are resampled onto the first's) and
/// applies the deterministic preprocessing of `config`. InputError naming the file on bad input;
/// other failures are rethrown as InputError naming the entry.
PreprocessedVolume preprocess_volume(const DatasetEntry& entry, const DataConfig& config);

/// A hash of x's shape and every voxel (as float32): equal for bit-identical volumes, different
/// for any other with overwhelming probability.
uint64_t voxel_hash(const at::Tensor& x);

/// Rounds x: (C, D, H, W) float32 to the precision the cache stores (float16 unless a value is
/// outside its range). Same shape.
at::Tensor round_for_cache(const at::Tensor& x);

/// Hash of what determines a preprocessed volume: the source files (path, size, modification time,
/// inode, status-change time and a hash of the first and last 4 KiB; every file of a DICOM folder,
/// every data file beside a .mhd/.nhdr/.hdr header), series_uid, read options and the
/// deterministic settings. A file replaced by other content of the same size with its old
/// modification time restored (`touch -r`) gets a new key: replacing or rewriting a file always
/// changes its status-change time, which no tool can set back.
uint64_t cache_key(const DatasetEntry& entry, const DataConfig& config);

/// The preprocessed-volume cache in `config.cache_dir` ("" = off). Thread-safe: several threads may
/// load the same entry at once (each file is written atomically).
class VolumeCache {
 public:
  /// Creates the cache folder when it does not exist (IoError when that fails).
  explicit VolumeCache(DataConfig config);

  /// The preprocessed volume of `entry`: from the cache when valid, else preprocessed (and stored).
  /// `state`, when given, receives where it came from. A cache file that cannot be written is a
  /// warning, not an error.
  PreprocessedVolume load(const DatasetEntry& entry, CacheState* state = nullptr) const;

  /// Path of the cache file for `entry` ("" when the cache is off).
  std::string file_for(const DatasetEntry& entry) const;

  /// The configuration in use.
  const DataConfig& config() const { return config_; }

 private:
  std::string file_for(const DatasetEntry& entry, uint64_t key) const;

  DataConfig config_;
};

/// Reads a cache file; throws InputError naming it (and why) when it is missing, foreign, of
/// another version or key, truncated, or fails its checksum.
PreprocessedVolume read_cache_file(const std::string& path, uint64_t expected_key);

/// Writes a cache file atomically (temporary file + rename); IoError naming it on failure.
void write_cache_file(const std::string& path, uint64_t key, const PreprocessedVolume& v);

/// The cache folder programs use when data.cache_dir is "": $MAE3D_CACHE_DIR when set, else
/// $XDG_CACHE_HOME/mae3d/volumes, else ~/.cache/mae3d/volumes ("" when none of these is known).
std::string default_cache_dir();

}  // namespace mae
