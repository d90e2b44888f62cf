#include "cli.h"

#include <c10/util/Exception.h>
#ifdef MAE3D_HAVE_SPDLOG
#include <spdlog/spdlog.h>
#endif

#include <iostream>

#include "core/error.h"
#include "core/threads.h"

namespace mae {

void add_common_flags(CLI::App& app, CommonFlags& flags) {
  app.add_option("--threads", flags.threads, "intra-op threads (0 = all hardware threads)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--log-level", flags.log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
}

void apply_common_flags(const CommonFlags& flags) {
  set_threads(flags.threads);
#ifdef MAE3D_HAVE_SPDLOG
  spdlog::set_level(spdlog::level::from_str(flags.log_level));
#endif
}

int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  const std::string name = app.get_name();
  tune_allocator();
  try {
    return body();
  } catch (const Error& e) {
    std::cerr << name << ": error: " << e.what() << std::endl;
    return e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << name << ": error: " << e.what_without_backtrace() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << name << ": error: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace mae
