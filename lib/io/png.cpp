// encode_png: see png.h. The PNG specification (ISO/IEC 15948) in brief: all integers big-endian;
// a chunk is length (4 bytes, of the data only), type (4 ASCII letters), data, and the CRC-32 of
// type + data.
#include "io/png.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "core/error.h"

namespace mae {
namespace {

void put_u32(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>((v >> 24) & 0xFF));
  out.push_back(static_cast<char>((v >> 16) & 0xFF));
  out.push_back(static_cast<char>((v >> 8) & 0xFF));
  out.push_back(static_cast<char>(v & 0xFF));
}

void put_chunk(std::string& out, const char type[4], const std::string& data) {
  put_u32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.append(type, 4);
  out += data;
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* bytes = reinterpret_cast<const Bytef*>(out.data() + start);
  size_t left = out.size() - start;
  while (left > 0) {  // crc32 takes a uInt length: feed it in pieces below 4 GiB
    const uInt n = static_cast<uInt>(std::min<size_t>(left, 1u << 30));
    crc = crc32(crc, bytes, n);
    bytes += n;
    left -= n;
  }
  put_u32(out, static_cast<uint32_t>(crc));
}

}  // namespace

std::string encode_png(const at::Tensor& image) {
  const bool shape_ok =
      image.defined() && (image.dim() == 2 || (image.dim() == 3 && (image.size(2) == 1 || image.size(2) == 3)));
  if (!shape_ok || image.scalar_type() != at::kByte || image.numel() == 0) {
    throw Error("cannot encode a PNG: the image must be a non-empty uint8 (H, W), (H, W, 1) or (H, W, 3) tensor");
  }
  const int64_t h = image.size(0), w = image.size(1), channels = image.dim() == 2 ? 1 : image.size(2);
  constexpr int64_t kMaxSide = std::numeric_limits<int32_t>::max();
  if (h > kMaxSide || w > kMaxSide) {
    throw Error("cannot encode a PNG of " + std::to_string(w) + " x " + std::to_string(h) +
                " pixels: each side must be at most 2^31 - 1");
  }
  const at::Tensor pixels = image.to(at::kCPU).contiguous();
  const auto* src = pixels.data_ptr<uint8_t>();
  const size_t row = static_cast<size_t>(w * channels);

  // Scanlines, each preceded by its filter type (0: the bytes as they are).
  std::vector<uint8_t> raw(static_cast<size_t>(h) * (row + 1));
  for (int64_t y = 0; y < h; ++y) {
    uint8_t* dst = raw.data() + static_cast<size_t>(y) * (row + 1);
    dst[0] = 0;
    std::copy(src + static_cast<size_t>(y) * row, src + static_cast<size_t>(y + 1) * row, dst + 1);
  }
  uLongf packed_size = compressBound(static_cast<uLong>(raw.size()));
  std::string packed(packed_size, '\0');
  const int rc =
      compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size, raw.data(), static_cast<uLong>(raw.size()), 6);
  if (rc != Z_OK) throw Error("cannot encode a PNG: zlib's compress2 failed (" + std::to_string(rc) + ")");
  packed.resize(packed_size);

  std::string ihdr;
  put_u32(ihdr, static_cast<uint32_t>(w));
  put_u32(ihdr, static_cast<uint32_t>(h));
  ihdr.push_back(8);                      // bit depth
  ihdr.push_back(channels == 3 ? 2 : 0);  // colour type: 2 = RGB, 0 = grey
  ihdr.push_back(0);                      // compression: deflate
  ihdr.push_back(0);                      // filter method: adaptive (types 0..4 per line)
  ihdr.push_back(0);                      // no interlace

  std::string out("\x89PNG\r\n\x1a\n", 8);
  put_chunk(out, "IHDR", ihdr);
  put_chunk(out, "IDAT", packed);
  put_chunk(out, "IEND", "");
  return out;
}

}  // namespace mae
