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
  std::string series_uid;                ///< DICOM folder holding several series: the one to read ("" = the only one)
  int64_t time_point = -1;               ///< 4D input: read this time point; -1 refuses 4D input
  bool fourth_axis_as_channels = false;  ///< 4D input: read the 4th axis (or vector components) as channels
  bool allow_2d = false;                 ///< accept a 2D image (one slice, any axis of size 1) as a volume
  /// DICOM series: largest accepted deviation of one slice-to-slice distance from the series' median
  /// distance, relative to that median. 0.1 accepts the ~1 % float jitter of real scanners (and
  /// anything below a tenth of a slice, less than linear resampling's own error) and refuses a
  /// missing slice (+100 %), duplicated positions and mixed spacings. Must be in [0, 1).
  double slice_spacing_tolerance = 0.1;
};

/// The `cause` of every InputError that read_volume and list_dicom_series throw: the check that
/// refused the input, a fixed vocabulary for summaries that count refusals by cause.
namespace input_cause {
/// The path does not exist, or a file a header names (NIfTI .img, MetaImage/NRRD data file) is missing.
inline constexpr const char* kMissingFile = "missing file";
/// Empty, not an image format mae reads, or a folder without DICOM series.
inline constexpr const char* kNotAnImage = "not an image";
/// An image format or variant mae does not read (NIfTI-2, a voxel type or encoding ITK cannot decode).
inline constexpr const char* kUnsupportedFormat = "unsupported format";
/// Header fields that describe no image (dim <= 0, bad vox_offset, unparsable MetaImage/NRRD field).
inline constexpr const char* kCorruptHeader = "corrupt header";
/// Fewer voxel bytes in the file (or in its decompressed data) than the header promises.
inline constexpr const char* kTruncatedData = "truncated data";
/// A compressed stream that does not decode: bad data, bad CRC, missing end marker.
inline constexpr const char* kCorruptCompressed = "corrupt compressed data";
/// Spacing, origin or orientation that is non-finite, non-positive, absurd or not a rotation.
inline constexpr const char* kImpossibleGeometry = "impossible geometry";
/// 1D/2D/single-voxel, 4D/5D or multi-component input the ReadOptions do not allow.
inline constexpr const char* kUnsupportedDimensions = "unsupported dimensions";
/// NaN or infinite voxel values.
inline constexpr const char* kNonFiniteVoxels = "non-finite voxels";
/// A DICOM slice stack with a gap, duplicated positions, uneven spacing or mixed orientations.
inline constexpr const char* kDicomSliceSpacing = "DICOM slice spacing";
/// Several DICOM series in a folder and no (or an unknown) series_uid.
inline constexpr const char* kAmbiguousSeries = "ambiguous DICOM series";
/// The reader (ITK/GDCM) failed or warned for a reason none of the checks above names.
inline constexpr const char* kUnreadable = "unreadable data";
}  // namespace input_cause

/// Geometry bounds read_volume enforces: every spacing must lie in [kMinSpacingMm, kMaxSpacingMm]
/// (1 nm to 10 m: nothing a scanner images lies outside) and every origin coordinate within
/// +-kMaxOriginMm (1 km).
inline constexpr double kMinSpacingMm = 1e-6;
/// Largest accepted spacing, mm (see kMinSpacingMm).
inline constexpr double kMaxSpacingMm = 1e4;
/// Largest accepted |origin coordinate|, mm (see kMinSpacingMm).
inline constexpr double kMaxOriginMm = 1e6;

/// One series found in a DICOM folder.
struct DicomSeriesInfo {
  std::string uid;          ///< SeriesInstanceUID
  std::string description;  ///< SeriesDescription (may be empty)
  int64_t num_slices = 0;   ///< number of files in the series
};

/// Reads a file (.nii, .nii.gz, .hdr/.img, .mha, .mhd, .nrrd, .nhdr) or a DICOM folder into a
/// float32 Volume. Headers are checked by mae before ITK sees the file, so ITK never allocates or
/// computes from a bad one. Refuses, with a one-line InputError naming the path, the problem and a
/// cause from input_cause: missing, empty or non-image files, NIfTI-2, fewer voxel bytes than the
/// header promises (raw, or after decompressing gzip/zlib data: .nii.gz, .img.gz, MetaImage
/// CompressedData, NRRD gzip; and DICOM, compressed pixel data decoded), corrupt compressed
/// streams (bad data, CRC or trailer), non-finite, non-positive or out-of-bounds spacing and
/// non-finite orientation or origin (naming the header field: pixdim[2], quatern_c, srow_x[3],
/// ElementSpacing, space directions, PixelSpacing...), 4D/5D without a ReadOptions choice, 1D,
/// single-voxel and (unless allowed) 2D images, multi-component pixels unless read as channels,
/// non-orthonormal directions, NaN/Inf voxels, DICOM stacks with gaps, duplicate positions,
/// mixed orientations or spacing jitter above slice_spacing_tolerance.
///
/// NIfTI: the qform is checked only when qform_code > 0 and the sform only when sform_code > 0,
/// as the standard (and nibabel) use them; an unused transform's fields are ignored.
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

/// Resamples a label volume onto the grid of `reference` with nearest-neighbour interpolation (label
/// values are kept exactly); points outside the label volume get 0 (background).
Volume resample_labels_like(const Volume& labels, const Volume& reference);

}  // namespace mae
