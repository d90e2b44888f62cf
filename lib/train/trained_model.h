// A trained model rebuilt from a checkpoint's own saved config (never the user's current file),
// as mae-reconstruct and mae-export need it.
#pragma once

#include <string>

#include "model/mae.h"
#include "train/config.h"

namespace mae {

/// A model with the config and checkpoint it came from.
struct TrainedModel {
  std::string dir;                   ///< the checkpoint folder
  int64_t step = 0;                  ///< optimizer steps the checkpoint was taken after
  Config config;                     ///< the run's resolved config, as saved in the checkpoint
  MaskedAutoencoder model{nullptr};  ///< weights loaded, in eval mode, on the CPU
};

/// Loads a checkpoint folder or a run folder's latest checkpoint. CheckpointError naming the file
/// for a missing, damaged or foreign checkpoint.
TrainedModel load_trained_model(const std::string& path);

}  // namespace mae
