// What every mae3d program shares on its command line: the common flags and the one place where
// errors become a one-line message and an exit status.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace mae {

/// Flags every program has.
struct CommonFlags {
  int threads = 0;                 ///< intra-op threads, 0 = all hardware threads
  std::string log_level = "info";  ///< trace | debug | info | warn | error | off
};

/// Adds --threads and --log-level to `app`.
void add_common_flags(CLI::App& app, CommonFlags& flags);

/// Applies the common flags (thread count, log level). Throws ConfigError on bad values.
void apply_common_flags(const CommonFlags& flags);

/// Parses argv into `app` and runs `body`, turning every error into one line on stderr and the
/// exit status of ARCHITECTURE.md: 0 done, 1 failure while running, 2 bad usage/config/input.
int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

}  // namespace mae
