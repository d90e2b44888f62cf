// Shared helpers of the infer tests: a temporary folder, a synthetic anisotropic volume with a
// non-identity direction, a tiny trained checkpoint, and a check on error messages.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <initializer_list>
#include <string>

#include "../common/expect_error.h"
#include "../common/temp_dir.h"
#include "io/volume.h"

namespace mae::test {

/// A smooth synthetic volume (1, d, h, w) with spacing (1, 1.5, 2) mm, an oblique-free but permuted
/// and flipped direction (orientation "PRS") and a non-zero origin.
Volume synthetic_volume(int64_t d, int64_t h, int64_t w, uint64_t seed = 7);

/// The config (JSON) of a tiny model (img 16³, patch 4, width 24, one layer each) on `volume_path`,
/// running in `dir` (run folder dir/run, cache dir/cache).
std::string tiny_config_json(const std::string& volume_path, const std::string& dir, bool norm_pix = false);

/// Trains the tiny model for 3 steps on `volume_path`; returns the run folder.
std::string train_tiny(const std::string& volume_path, const std::string& dir);

}  // namespace mae::test
