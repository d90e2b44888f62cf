// Internal to lib/io (and its tests): the one place where a Volume meets an ITK image, plus the
// capture of ITK and GDCM warnings during a read. Includes ITK, so no other area may include it.
#pragma once

#include <itkImage.h>
#include <itkVectorImage.h>

#include <string>
#include <vector>

#include "io/volume.h"

namespace mae::io_detail {

/// ITK image type every read, resample and write goes through.
using FloatImage = itk::Image<float, 3>;
/// Multi-component (channel-interleaved) ITK image, used for multi-channel files.
using FloatVectorImage = itk::VectorImage<float, 3>;
/// 4D ITK image; its buffer is already (T, D, H, W) in tensor terms.
using FloatImage4 = itk::Image<float, 4>;

/// Tensor sizes (D, H, W) of an ITK size (x, y, z): the axis order is reversed.
std::array<int64_t, 3> dhw_from_xyz(const itk::Size<3>& size);

/// Volume from a scalar ITK image: takes over the image's buffer when the image owns it (no copy),
/// copies otherwise. Result: data (1, D, H, W) with voxel (d, h, w) = ITK pixel index (w, h, d).
Volume volume_from_itk(FloatImage* image);

/// ITK image viewing channel `channel` of the volume, no copy: the volume's tensor must outlive it.
FloatImage::Pointer itk_from_volume(const Volume& volume, int64_t channel);

/// Copies the geometry of a Volume (spacing, origin, direction) onto an ITK image.
void set_itk_geometry(itk::ImageBase<3>* image, const Volume& volume);

/// Copies the geometry of an ITK image into a Volume.
void get_itk_geometry(const itk::ImageBase<3>* image, Volume& volume);

/// Registers the image IO factories mae reads and writes (NIfTI/Analyze, MetaImage, NRRD, DICOM,
/// PNG) and installs the warning capture; safe to call from any thread, does its work once.
void ensure_itk_setup();

/// While alive, ITK (itk::OutputWindow) and GDCM (gdcm::Trace) messages emitted by this thread are
/// collected instead of printed. Messages from other threads are not affected.
class WarningCapture {
 public:
  /// Starts collecting this thread's messages.
  WarningCapture();
  /// Stops collecting; messages of an enclosing capture continue to be collected there.
  ~WarningCapture();
  WarningCapture(const WarningCapture&) = delete;
  WarningCapture& operator=(const WarningCapture&) = delete;

  /// The messages collected so far, each trimmed to one line.
  std::vector<std::string> messages() const;

 private:
  std::string text_;
  std::string* previous_ = nullptr;
};

/// Largest |D^T D - I| entry of a row-major 3x3 matrix (0 for an orthonormal matrix).
double orthonormality_error(const std::array<double, 9>& direction);

}  // namespace mae::io_detail
