// resample and resample_like: linear resampling of each channel with ITK, with Gaussian smoothing
// before downsampling so that coarse grids do not alias.
//
// Smoothing rule: along an axis whose spacing grows from s_old to s_new, a Gaussian with
// sigma_mm = sqrt(s_new^2 - s_old^2) / (2 sqrt(2 ln 2)) is applied first, i.e. the blur that turns
// a resolution (FWHM) of about one old voxel into about one new voxel. Axes that keep or shrink
// their spacing, and axes shorter than 4 voxels (the recursive filter's minimum), are not smoothed.
// Points past the last voxel centre (up to half a voxel) take the nearest voxel's value, so a
// constant volume stays constant up to the border.
#include <ATen/ATen.h>
#include <itkLinearInterpolateImageFunction.h>
#include <itkNearestNeighborExtrapolateImageFunction.h>
#include <itkNearestNeighborInterpolateImageFunction.h>
#include <itkRecursiveGaussianImageFilter.h>
#include <itkResampleImageFilter.h>

#include <cmath>

#include "core/error.h"
#include "io/io.h"
#include "io/itk_bridge.h"

namespace mae {
namespace {

using io_detail::FloatImage;

// 2 sqrt(2 ln 2): FWHM of a Gaussian in units of sigma.
constexpr double kFwhmPerSigma = 2.3548200450309493;

void check_volume(const Volume& volume, const char* what) {
  if (!volume.data.defined() || volume.data.dim() != 4 || volume.data.numel() == 0) {
    throw InputError(std::string(what) + ": volume data must be a non-empty (C, D, H, W) tensor");
  }
}

// Resamples every channel of `volume` onto the grid given by `grid` (its data only gives sizes):
// linear with nearest-neighbour extrapolation by half a voxel, or (nearest) nearest neighbour with
// 0 outside the volume.
Volume resample_onto(const Volume& volume, const Volume& grid, const std::array<double, 3>& sigma_mm,
                     bool nearest = false) {
  io_detail::ensure_itk_setup();
  const Volume input{volume.data.to(at::kCPU, at::kFloat).contiguous(), volume.spacing, volume.origin,
                     volume.direction};
  const auto out_dhw = grid.shape_dhw();
  FloatImage::SizeType size;
  size[0] = static_cast<itk::SizeValueType>(out_dhw[2]);
  size[1] = static_cast<itk::SizeValueType>(out_dhw[1]);
  size[2] = static_cast<itk::SizeValueType>(out_dhw[0]);
  auto geometry = FloatImage::New();  // carries the output grid's geometry only
  io_detail::set_itk_geometry(geometry, grid);

  std::vector<at::Tensor> channels;
  try {
    for (int64_t c = 0; c < input.channels(); ++c) {
      FloatImage::Pointer image = io_detail::itk_from_volume(input, c);
      const auto in_size = image->GetLargestPossibleRegion().GetSize();
      for (unsigned axis = 0; axis < 3; ++axis) {
        if (sigma_mm[axis] <= 0.0 || in_size[axis] < 4) continue;
        auto smooth = itk::RecursiveGaussianImageFilter<FloatImage, FloatImage>::New();
        smooth->SetInput(image);
        smooth->SetDirection(axis);
        smooth->SetSigma(sigma_mm[axis]);
        smooth->SetOrder(itk::GaussianOrderEnum::ZeroOrder);
        smooth->SetNormalizeAcrossScale(false);
        smooth->Update();
        image = smooth->GetOutput();
        image->DisconnectPipeline();
      }
      auto resampler = itk::ResampleImageFilter<FloatImage, FloatImage>::New();
      resampler->SetInput(image);
      if (nearest) {
        resampler->SetInterpolator(itk::NearestNeighborInterpolateImageFunction<FloatImage, double>::New());
      } else {
        resampler->SetInterpolator(itk::LinearInterpolateImageFunction<FloatImage, double>::New());
        resampler->SetExtrapolator(itk::NearestNeighborExtrapolateImageFunction<FloatImage, double>::New());
      }
      resampler->SetSize(size);
      resampler->SetOutputSpacing(geometry->GetSpacing());
      resampler->SetOutputOrigin(geometry->GetOrigin());
      resampler->SetOutputDirection(geometry->GetDirection());
      resampler->SetDefaultPixelValue(0.0f);
      resampler->Update();
      channels.push_back(io_detail::volume_from_itk(resampler->GetOutput()).data);
    }
  } catch (const itk::ExceptionObject& e) {
    throw Error(std::string("resampling failed: ") + e.GetDescription());
  }
  Volume out{channels.size() == 1 ? channels.front() : at::cat(channels, 0), grid.spacing, grid.origin, grid.direction};
  return out;
}

}  // namespace

Volume resample(const Volume& volume, const std::array<double, 3>& spacing_mm) {
  check_volume(volume, "resample");
  for (double s : spacing_mm) {
    if (!(s > 0.0) || !std::isfinite(s)) {
      throw ConfigError("resample: spacing must be positive and finite, got " + std::to_string(spacing_mm[0]) + " " +
                        std::to_string(spacing_mm[1]) + " " + std::to_string(spacing_mm[2]));
    }
  }
  const auto dhw = volume.shape_dhw();
  const int64_t in_xyz[3] = {dhw[2], dhw[1], dhw[0]};
  int64_t out_xyz[3];
  std::array<double, 3> sigma_mm{0.0, 0.0, 0.0};
  for (int i = 0; i < 3; ++i) {
    const double extent = static_cast<double>(in_xyz[i]) * volume.spacing[i];
    out_xyz[i] = std::max<int64_t>(1, std::llround(extent / spacing_mm[i]));
    if (spacing_mm[i] > volume.spacing[i]) {
      sigma_mm[i] = std::sqrt(spacing_mm[i] * spacing_mm[i] - volume.spacing[i] * volume.spacing[i]) / kFwhmPerSigma;
    }
  }
  Volume grid{at::empty({1, out_xyz[2], out_xyz[1], out_xyz[0]}), spacing_mm, volume.origin, volume.direction};
  return resample_onto(volume, grid, sigma_mm);
}

Volume resample_like(const Volume& volume, const Volume& reference) {
  check_volume(volume, "resample_like");
  check_volume(reference, "resample_like reference");
  return resample_onto(volume, reference, {0.0, 0.0, 0.0});
}

Volume resample_labels_like(const Volume& labels, const Volume& reference) {
  check_volume(labels, "resample_labels_like");
  check_volume(reference, "resample_labels_like reference");
  return resample_onto(labels, reference, {0.0, 0.0, 0.0}, /*nearest=*/true);
}

}  // namespace mae
