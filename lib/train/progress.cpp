#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace mae {

Progress::Progress(int64_t total, int64_t start_step, int64_t log_every)
    : Progress(total, start_step, log_every, ::isatty(STDOUT_FILENO) == 1) {}

Progress::Progress(int64_t total, int64_t start_step, int64_t log_every, bool live)
    : total_(total), start_step_(start_step), log_every_(log_every), live_(live) {}

std::string Progress::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<long long>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", s / 3600, (s % 3600) / 60);
  } else if (s >= 60) {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", s / 60, s % 60);
  } else {
    std::snprintf(buf, sizeof(buf), "%llds", s);
  }
  return buf;
}

std::string Progress::line(int64_t step, double loss, double smoothed, double lr, double samples_per_s,
                           double data_share) const {
  char buf[256];
  const double eta = avg_step_s_ * static_cast<double>(total_ - step);
  std::snprintf(buf, sizeof(buf), "step %lld/%lld  loss %.4f (avg %.4f)  lr %.2e  %.2f samples/s  data %.0f%%  eta %s",
                static_cast<long long>(step), static_cast<long long>(total_), loss, smoothed, lr, samples_per_s,
                100.0 * data_share, format_duration(eta).c_str());
  return buf;
}

void Progress::update(int64_t step, double loss, double smoothed, double lr, double samples_per_s, double data_share,
                      double step_s) {
  // The first step carries one-off costs (allocation, thread start): keep it out of the ETA.
  const bool first = step == start_step_ + 1;
  avg_step_s_ = first || avg_step_s_ == 0.0 ? step_s : 0.9 * avg_step_s_ + 0.1 * step_s;
  last_ = line(step, loss, smoothed, lr, samples_per_s, data_share);
  if (live_) {
    std::printf("\r\033[K%s", last_.c_str());
    std::fflush(stdout);
    dirty_ = true;
  } else if (step % log_every_ == 0 || step == total_ || first) {
    std::printf("%s\n", last_.c_str());
    std::fflush(stdout);
  }
}

void Progress::note(const std::string& message) {
  pause();
  std::printf("%s\n", message.c_str());
  if (live_ && !last_.empty()) {
    std::printf("%s", last_.c_str());
    dirty_ = true;
  }
  std::fflush(stdout);
}

void Progress::pause() {
  if (dirty_) {
    std::printf("\n");
    std::fflush(stdout);
    dirty_ = false;
  }
}

void Progress::finish() { pause(); }

}  // namespace mae
