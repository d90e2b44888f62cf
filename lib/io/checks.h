// Internal to lib/io: the checks mae makes on a file before ITK reads it (headers of NIfTI-1/Analyze,
// MetaImage and NRRD parsed by mae itself, voxel bytes counted in the file or in its decompressed
// stream) and on a DICOM series (slice stack geometry, truncated or undecodable pixel data).
// ITK-free.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace mae::io_detail {

/// Throws InputError("<path>: <problem>", cause).
[[noreturn]] void refuse(const std::string& path, const std::string& problem, const char* cause);

/// 14224014 -> "14,224,014".
std::string with_commas(uint64_t n);

/// A double as the user wrote it in a header: "nan", "inf", "-0.5", "1e+30".
std::string number_text(double v);

/// How voxel bytes are stored after the header.
enum class Encoding {
  kRaw,  ///< the bytes themselves
  kGzip  ///< a gzip (possibly multi-member) or zlib stream
};

/// Where the voxel bytes of an image are and how many there must be.
struct VoxelData {
  std::string file;     ///< file holding the voxels
  uint64_t offset = 0;  ///< byte where the (compressed) data starts in `file`
  bool at_end = false;  ///< raw data sits at the end of the file (MetaImage HeaderSize -1, NRRD byte skip -1)
  Encoding encoding = Encoding::kRaw;  ///< how they are stored
  uint64_t skip_decoded = 0;           ///< bytes to skip after decoding, before the voxels (NRRD byte skip)
  uint64_t compressed_limit =
      0;                  ///< >0: the compressed stream holds exactly this many bytes (MetaImage CompressedDataSize)
  uint64_t expected = 0;  ///< voxel bytes the header promises
};

/// Receives the voxel bytes as they are streamed (at most `expected` in total).
using ByteSink = std::function<void(const unsigned char* bytes, size_t n)>;

/// Refuses (truncated data / corrupt compressed data / missing file) unless `data` holds all its
/// voxel bytes; for compressed data the whole stream is decoded (not kept) and its checksum
/// verified. `path` names the image in messages. `sink`, if set, sees every voxel byte in order
/// (raw data is then streamed too).
void check_voxel_data(const std::string& path, const VoxelData& data, const ByteSink& sink = {});

/// What the pre-ITK check learnt beyond "fine".
struct PreflightResult {
  int64_t non_finite = 0;         ///< NaN/Inf voxels stored in a float NIfTI/Analyze file
  int64_t first_non_finite = -1;  ///< index of the first one (x fastest, then y, z, t)
};

/// Checks a NIfTI-1/Analyze, MetaImage or NRRD file's header and voxel byte count before ITK reads
/// it (other extensions pass through). Throws InputError with a cause on every problem.
PreflightResult preflight_file(const std::string& path);

/// Checks the files of one DICOM series before ITK reads them: the slice positions along the
/// normal of ImageOrientationPatient (gaps, duplicates, spacing deviating more than `tolerance`
/// from the median), consistent orientations, finite geometry, and pixel data that is complete
/// (uncompressed) or decodes (compressed transfer syntaxes). `dir` and `series` name it in messages.
void check_dicom_series(const std::string& dir, const std::string& series, const std::vector<std::string>& files,
                        double tolerance);

/// Checks one spacing value (mm) named `field` in messages: finite, positive, within the bounds.
void check_spacing(const std::string& path, const std::string& field, double value_mm, double shown);

/// Checks one origin or translation coordinate (mm) named `field`: finite, within +-kMaxOriginMm.
void check_origin(const std::string& path, const std::string& field, double value);

/// Checks one orientation parameter named `field` (quaternion, direction cosine): finite.
void check_finite(const std::string& path, const std::string& field, double value);

}  // namespace mae::io_detail
