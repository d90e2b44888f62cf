// The training loader: worker threads turn dataset entries into batches of random crops while the
// model trains, a bounded queue holding the batches ready ahead of the consumer.
//
// Order: epoch e visits all volumes in a permutation drawn from (seed, e) (identity without
// shuffle); each volume gives num_samples consecutive items. Batches are cut from that item order
// in global batches of batch_size x world_size items, and rank r takes items r*batch_size ..
// (r+1)*batch_size - 1 of each global batch, so N ranks together see exactly the batches one
// process with batch_size x N sees. Item i (its position in the epoch order) draws its crop, flips
// and intensity augmentation from item_seed(seed, e, i) alone, so batches are bit-identical for any
// number of worker threads or ranks, and a loader started at position (e, b) yields exactly the
// batches an uninterrupted run yields from there.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/cache.h"
#include "data/config.h"
#include "data/dataset.h"

namespace mae {

/// Loader settings that come from outside the `data` section.
struct LoaderOptions {
  std::array<int64_t, 3> crop_size{96, 96, 96};  ///< crop (D, H, W), the model's img_size
  int64_t batch_size = 2;                        ///< crops per batch
  uint64_t seed = 0;                             ///< run seed
  int rank = 0;                                  ///< this process's slice of each global batch
  int world_size = 1;                            ///< ranks sharing each global batch
  bool shuffle = true;                           ///< permute volumes every epoch
  bool drop_last = true;                         ///< drop an epoch's last incomplete batch
  int64_t memory_cache_mb = 1024;                ///< in-memory LRU of preprocessed volumes (0 = none)
};

/// Where the loader stands: the next batch it will return.
struct LoaderPosition {
  int64_t epoch = 0;  ///< epoch, from 0
  int64_t batch = 0;  ///< batch index within the epoch, 0 .. batches_per_epoch() - 1

  /// Equality of both fields.
  bool operator==(const LoaderPosition& o) const { return epoch == o.epoch && batch == o.batch; }
};

/// One batch of crops.
struct Batch {
  at::Tensor images;             ///< float32 (B, C, D, H, W), contiguous; undefined when B = 0
                                 ///< (this rank's slice of a last, incomplete batch without drop_last)
  int64_t epoch = 0;             ///< epoch it belongs to
  int64_t index = 0;             ///< batch index within the epoch
  std::vector<int64_t> volumes;  ///< index into the loader's entries, per crop
  std::vector<int64_t> items;    ///< item index within the epoch (the random stream), per crop
};

/// Multi-threaded, deterministic, resumable batch loader over an endless sequence of epochs.
class Loader {
 public:
  /// Starts the workers at `start`. ConfigError when an option is invalid (batch_size, crop_size,
  /// rank/world_size) or an epoch would hold no (global) batch; no volume is read before the first
  /// next().
  Loader(std::vector<DatasetEntry> entries, DataConfig config, LoaderOptions options, LoaderPosition start = {});
  /// Stops the workers (finishing the volume each is reading) and joins them; never hangs.
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  /// The next batch, waiting for it when needed. Rethrows a worker's exception (same type, message
  /// naming the file) for the batch that failed, and on every later call.
  Batch next();

  /// Position of the batch next() will return; save it to resume.
  LoaderPosition position() const;

  /// (Global) batches per epoch, the same on every rank.
  int64_t batches_per_epoch() const;

  /// Items (crops) per epoch, all ranks together.
  int64_t items_per_epoch() const;

  /// Volumes visited per epoch, all ranks together.
  int64_t volumes_per_epoch() const;

  /// The volumes, as given.
  const std::vector<DatasetEntry>& entries() const;

  /// Volume indices visited in epoch `epoch`, in order (all ranks together).
  std::vector<int64_t> epoch_volumes(int64_t epoch) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mae
