// Whole-volume reconstruction with a trained masked autoencoder, to show what it learned: the input
// is preprocessed exactly as training did (the checkpoint's own data config), covered with
// model-sized windows, each window masked with a mask drawn from one seeded CPU generator (windows in
// raster order, so the result does not depend on how windows are batched), reconstructed, and the
// windows stitched back into one volume.
//
// Stitching: every voxel belongs to exactly one window, the one whose centre is nearest along each
// axis (ties: the earlier window), so the overlap gives each voxel context on all sides and the
// windows' masks are never mixed. Per voxel v, with w its window (all channels alike):
//   mask(v)           = 1 when v's patch was masked in w, else 0 (so about `masking_ratio` of the
//                       voxels are masked, as each window is);
//   reconstruction(v) = w's (de-normalised) prediction when mask(v), else the input, copied exactly;
//   error(v)          = reconstruction(v) - input(v) (signed; exactly 0 on visible voxels);
//   masked image(v)   = input(v), or the input's minimum (per channel) where mask(v).
// (Averaging over all windows that cover a voxel was measured and rejected: with 8 overlapping
// windows on a brain MRI, a voxel masked in at least one window covered 91 % of the volume at a
// ratio of 0.75, so the picture no longer showed the masking the model was trained with.)
//
// With model.norm_pix_loss the model predicts every patch normalised by its own mean and std; a
// masked patch has no voxels of its own to undo that, so predictions are de-normalised with the
// statistics of the window's visible patches: mean = the mean of all visible voxels of the window,
// std = sqrt(mean over visible patches of (unbiased patch variance + 1e-6)), i.e. the typical
// within-patch spread that a normalised target has unit variance in.
//
// Metrics compare with the input over the masked voxels and over all voxels: MSE, and
// PSNR = 10·log10(range² / MSE) with range = max - min of the (preprocessed) input. The baseline
// fills each masked voxel with the mean (per channel) of the visible voxels of its window, so the
// model's gain over "paint the average" shows.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "infer/montage.h"
#include "io/volume.h"
#include "run/trained_model.h"

namespace mae {

/// How a volume is reconstructed.
struct ReconstructOptions {
  std::optional<double> masking_ratio;  ///< share of patches masked per window; nullopt = the checkpoint's
  uint64_t seed = 0;                    ///< seeds the CPU generator that draws the masks, window by window
  double overlap = 0.25;                ///< share of a window that neighbours overlap, 0 .. kMaxOverlap
  int64_t batch_size = 4;               ///< windows per forward pass (speed only; results do not change)
  /// Called after each batch of windows with (windows done, windows in all); empty = none.
  std::function<void(int64_t, int64_t)> progress;
};

/// MSE and PSNR of one comparison with the input.
struct ErrorStats {
  double mse = 0.0;   ///< mean squared difference
  double psnr = 0.0;  ///< dB, 10·log10(range² / mse); +inf when mse is 0
};

/// Quality of a reconstruction.
struct ReconstructMetrics {
  double data_range = 0.0;     ///< max - min of the input (the PSNR range)
  int64_t voxels = 0;          ///< voxels of the volume (times channels)
  int64_t masked_voxels = 0;   ///< of which masked (times channels)
  ErrorStats model_masked;     ///< the model over the masked voxels
  ErrorStats model_all;        ///< the model over all voxels (visible ones have error 0)
  ErrorStats baseline_masked;  ///< the window-mean baseline over the masked voxels
  ErrorStats baseline_all;     ///< the window-mean baseline over all voxels
  double loss = 0.0;           ///< the training loss (masked_mse_loss) averaged over the windows
};

/// The first window as the model saw it, for --save-tensors.
struct WindowTensors {
  at::Tensor input;  ///< (1, C, d, h, w) the window's voxels
  at::Tensor mask;   ///< (1, N) float, 1 = masked
  at::Tensor pred;   ///< (1, N, prod(patch)·C) raw model output (normalised units with norm_pix_loss)
  std::array<int64_t, 3> origin{0, 0, 0};  ///< (d, h, w) of the window's first voxel in the volume
};

/// A stitched reconstruction; every volume has the input's geometry.
struct Reconstruction {
  Volume input;                ///< (C, D, H, W) the preprocessed input
  Volume reconstruction;       ///< (C, D, H, W) see the file comment
  Volume masked;               ///< (C, D, H, W) input with masked voxels set to the input's minimum per channel
  Volume error;                ///< (C, D, H, W) reconstruction - input
  Volume mask;                 ///< (1, D, H, W) 1 = masked in the window the voxel belongs to
  at::Tensor baseline;         ///< (C, D, H, W) the window-mean baseline
  double masking_ratio = 0.0;  ///< ratio used
  int64_t num_windows = 0;     ///< windows run
  std::array<int64_t, 3> window{0, 0, 0};  ///< window size (D, H, W)
  ReconstructMetrics metrics;              ///< quality
  WindowTensors first_window;              ///< the first window's tensors
};

/// Reconstructs `input`: (C, D, H, W), preprocessed as `model.config.data` says, with the model.
/// ConfigError for a masking ratio that leaves no visible or no masked patch, or a bad overlap;
/// InputError when the channels differ from the model's or the volume is smaller than the window.
Reconstruction reconstruct_volume(const TrainedModel& model, const Volume& input, const ReconstructOptions& options);

/// The metrics as JSON (mse/psnr for the model and the baseline, over masked and all voxels).
nlohmann::json metrics_to_json(const ReconstructMetrics& metrics);

/// Writes {"input", "mask", "pred"} of `w` as a pickled dict of tensors that Python's torch.load
/// reads (torch::pickle_save). IoError naming the path on failure.
void save_window_tensors(const WindowTensors& w, const std::string& path);

/// Everything mae-reconstruct does, as a request.
struct ReconstructRequest {
  std::string checkpoint;           ///< checkpoint folder or run folder (its latest checkpoint)
  std::vector<std::string> inputs;  ///< volume file or DICOM folder; several = channels
  std::string out_dir;              ///< where the outputs go (created)
  ReconstructOptions options;       ///< masking, seed, overlap
  std::vector<SliceSpec> slices;    ///< montage rows; empty = middle axial, coronal, sagittal
  bool original_space = false;      ///< also write the volumes resampled onto the input file's grid
  std::string save_tensors;         ///< path for the first window's tensors, "" = none
};

/// What run_reconstruction did.
struct ReconstructReport {
  std::string checkpoint;          ///< the checkpoint folder used
  int64_t step = 0;                ///< its step
  nlohmann::json metrics;          ///< the content of metrics.json
  std::vector<std::string> files;  ///< files written
  double seconds = 0.0;            ///< wall time
  std::string warning;             ///< diverged_warning() of the checkpoint ("" when it did not diverge)
};

/// Loads the checkpoint, preprocesses the input with the checkpoint's data config, checks the
/// slices, reconstructs and writes into out_dir: input, masked, reconstruction, error and mask
/// (.nii.gz, preprocessed geometry; with original_space also <name>_original.nii.gz on the input
/// file's grid, linear, mask thresholded at 0.5), montage.png, metrics.json and, when asked, the
/// tensors. CheckpointError / InputError / ConfigError naming the file or flag; IoError on write.
ReconstructReport run_reconstruction(const ReconstructRequest& request);

}  // namespace mae
