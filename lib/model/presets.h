// The model sizes that mae-bench and mae-selftest measure, by name.
#pragma once

#include <cstdint>
#include <string>

#include "model/mae.h"

namespace mae {

/// "A": ViT-B on 96³ crops, patch 16, MONAI's decoder (batch 2); "B": a ViT-S-like encoder on 64³
/// (batch 4); "tiny": 32³, patch 8, 2 layers (batch 2). Sets `batch` to the preset's batch size.
/// Throws ConfigError naming the choices for any other name.
MaskedAutoencoderOptions benchmark_preset(const std::string& name, int64_t& batch);

}  // namespace mae
