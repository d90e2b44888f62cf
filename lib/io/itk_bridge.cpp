// The Volume <-> ITK image conversion (axis order reversed, buffers shared where possible), IO
// factory registration, and the per-thread capture of ITK and GDCM warnings.
#include "io/itk_bridge.h"

#include <ATen/ATen.h>
#include <gdcmTrace.h>
#include <itkGDCMImageIOFactory.h>
#include <itkImportImageFilter.h>
#include <itkMetaImageIOFactory.h>
#include <itkNiftiImageIOFactory.h>
#include <itkNrrdImageIOFactory.h>
#include <itkOutputWindow.h>
#include <itkPNGImageIOFactory.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <mutex>
#include <sstream>
#include <streambuf>

namespace mae::io_detail {
namespace {

// The capture buffer of the current thread; null when this thread is not capturing.
thread_local std::string* current_capture = nullptr;

void route_text(const char* text, size_t n) {
  if (current_capture != nullptr) {
    current_capture->append(text, n);
  } else {
    std::cerr.write(text, static_cast<std::streamsize>(n));
  }
}

// itk::OutputWindow that hands every message to the capturing thread's buffer, or to stderr.
class CapturingOutputWindow : public itk::OutputWindow {
 public:
  static itk::SmartPointer<CapturingOutputWindow> create() {
    itk::SmartPointer<CapturingOutputWindow> window = new CapturingOutputWindow;
    window->UnRegister();  // the SmartPointer holds the only reference
    return window;
  }
  // Each ITK message ends with a blank line, so WarningCapture::messages() can tell them apart.
  void DisplayText(const char* text) override {
    const size_t n = std::strlen(text);
    route_text(text, n);
    route_text("\n\n", n > 0 && text[n - 1] == '\n' ? 1 : 2);
  }
};

// Unbuffered streambuf for gdcm::Trace: each write goes straight to route_text, so messages of
// different threads never share a buffer.
class RoutingStreambuf : public std::streambuf {
 protected:
  int_type overflow(int_type c) override {
    if (!traits_type::eq_int_type(c, traits_type::eof())) {
      const char ch = traits_type::to_char_type(c);
      route_text(&ch, 1);
    }
    return traits_type::not_eof(c);
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    route_text(s, static_cast<size_t>(n));
    return n;
  }
};

}  // namespace

std::array<int64_t, 3> dhw_from_xyz(const itk::Size<3>& size) {
  return {static_cast<int64_t>(size[2]), static_cast<int64_t>(size[1]),
          static_cast<int64_t>(size[0])};
}

void set_itk_geometry(itk::ImageBase<3>* image, const Volume& volume) {
  FloatImage::SpacingType spacing;
  FloatImage::PointType origin;
  FloatImage::DirectionType direction;
  for (unsigned i = 0; i < 3; ++i) {
    spacing[i] = volume.spacing[i];
    origin[i] = volume.origin[i];
    for (unsigned j = 0; j < 3; ++j) direction(i, j) = volume.direction[i * 3 + j];
  }
  image->SetSpacing(spacing);
  image->SetOrigin(origin);
  image->SetDirection(direction);
}

void get_itk_geometry(const itk::ImageBase<3>* image, Volume& volume) {
  for (unsigned i = 0; i < 3; ++i) {
    volume.spacing[i] = image->GetSpacing()[i];
    volume.origin[i] = image->GetOrigin()[i];
    for (unsigned j = 0; j < 3; ++j) volume.direction[i * 3 + j] = image->GetDirection()(i, j);
  }
}

// ITK's buffer is x fastest, z slowest; a contiguous (D, H, W) tensor is W fastest, D slowest. The
// two memory layouts are identical, so the conversion is only a reversal of the size order.
Volume volume_from_itk(FloatImage* image) {
  Volume volume;
  get_itk_geometry(image, volume);
  const auto dhw = dhw_from_xyz(image->GetLargestPossibleRegion().GetSize());
  const std::vector<int64_t> sizes{1, dhw[0], dhw[1], dhw[2]};
  auto* container = image->GetPixelContainer();
  const auto options = at::TensorOptions().dtype(at::kFloat);
  if (container->GetContainerManageMemory() && image->GetBufferedRegion() ==
                                                    image->GetLargestPossibleRegion()) {
    // Take over the buffer ITK allocated with new[]; the tensor frees it with delete[].
    float* buffer = container->GetImportPointer();
    container->SetContainerManageMemory(false);
    volume.data = at::from_blob(
        buffer, sizes, [](void* p) { delete[] static_cast<float*>(p); }, options);
  } else {
    volume.data = at::from_blob(image->GetBufferPointer(), sizes, options).clone();
  }
  return volume;
}

FloatImage::Pointer itk_from_volume(const Volume& volume, int64_t channel) {
  TORCH_CHECK(volume.data.dim() == 4 && volume.data.scalar_type() == at::kFloat &&
                  volume.data.is_contiguous() && volume.data.device().is_cpu(),
              "itk_from_volume: data must be a contiguous float32 CPU (C, D, H, W) tensor, got ",
              volume.data.sizes(), " ", volume.data.scalar_type());
  TORCH_CHECK(channel >= 0 && channel < volume.data.size(0), "itk_from_volume: channel ", channel,
              " out of range for ", volume.data.size(0), " channels");
  using Importer = itk::ImportImageFilter<float, 3>;
  auto importer = Importer::New();
  Importer::SizeType size;
  const auto dhw = volume.shape_dhw();
  size[0] = static_cast<itk::SizeValueType>(dhw[2]);
  size[1] = static_cast<itk::SizeValueType>(dhw[1]);
  size[2] = static_cast<itk::SizeValueType>(dhw[0]);
  Importer::IndexType start;
  start.Fill(0);
  importer->SetRegion(Importer::RegionType(start, size));
  const int64_t voxels = dhw[0] * dhw[1] * dhw[2];
  float* data = volume.data.data_ptr<float>() + channel * voxels;
  importer->SetImportPointer(data, static_cast<itk::SizeValueType>(voxels),
                             /*LetImageContainerManageMemory=*/false);
  importer->Update();
  FloatImage::Pointer image = importer->GetOutput();
  image->DisconnectPipeline();
  set_itk_geometry(image, volume);
  return image;
}

void ensure_itk_setup() {
  static std::once_flag once;
  std::call_once(once, [] {
    itk::NiftiImageIOFactory::RegisterOneFactory();
    itk::MetaImageIOFactory::RegisterOneFactory();
    itk::NrrdImageIOFactory::RegisterOneFactory();
    itk::GDCMImageIOFactory::RegisterOneFactory();
    itk::PNGImageIOFactory::RegisterOneFactory();
    itk::OutputWindow::SetInstance(CapturingOutputWindow::create());
    static RoutingStreambuf gdcm_buf;
    static std::ostream gdcm_stream(&gdcm_buf);
    gdcm::Trace::SetStream(gdcm_stream);
  });
}

WarningCapture::WarningCapture() : previous_(current_capture) {
  ensure_itk_setup();
  current_capture = &text_;
}

WarningCapture::~WarningCapture() {
  current_capture = previous_;
  if (previous_ != nullptr) previous_->append(text_);
}

std::vector<std::string> WarningCapture::messages() const {
  // ITK messages span several lines ("WARNING: In file, line\nClass (0x..): text\n\n"): join
  // each block into one line.
  std::vector<std::string> out;
  std::istringstream in(text_);
  std::string line;
  std::string block;
  auto flush = [&] {
    if (!block.empty()) out.push_back(block);
    block.clear();
  };
  while (std::getline(in, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty()) {
      flush();
      continue;
    }
    if (!block.empty()) block += " ";
    block += line;
  }
  flush();
  return out;
}

double orthonormality_error(const std::array<double, 9>& d) {
  double worst = 0.0;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      double dot = 0.0;
      for (int k = 0; k < 3; ++k) dot += d[k * 3 + i] * d[k * 3 + j];
      worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
    }
  }
  return worst;
}

}  // namespace mae::io_detail
