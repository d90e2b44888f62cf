// The console progress of a training run: one live line on a terminal, periodic plain lines when
// stdout is a file or a pipe (CI logs, nohup, SLURM output).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace mae {

/// Progress display for steps start_step+1 .. total.
class Progress {
 public:
  /// live: redraw one line (default: when stdout is a terminal); otherwise a line every log_every steps.
  Progress(int64_t total, int64_t start_step, int64_t log_every);
  Progress(int64_t total, int64_t start_step, int64_t log_every, bool live);

  /// Shows step `step` (1-based count of steps done). data_share: data wait / step time.
  void update(int64_t step, double loss, double smoothed_loss, double lr, double samples_per_s, double data_share,
              double step_s);
  /// Prints a message on its own line, keeping the live line below it.
  void note(const std::string& message);
  /// Ends the live line so other output starts on a fresh line.
  void pause();
  /// Ends the display.
  void finish();

  /// Formats seconds as "1h02m", "4m05s" or "12s".
  static std::string format_duration(double seconds);

 private:
  std::string line(int64_t step, double loss, double smoothed, double lr, double samples_per_s,
                   double data_share) const;

  int64_t total_, start_step_, log_every_;
  bool live_;
  bool dirty_ = false;
  double avg_step_s_ = 0.0;
  std::string last_;
};

}  // namespace mae
