#include "cli.h"

#include <c10/util/Exception.h>
#include <unistd.h>
#ifdef MAE3D_HAVE_SPDLOG
#include <spdlog/spdlog.h>
#endif

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "core/cpu_arena.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"

namespace mae {

namespace {

std::string number_text(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string seconds_text(double s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%.0fs", s);
  } else {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  }
  return buf;
}

// A message as one line: trailing white space dropped, control characters escaped.
std::string one_line(std::string message) {
  while (!message.empty() && std::isspace(static_cast<unsigned char>(message.back()))) message.pop_back();
  return printable(message);
}

}  // namespace

CLI::Validator int_range(int64_t lo, int64_t hi) {
  const std::string allowed = "allowed: " + std::to_string(lo) + " .. " + std::to_string(hi);
  return CLI::Validator(
      [lo, hi, allowed](std::string& input) -> std::string {
        const std::string shown = printable(input);
        const char* s = input.c_str();
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(s, &end, 10);
        if (input.empty() || end == s || *end != '\0') {
          char* fend = nullptr;
          const double f = std::strtod(s, &fend);
          if (!input.empty() && fend != s && *fend == '\0' && std::isfinite(f) && f != std::floor(f)) {
            return shown + " is not a whole number; " + allowed;
          }
          return shown + " is not an integer; " + allowed;
        }
        if (errno == ERANGE || v < lo || v > hi) return shown + " is out of range; " + allowed;
        return std::string();
      },
      "INT in " + std::to_string(lo) + " .. " + std::to_string(hi));
}

CLI::Validator real_range(double lo, double hi) {
  const std::string allowed = "allowed: " + number_text(lo) + " .. " + number_text(hi);
  return CLI::Validator(
      [lo, hi, allowed](std::string& input) -> std::string {
        const std::string shown = printable(input);
        const char* s = input.c_str();
        char* end = nullptr;
        const double v = std::strtod(s, &end);
        if (input.empty() || end == s || *end != '\0' || !std::isfinite(v))
          return shown + " is not a number; " + allowed;
        if (v < lo || v > hi) return shown + " is out of range; " + allowed;
        return std::string();
      },
      "NUMBER in " + number_text(lo) + " .. " + number_text(hi));
}

void add_common_flags(CLI::App& app, CommonFlags& flags) {
  app.add_option("--threads", flags.threads, "intra-op threads (0 = all hardware threads)")
      ->check(int_range(0, kMaxThreads));
  app.add_option("--log-level", flags.log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
}

void apply_common_flags(const CommonFlags& flags) {
  if (flags.threads > kMaxThreads) {
    throw ConfigError("--threads " + std::to_string(flags.threads) + " is out of range; allowed: 0 .. " +
                      std::to_string(kMaxThreads));
  }
  set_threads(flags.threads);
#ifdef MAE3D_HAVE_SPDLOG
  spdlog::set_level(spdlog::level::from_str(flags.log_level));
#endif
}

ProgressLine::ProgressLine(std::string label, double after_s, int64_t many)
    : label_(std::move(label)), after_s_(after_s), many_(many), tty_(::isatty(STDERR_FILENO) == 1) {}

ProgressLine::~ProgressLine() {
  if (open_line_) std::cerr << std::endl;
}

void ProgressLine::update(int64_t done, int64_t total) {
  const auto now = Clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  if (!shown_ && elapsed < after_s_ && total < many_) return;
  const bool last = done >= total;
  const int64_t tenth = total > 0 ? done * 10 / total : 10;
  const double since = std::chrono::duration<double>(now - last_).count();
  if (shown_ && !last) {
    if (tty_ && since < 0.2) return;
    if (!tty_ && tenth == last_tenth_ && since < 10.0) return;
  }
  shown_ = true;
  last_ = now;
  last_tenth_ = tenth;
  std::string line = label_ + " " + std::to_string(done) + "/" + std::to_string(total);
  if (total > 0) line += " (" + std::to_string(done * 100 / total) + "%)";
  line += ", " + seconds_text(elapsed);
  if (done > 0 && !last) line += ", eta " + seconds_text(elapsed * static_cast<double>(total - done) / done);
  if (tty_) {
    std::cerr << "\r" << line << "\033[K" << std::flush;
    open_line_ = !last;
    if (last) std::cerr << std::endl;
  } else {
    std::cerr << line << std::endl;
  }
}

namespace {

// "rank R: " for a process of a multi-rank launch (RANK or SLURM_PROCID with a world size above 1),
// so that an error raised before the ranks meet still says which rank it came from.
std::string rank_label(const std::string& message) {
  const char* size = std::getenv("WORLD_SIZE");
  const char* rank = std::getenv("RANK");
  if (!size && !rank) {
    size = std::getenv("SLURM_NTASKS");
    rank = std::getenv("SLURM_PROCID");
  }
  if (!size || !rank || std::atoi(size) <= 1 || message.rfind("rank ", 0) == 0) return "";
  return "rank " + std::string(rank) + ": ";
}

}  // namespace

int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  const std::string name = app.get_name();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::cerr << name << ": error: " << one_line(e.what()) << " (see --help)" << std::endl;
    return 2;
  }
  tune_allocator();
  try {
    install_cpu_arena();  // large CPU tensors in a best-fit arena unless MAE3D_CPU_ALLOCATOR=system
    return body();
  } catch (const Error& e) {
    const std::string line = one_line(e.what());
    std::cerr << name << ": error: " << rank_label(line) << line << std::endl;
    return e.exit_code();
  } catch (const c10::Error& e) {
    const std::string line = one_line(e.what_without_backtrace());
    std::cerr << name << ": error: " << rank_label(line) << line << std::endl;
    return 1;
  } catch (const std::exception& e) {
    const std::string line = one_line(e.what());
    std::cerr << name << ": error: " << rank_label(line) << line << std::endl;
    return 1;
  }
}

}  // namespace mae
