// PNG encoding in memory, for pictures that go into other files (TensorBoard image summaries).
// write_png (io.h) writes a file through ITK; this encoder needs only zlib: a signature, IHDR
// (8-bit grey or RGB, no interlace), one IDAT (every scanline with filter type 0, deflated by
// zlib) and IEND, each chunk with its CRC-32 (zlib's crc32).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace mae {

/// The PNG file bytes of `image`: uint8 (H, W) or (H, W, 1) grey, or (H, W, 3) RGB, on any device
/// and in any layout (copied to a contiguous CPU tensor first). Error (a caller's mistake, exit 1)
/// for another dtype or shape, an empty image or a side above 2^31 - 1 (PNG's limit).
std::string encode_png(const at::Tensor& image);

}  // namespace mae
