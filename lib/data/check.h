// Pre-flight check of a dataset: every volume is read once through the cache before training, so
// bad files are found in minutes, all at once, rather than hours into a run. Also used by training
// to drop bad volumes when data.on_bad_volume is "skip". Beyond what reading refuses, the check
// refuses volumes that carry no signal (cause "constant volume": every voxel of a channel equal,
// as read or after preprocessing) and volumes whose voxels are identical to an earlier one's
// (cause "duplicate volume": one scan listed under two names leaks validation data). The library
// prints nothing: programs print line(), summary() or text().
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "data/cache.h"
#include "data/config.h"
#include "data/dataset.h"

namespace mae {

/// The outcome for one volume.
struct VolumeCheck {
  DatasetEntry entry;  ///< the volume checked
  bool ok = false;     ///< read and preprocessed without error
  std::string error;   ///< the error message when !ok
  std::string cause;   ///< why it was refused, e.g. "truncated data" ("other" when unclassified; "" when ok)
  SourceInfo source;   ///< as read (ok only)
  std::array<int64_t, 4> shape{0, 0, 0, 0};  ///< (C, D, H, W) after preprocessing (ok only)
  std::array<double, 3> spacing{0, 0, 0};    ///< mm (x, y, z) after preprocessing
  std::string orientation;                   ///< orientation code after preprocessing
  double min = 0.0;                          ///< smallest voxel after preprocessing
  double max = 0.0;                          ///< largest voxel after preprocessing
  CacheState cache = CacheState::off;        ///< where the volume came from
  double seconds = 0.0;                      ///< time taken
  uint64_t voxel_hash = 0;                   ///< voxel_hash() of the preprocessed voxels (ok only)

  /// One line: "ok <path> CxDxHxW (src DxHxW) spacing a x b x c mm RAS range [lo, hi] cache hit 0.12 s",
  /// or "FAIL " + failure(). Control characters in paths are escaped (printable()).
  std::string line() const;

  /// The error naming the volume, one line ("" when ok).
  std::string failure() const;
};

/// The outcome for a whole list.
struct CheckReport {
  std::vector<VolumeCheck> volumes;  ///< one per entry, in list order

  /// Number of volumes that failed.
  int64_t failures() const;
  /// The entries that passed, in list order.
  std::vector<DatasetEntry> usable() const;
  /// Refusals counted by cause, most frequent first (ties by name).
  std::vector<std::pair<std::string, int64_t>> causes() const;
  /// "checked 12 volumes: 9 ok, 3 refused (2 truncated data, 1 impossible geometry)".
  std::string summary() const;
  /// The whole report as programs print it: line() of every volume, summary(), then "failures:"
  /// and each failure() indented (when any); every line ends in '\n'.
  std::string text() const;
};

/// Reads and preprocesses every entry through `config`'s cache with `threads` threads (0 = the
/// config's workers, at least 1), collecting every failure instead of stopping at the first;
/// refuses constant volumes and, of volumes with identical voxels, every one after the first.
/// Only non-mae errors (out of memory, ...) propagate.
CheckReport check_data(const std::vector<DatasetEntry>& entries, const DataConfig& config, int threads = 0);

/// The entries training can use: all of them when every one passed; with on_bad_volume "skip" the
/// ones that passed (each dropped one logged as a warning); with "error" the first failure is
/// rethrown as an InputError (with its cause) stating how many failed. InputError also when none passed.
std::vector<DatasetEntry> usable_entries(const CheckReport& report, const DataConfig& config);

}  // namespace mae
