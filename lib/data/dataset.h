// The list of volumes to train on: read from an MSD/MONAI dataset.json, a text list, a folder or a
// single volume file, and split into training and validation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/printable.h"  // printable(): messages name paths with their control characters escaped

namespace mae {

/// One volume of the dataset: one path per channel (a file or a DICOM folder).
struct DatasetEntry {
  std::vector<std::string> paths;  ///< absolute or list-relative-resolved paths, one per channel
  std::string series_uid;          ///< DICOM folder: the series to read ("" = the only one)

  /// The paths joined with " + " (for messages).
  std::string name() const;
};

/// Training and validation volumes.
struct DatasetSplit {
  std::vector<DatasetEntry> training;    ///< volumes to train on (never empty)
  std::vector<DatasetEntry> validation;  ///< held-out volumes (may be empty)
};

/// True when `path` names a volume file by its extension (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr, .hdr).
bool is_volume_file(const std::string& path);

/// True when `dir` is a folder holding DICOM files (a .dcm file, or "DICM" at byte 128 of a file).
bool is_dicom_folder(const std::string& dir);

/// Why `path` cannot be opened as a listed file or folder, in words ("" when it can): "file not
/// found", "broken symbolic link (...)", "symbolic link loop (...)", "permission denied", ...
/// `cause`, when given, receives the refusal's label ("missing file", "symlink loop",
/// "permission denied").
std::string path_problem(const std::string& path, std::string* cause = nullptr);

/// Reads a dataset description:
///  - "*.json": MSD/MONAI dataset.json; "training" (required) and "validation" (optional) are arrays of
///    {"image": path | [paths], "series_uid": optional} (or plain path strings); paths relative to the
///    json's folder;
///  - a folder: its volume files and DICOM sub-folders, sorted by name, not recursive. Entries that
///    cannot be examined (symbolic link loops, broken links, unreadable sub-folders) are listed when
///    their name may be a volume or a DICOM folder, so the check refuses each by name; "lost+found"
///    is ignored. A folder that holds DICOM files itself and no other volume is that one series
///    (InputError listing the series UIDs when it holds several);
///  - a volume file: a list of one;
///  - any other file: a text list, one path per line, '#' starts a comment line, relative to its folder.
/// InputError naming the file (and entry) for a missing or unreadable list, bad JSON, a missing
/// "training", a non-string image, an empty list, (when require_files) a listed path that cannot
/// be opened, and a volume listed twice (cause "duplicate volume"): the same file (also through
/// symbolic or hard links, "./a" or "a") or the same DICOM folder and series, within or across the
/// training and validation lists, naming both positions.
DatasetSplit read_dataset(const std::string& path, bool require_files = true);

/// Holds out round(val_fraction * N) (at least 1, at most N - 1) training volumes chosen with `seed`
/// when `split.validation` is empty, val_fraction > 0 and N >= 2; both parts keep the list order.
DatasetSplit split_validation(DatasetSplit split, double val_fraction, uint64_t seed);

}  // namespace mae
