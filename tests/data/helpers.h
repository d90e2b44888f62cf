// Shared helpers of the data tests: a temporary folder, synthetic volumes and a log capture.
#pragma once

#include <ATen/ATen.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "../common/temp_dir.h"
#include "io/volume.h"

namespace mae::test {

/// A volume (C, D, H, W) of smooth pseudo-random values in [lo, hi) with the given spacing.
inline Volume make_volume(int64_t c, int64_t d, int64_t h, int64_t w, double lo = 0.0, double hi = 1.0,
                          std::array<double, 3> spacing = {1.0, 1.0, 1.0}, uint64_t seed = 1) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  Volume v;
  v.data = (at::rand({c, d, h, w}, gen, at::kFloat) * (hi - lo) + lo).contiguous();
  v.spacing = spacing;
  return v;
}

/// Writes `text` to a file.
inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

/// Captures what is logged through spdlog's default logger while alive.
struct LogCapture {
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(256);
  std::shared_ptr<spdlog::logger> old = spdlog::default_logger();
  LogCapture() { spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink)); }
  ~LogCapture() { spdlog::set_default_logger(old); }
  /// Everything captured, one message a line.
  std::string text() const {
    std::string out;
    for (const auto& l : sink->last_formatted()) out += l;
    return out;
  }
};

}  // namespace mae::test
