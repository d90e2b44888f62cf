// The linear probe: how much a frozen encoder's patch tokens say about anatomy. Each image is
// preprocessed as its run's training was, covered with model-sized windows on the patch lattice,
// and every patch gets a target from a label volume in the same physical space (resampled with
// nearest neighbour onto the preprocessed grid): the fraction of each label in the patch, or its
// majority label. A linear model (ridge regression, or multinomial logistic regression) is fitted
// on the train patches with its L2 strength chosen by a cross-validation over train patches only,
// and scored on the test patches. The same probe on a randomly initialised encoder of the same
// architecture and on raw intensity features (mean, std and a 2x2x2 average pool of the patch's
// voxels, per channel) are the baselines; the headline is pretrained minus random.
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/config.h"
#include "model/mae.h"

namespace mae {

/// What each patch is asked to predict.
enum class ProbeTarget {
  fractions,  ///< the fraction of the patch's voxels carrying each label (ridge regression; R²)
  majority,   ///< the label most of its voxels carry (logistic regression; accuracy, F1)
};

/// Which patches of a volume are train or test patches.
enum class ProbeSplit {
  none,          ///< --train volumes train, --test volumes test
  checkerboard,  ///< one volume: 2x2x2-patch blocks alternate between train and test
};

/// "fractions" | "majority".
const char* to_string(ProbeTarget target);
/// "none" | "checkerboard".
const char* to_string(ProbeSplit split);
/// Parses "fractions" | "majority"; ConfigError naming `key` otherwise.
ProbeTarget parse_probe_target(const std::string& text, const std::string& key);

/// An image and its label volume.
struct ProbePair {
  std::string image;   ///< image file or DICOM folder
  std::string labels;  ///< integer label volume in the image's physical space (0 = background)
};

/// Splits "IMAGE=LABELS" at its last '='; ConfigError naming `flag` when either side is empty.
ProbePair parse_probe_pair(const std::string& text, const std::string& flag);

/// How the probe runs.
struct ProbeOptions {
  ProbeTarget target = ProbeTarget::fractions;
  ProbeSplit split = ProbeSplit::none;
  bool include_background = false;  ///< keep patches whose voxels are all background (both targets)
  int64_t folds = 3;                ///< cross-validation folds for the L2 strength (2 .. 10)
  uint64_t seed = 0;                ///< assigns 2x2x2-patch blocks to folds
  int64_t batch = 4;                ///< windows per encoder call
};

/// Largest distance (in voxels of the coarser grid) by which the image's and the label volume's
/// physical bounding boxes may differ.
inline constexpr double kProbeExtentToleranceVoxels = 1.0;

/// A labelled volume ready for probing: the preprocessed image cut into lattice-aligned windows and
/// every whole patch inside the volume with its label counts and raw intensity features.
struct ProbeVolume {
  ProbePair pair;
  std::array<int64_t, 3> shape{0, 0, 0};  ///< preprocessed (D, H, W)
  at::Tensor windows;                     ///< (W, C, *img_size) float32 encoder inputs
  at::Tensor token_index;                 ///< (P) int64: row of the patch in the (W * N) token rows
  at::Tensor lattice;                     ///< (P, 3) int64: patch position on the volume's patch lattice
  at::Tensor counts;                      ///< (P, L) float64: voxels of label_values[l] in the patch
  std::vector<int64_t> label_values;      ///< sorted label values present in the volume (0 first if present)
  at::Tensor raw;                         ///< (P, C * 10) float32: mean, std, 2x2x2 average pool per channel
};

/// Reads and checks `pair` and prepares it for `model` with the run's data settings (the same
/// preprocessing as training; no disk cache). InputError naming the file, exit 2, for a label
/// volume outside the image's physical space (extent or direction), labels that are not integers,
/// more than one label channel or an empty label map.
ProbeVolume prepare_probe_volume(const ProbePair& pair, const DataConfig& data, const MaskedAutoencoderOptions& model);

/// The frozen encoder's token of every patch of `volume`: (P, E) float32 (eval mode, no masking).
at::Tensor probe_features(MaskedAutoencoderImpl& encoder, const ProbeVolume& volume, int64_t batch);

/// A randomly initialised model of `options` drawn from `seed`, leaving the global generator as it was.
MaskedAutoencoder random_init_model(const MaskedAutoencoderOptions& options, uint64_t seed);

/// Scores of one feature set.
struct ProbeScores {
  std::string features;            ///< "pretrained", "random_init" or "raw"
  int64_t dims = 0;                ///< feature width
  double l2 = 0.0;                 ///< chosen L2 strength (relative to the number of train patches)
  double cv_score = 0.0;           ///< its cross-validated score (R² or accuracy) on the train patches
  double r2 = 0.0;                 ///< fractions: R² over the non-background labels, variance-weighted
  double r2_macro = 0.0;           ///< fractions: mean R² of the labels with variance in the test patches
  double accuracy = 0.0;           ///< majority
  double balanced_accuracy = 0.0;  ///< majority: mean recall over the classes in the test patches
  double macro_f1 = 0.0;           ///< majority: mean F1 over the classes in truth or prediction
  /// The headline value: r2 (fractions) or accuracy (majority).
  double score(ProbeTarget target) const { return target == ProbeTarget::fractions ? r2 : accuracy; }
};

/// The patches' targets and split, for every feature set alike.
struct ProbeTargets {
  /// fractions: label values of the target columns (the non-background labels in the train
  /// patches); majority: label values of the classes (the majority labels of the train patches).
  std::vector<int64_t> classes;
  /// majority: labels that are the majority of some test patch but of no train patch; test_y
  /// gives them ids classes.size() + i. They can never be predicted and count as errors.
  std::vector<int64_t> test_only_classes;
  at::Tensor train_rows,
      test_rows;                   ///< (n) int64: rows of the concatenated patches (train volumes', then test volumes')
  at::Tensor train_y, test_y;      ///< fractions: (n, K) float64; majority: (n) int64 class ids
  at::Tensor train_fold;           ///< (n_train) int64: cross-validation fold of each train row
  int64_t dropped_background = 0;  ///< patches left out because all their voxels are background
  int64_t total_patches = 0;       ///< whole patches in all volumes
};

/// Builds the targets and the split of `train` and `test` (test may be empty with a checkerboard
/// split). ConfigError when a checkerboard split has test volumes or a plain split has none;
/// InputError when the train patches hold fewer than 2 classes or either side has no patch.
ProbeTargets probe_targets(const std::vector<ProbeVolume>& train, const std::vector<ProbeVolume>& test,
                           const ProbeOptions& options);

/// Fits on the train rows of `features` (rows: the train volumes' patches then the test volumes')
/// and scores on the test rows.
ProbeScores fit_and_score(const at::Tensor& features, const ProbeTargets& targets, const ProbeOptions& options,
                          const std::string& name);

/// The concatenated raw features of `volumes`, in the row order fit_and_score expects.
at::Tensor stack_raw(const std::vector<ProbeVolume>& volumes);

/// A whole probe: pretrained, random-init and raw scores on the same patches.
struct ProbeReport {
  ProbeOptions options;
  ProbeTargets targets;
  std::vector<ProbeScores> scores;  ///< pretrained, random_init, raw
  double seconds_features = 0.0, seconds_fit = 0.0;
  /// pretrained minus random-init score.
  double headline() const;
};

/// Probes `encoder` against `random_encoder` and raw features on prepared volumes.
ProbeReport run_probe(MaskedAutoencoderImpl& encoder, MaskedAutoencoderImpl& random_encoder,
                      const std::vector<ProbeVolume>& train, const std::vector<ProbeVolume>& test,
                      const ProbeOptions& options);

/// The full report as JSON: options, patch counts, every feature set's scores, timings.
nlohmann::json probe_report_json(const ProbeReport& report);

/// mae-probe: loads the checkpoint (a checkpoint or run folder) with its own config, prepares the
/// volumes with its data settings and probes it against a random-init model of the same
/// architecture drawn from the run's seed. CheckpointError / InputError / ConfigError naming the
/// file or flag for bad input.
ProbeReport probe_checkpoint(const std::string& checkpoint, const std::vector<ProbePair>& train,
                             const std::vector<ProbePair>& test, const ProbeOptions& options);

/// The one line for the terminal, e.g. "probe fractions R² on 612 test patches: pretrained 0.41,
/// random-init 0.22, raw 0.30; pretrained - random +0.19".
std::string probe_summary(const ProbeReport& report);

}  // namespace mae
