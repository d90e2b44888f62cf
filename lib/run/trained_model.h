// A trained model rebuilt from a checkpoint's own saved config (never the user's current file),
// as mae-reconstruct and mae-export need it.
#pragma once

#include <string>

#include "model/mae.h"
#include "run/config.h"

namespace mae {

/// A model with the config and checkpoint it came from.
struct TrainedModel {
  std::string dir;                   ///< the checkpoint folder
  int64_t step = 0;                  ///< optimizer steps the checkpoint was taken after
  std::string run_id;                ///< the run the checkpoint belongs to
  bool diverged = false;             ///< meta.json marks the checkpoint diverged (its loss became non-finite)
  std::string diverged_reason;       ///< why, in words, when diverged
  Config config;                     ///< the run's resolved config, as saved in the checkpoint
  MaskedAutoencoder model{nullptr};  ///< weights loaded, in eval mode, on the CPU
};

/// Loads a checkpoint folder or a run folder's latest checkpoint, holding a shared lock on it while
/// reading (a training process does not prune it meanwhile; a folder pruned before the lock is
/// taken is resolved again). CheckpointError naming the file for a missing, damaged, mixed or
/// foreign checkpoint, or weights of another architecture than its config.
TrainedModel load_trained_model(const std::string& path);

/// One line for users of a diverged checkpoint ("" when not diverged): "checkpoint DIR is marked
/// diverged (REASON); its weights may be meaningless".
std::string diverged_warning(const TrainedModel& trained);

}  // namespace mae
