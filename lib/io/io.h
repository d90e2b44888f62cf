// Reading and writing volumes (NIfTI-1, Analyze, MetaImage, NRRD, DICOM series), reorientation and
// resampling. The implementation is the only place ITK appears; this header is ITK-free.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "io/volume.h"

namespace mae {

/// How to read files that are not plain 3D scalar volumes.
struct ReadOptions {
  std::string series_uid;               ///< DICOM folder holding several series: the one to read ("" = the only one)
  int64_t time_point = -1;              ///< 4D input: read this time point; -1 refuses 4D input
  bool fourth_axis_as_channels = false; ///< 4D input: read the 4th axis (or vector components) as channels
  bool allow_2d = false;                ///< accept a 2D image as a volume of depth 1
};

/// One series found in a DICOM folder.
struct DicomSeriesInfo {
  std::string uid;          ///< SeriesInstanceUID
  std::string description;  ///< SeriesDescription (may be empty)
  int64_t num_slices = 0;   ///< number of files in the series
};

/// Reads a file (.nii, .nii.gz, .hdr/.img, .mha, .mhd, .nrrd, .nhdr) or a DICOM folder into a
/// float32 Volume. Refuses, with an InputError naming the path and the problem: missing, empty or
/// non-image files, NIfTI-2, 4D/5D without a ReadOptions choice, 2D unless allowed, multi-component
/// pixels unless read as channels, non-orthonormal directions, NaN/Inf voxels, truncated DICOM.
Volume read_volume(const std::string& path, const ReadOptions& options = {});

/// The series in a DICOM folder; InputError when the folder holds none.
std::vector<DicomSeriesInfo> list_dicom_series(const std::string& dir);

/// Writes a volume with its geometry; the format follows the extension (.nii.gz, .nii, .mha, .nrrd).
/// A multi-channel volume is written as a vector image. Throws IoError naming the path on failure,
/// ConfigError for an extension it cannot write.
void write_volume(const Volume& volume, const std::string& path);

/// Writes an 8-bit PNG: `image` is uint8 (H, W) grey or (H, W, 3) RGB. Throws IoError on failure.
void write_png(const at::Tensor& image, const std::string& path);

/// Orientation code of a volume's direction, nibabel/MONAI convention: each letter is the anatomical
/// direction that voxel index (x, y, z) increases towards ("RAS": x to Right, y to Anterior, z to
/// Superior). ITK's identity direction is "LPS".
std::string orientation_code(const Volume& volume);

/// The same voxels permuted and flipped so that orientation_code(result) == code (nibabel/MONAI
/// convention). Physical positions of all voxels are unchanged. ConfigError for an invalid code.
Volume reorient(const Volume& volume, const std::string& code);

/// Resamples onto a grid with the given spacing (mm, x y z), same origin and direction, size =
/// round(extent / spacing); linear interpolation, Gaussian smoothing before downsampling an axis.
Volume resample(const Volume& volume, const std::array<double, 3>& spacing_mm);

/// Resamples `volume` onto the grid (size, spacing, origin, direction) of `reference` (linear).
Volume resample_like(const Volume& volume, const Volume& reference);

}  // namespace mae
