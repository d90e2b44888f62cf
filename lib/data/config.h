// The `data` section of the run config: where the volumes are, how they are preprocessed (the
// deterministic part, cached on disk, and the random part, drawn every epoch) and how the loader
// runs. Crop size, batch size and seed live in other sections and reach the loader as options.
//
// Keys of "data" (all optional except `dataset`):
//   dataset                  string, required. An MSD/MONAI dataset.json ("training": [{"image": ...}],
//                            optional "validation"; "image" a path or a list of paths = channels;
//                            optional per-entry "series_uid"), a text list (one path per line, '#'
//                            comments), a single folder scanned non-recursively for volume files and
//                            DICOM sub-folders, or a single volume file. Relative paths inside a list
//                            are relative to the list's folder; `dataset` itself is relative to the
//                            current directory.
//   val_fraction       0.1   fraction of volumes held out for validation when the list has no
//                            "validation" section (0 = none); chosen with `seed`, at least 1 when > 0
//                            and there are >= 2 volumes, never all of them. Range 0 .. 0.9.
//   orientation        "RAS" orientation code every volume is turned to; "" keeps the file's.
//   spacing_mm         null  [x, y, z] mm (or one number = isotropic) to resample to; null = native.
//                            Each 0.01 .. 100 mm (10 µm micro-CT voxels to the thickest slices).
//   intensity                object:
//     mode             "none"  "ct_window" | "zscore_nonzero" | "percentile" | "none"
//     a_min, a_max     -175, 250  ct_window: input range (HU) mapped to b_min .. b_max
//     b_min, b_max     0, 1    output range of ct_window and percentile
//     clip             true    ct_window and percentile: clip the output to b_min .. b_max
//                            (a_min .. b_max and foreground_threshold: finite, at most 1e12 in size)
//     lower_percentile 0.5     percentile: the value at this percentile (0..100) maps to b_min ...
//     upper_percentile 99.5    ... and this one to b_max (per channel, over all voxels)
//                            zscore_nonzero: per channel, (x - mean) / std over the nonzero voxels
//                            (population std; 1 when it is 0); zero voxels stay 0.
//   foreground_threshold null crop to the bounding box of voxels > threshold in any channel (after
//                            intensity); null = off. A volume with no such voxel is kept whole.
//   num_samples        1     random crops taken per volume read (consecutive in a batch).
//   flip_prob          0.0   probability of flipping each spatial axis of a crop.
//   intensity_aug            object: random intensity augmentation of each crop, after crop and flips
//                            (the same draw for every channel of the crop):
//     prob             0.0     probability that a crop is augmented at all (0 = off). An augmented crop
//                            gets, in this order, gamma g ~ log-uniform(gamma): each channel rescaled
//                            to [0, 1] by its own min/max, raised to g and mapped back to that min/max
//                            (a constant channel is left alone; MONAI's RandAdjustContrast), then
//                            x * s + b with s ~ U(scale), b ~ U(shift). Every voxel is changed,
//                            padding and zscore_nonzero's zero background included (as in MONAI).
//                            Drawn from the crop's item seed in a stream of its own, so crops and
//                            flips are the same with and without it; validation crops never get it.
//     scale            [0.9, 1.1]  [lo, hi], each more than 0 and at most 10, lo <= hi.
//     shift            [-0.1, 0.1] [lo, hi] in units of the normalised intensity, at most 1e6 in size.
//     gamma            [0.7, 1.5]  [lo, hi], each more than 0 and at most 10, lo <= hi.
//   workers            2     loader threads (0 = load in the consumer's thread).
//   prefetch           4     ready batches queued ahead of the consumer.
//   cache_dir          ""    folder of the preprocessed-volume cache; "" = the caller decides, still
//                            "" after that = no disk cache.
//   on_bad_volume      "error"  "error": a bad volume stops the run; "skip": the pre-flight check
//                            drops it with a log line.
//   time_point         -1    4D input: read this time point (-1 refuses 4D input).
//   fourth_axis_as_channels false  4D input: read the 4th axis as channels.
//   dicom_slice_tolerance 0.1  DICOM series: largest accepted deviation of a slice-to-slice
//                            distance from the series' median, relative to it (0 .. 0.99).
//
// Published settings: CT (SelfMedMAE on BTCV): orientation "RAS", spacing_mm [1.5, 1.5, 2.0],
// intensity ct_window -175 .. 250 HU -> [0, 1] clipped, foreground_threshold 0, 96^3 crops,
// flip_prob 0.2. MRI: spacing_mm 1.0, intensity zscore_nonzero, 96^3 .. 128^3 crops.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "core/json_reader.h"

namespace mae {

/// Smallest target spacing accepted (mm): micro-CT voxels are about 10 µm.
inline constexpr double kMinTargetSpacingMm = 0.01;
/// Largest target spacing accepted (mm): thick clinical slices are about 10 mm, PET voxels a few.
inline constexpr double kMaxTargetSpacingMm = 100.0;
/// Largest magnitude accepted for the intensity values and the foreground threshold: beyond any
/// scanner's scale, and small enough that differences of them stay finite in float32.
inline constexpr double kMaxIntensity = 1e12;

/// Largest multiplier and gamma of data.intensity_aug (both must also be more than 0).
inline constexpr double kMaxAugScale = 10.0;
/// Largest magnitude of data.intensity_aug's shift.
inline constexpr double kMaxAugShift = 1e6;

/// Intensity normalisation, applied per channel after resampling.
struct IntensityConfig {
  std::string mode = "none";       ///< "ct_window" | "zscore_nonzero" | "percentile" | "none"
  double a_min = -175.0;           ///< ct_window: input value mapped to b_min
  double a_max = 250.0;            ///< ct_window: input value mapped to b_max
  double b_min = 0.0;              ///< output value of a_min / the lower percentile
  double b_max = 1.0;              ///< output value of a_max / the upper percentile
  bool clip = true;                ///< clip ct_window and percentile output to b_min .. b_max
  double lower_percentile = 0.5;   ///< percentile: lower percentile (0 .. 100)
  double upper_percentile = 99.5;  ///< percentile: upper percentile (0 .. 100)
};

/// Random intensity augmentation of each crop (`data.intensity_aug`); see the file comment.
struct IntensityAugConfig {
  double prob = 0.0;                       ///< probability that a crop is augmented, 0 = off
  std::array<double, 2> scale{0.9, 1.1};   ///< multiplier s ~ U(lo, hi)
  std::array<double, 2> shift{-0.1, 0.1};  ///< offset b ~ U(lo, hi), added after scaling
  std::array<double, 2> gamma{0.7, 1.5};   ///< exponent g ~ log-uniform(lo, hi), applied first
};

/// The `data` section; see the file comment for each key's meaning.
struct DataConfig {
  std::string dataset;                              ///< dataset.json, text list, folder or one volume
  double val_fraction = 0.1;                        ///< validation fraction when the list has none
  std::string orientation = "RAS";                  ///< target orientation code, "" = keep
  std::optional<std::array<double, 3>> spacing_mm;  ///< target spacing (x, y, z) mm, nullopt = native
  IntensityConfig intensity;                        ///< intensity normalisation
  std::optional<double> foreground_threshold;       ///< foreground crop threshold, nullopt = off
  int64_t num_samples = 1;                          ///< random crops per volume read
  double flip_prob = 0.0;                           ///< flip probability per spatial axis
  IntensityAugConfig intensity_aug;                 ///< random intensity augmentation per crop
  int workers = 2;                                  ///< loader threads, 0 = inline
  int prefetch = 4;                                 ///< batches queued ahead
  std::string cache_dir;                            ///< disk cache folder, "" = none
  std::string on_bad_volume = "error";              ///< "error" | "skip"
  int64_t time_point = -1;                          ///< 4D input: time point, -1 = refuse 4D
  bool fourth_axis_as_channels = false;             ///< 4D input: 4th axis as channels
  double dicom_slice_tolerance = 0.1;               ///< DICOM: accepted slice-spacing jitter (relative)
};

/// Reads the `data` section strictly: unknown keys (also inside "intensity" and "intensity_aug") are
/// ConfigErrors suggesting the closest key, as are wrong types and out-of-range values. Calls r.finish().
DataConfig read_data_config(JsonReader& r);

/// Checks cross-field rules (a_max > a_min, percentiles ordered, valid orientation code, positive
/// spacing, intensity_aug ranges ordered and in range); ConfigError naming the key. read_data_config
/// calls it; call it after editing a config.
void validate_data_config(const DataConfig& config);

/// True for a valid orientation code: three letters, one each of {R,L}, {A,P}, {S,I}.
bool is_orientation_code(const std::string& code);

}  // namespace mae
