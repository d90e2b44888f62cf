// What every mae3d program shares on its command line: the common flags, readable range checks
// for numeric flags, a progress line for long loops, and the one place where errors become a
// one-line message and an exit status.
#pragma once

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace mae {

/// Flags every program has.
struct CommonFlags {
  int threads = 0;                 ///< intra-op threads, 0 = all hardware threads
  std::string log_level = "info";  ///< trace | debug | info | warn | error | off
};

/// Most intra-op threads a program accepts (--threads, config "threads").
inline constexpr int kMaxThreads = 4096;

/// Adds --threads (0 .. kMaxThreads) and --log-level to `app`.
void add_common_flags(CLI::App& app, CommonFlags& flags);

/// Applies the common flags (thread count, log level). Throws ConfigError on bad values.
void apply_common_flags(const CommonFlags& flags);

/// Validator of an integer flag in lo .. hi. Unlike CLI::PositiveNumber / NonNegativeNumber (whose
/// message prints DBL_MAX in 300 digits) it names the range in plain numbers and refuses fractions,
/// booleans and values that overflow: "0 is out of range; allowed: 1 .. 100000".
CLI::Validator int_range(int64_t lo, int64_t hi);

/// Validator of a real-valued flag in lo .. hi (finite numbers only), with a readable message.
CLI::Validator real_range(double lo, double hi);

/// A progress line on stderr for a long loop. Silent for short work: it shows once the loop has
/// run `after_s` seconds or when `total` is at least `many` items. On a terminal the line is
/// redrawn in place; otherwise (a log file, a pipe) plain lines come at most every 10 % or 10 s.
class ProgressLine {
 public:
  /// `label` starts every line ("mae-reconstruct: window").
  explicit ProgressLine(std::string label, double after_s = 2.0, int64_t many = 64);
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;
  /// Ends a redrawn line with a newline.
  ~ProgressLine();
  /// Reports `done` of `total` items.
  void update(int64_t done, int64_t total);

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_;
  double after_s_;
  int64_t many_;
  bool tty_;
  bool shown_ = false;
  bool open_line_ = false;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_ = Clock::now();
  int64_t last_tenth_ = -1;
};

/// Parses argv into `app` and runs `body`, turning every error into one line on stderr (control
/// characters escaped) and the exit status of ARCHITECTURE.md: 0 done, 1 failure while running,
/// 2 bad usage/config/input.
int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

}  // namespace mae
