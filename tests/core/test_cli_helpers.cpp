// apps/cli: readable range validators, the progress line and one-line errors from run_program.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cli.h"
#include "core/error.h"

namespace mae {
namespace {

// The message a validator gives for `input` ("" when accepted).
std::string check(const CLI::Validator& v, std::string input) { return v(input); }

TEST(CliValidators, IntRangeNamesTheRangeInPlainNumbers) {
  const auto v = int_range(1, 100000);
  EXPECT_EQ(check(v, "5"), "");
  EXPECT_EQ(check(v, "0"), "0 is out of range; allowed: 1 .. 100000");
  EXPECT_EQ(check(v, "1.5"), "1.5 is not a whole number; allowed: 1 .. 100000");
  EXPECT_EQ(check(v, "true"), "true is not an integer; allowed: 1 .. 100000");
  EXPECT_EQ(check(v, "99999999999999999999999"), "99999999999999999999999 is out of range; allowed: 1 .. 100000");
  EXPECT_EQ(check(v, ""), " is not an integer; allowed: 1 .. 100000");
  EXPECT_EQ(check(v, "4\n"), "4\\n is not an integer; allowed: 1 .. 100000");
  const auto r = real_range(0.0, 0.75);
  EXPECT_EQ(check(r, "0.5"), "");
  EXPECT_EQ(check(r, "0.999"), "0.999 is out of range; allowed: 0 .. 0.75");
  EXPECT_EQ(check(r, "nan"), "nan is not a number; allowed: 0 .. 0.75");
  EXPECT_EQ(check(r, "abc"), "abc is not a number; allowed: 0 .. 0.75");
}

int run(CLI::App& app, std::vector<std::string> args, const std::function<int()>& body) {
  std::vector<char*> argv{const_cast<char*>("prog")};
  for (auto& a : args) argv.push_back(a.data());
  return run_program(app, static_cast<int>(argv.size()), argv.data(), body);
}

TEST(CliRunProgram, ErrorsAreOneLineWithTheirExitStatus) {
  CLI::App app{"test", "prog"};
  int iters = 1;
  app.add_option("--iters", iters)->check(int_range(1, 10));
  testing::internal::CaptureStderr();
  EXPECT_EQ(run(app, {"--iters", "0"}, [] { return 0; }), 2);
  EXPECT_EQ(testing::internal::GetCapturedStderr(),
            "prog: error: --iters: 0 is out of range; allowed: 1 .. 10 (see --help)\n");
  testing::internal::CaptureStderr();
  EXPECT_EQ(run(app, {}, []() -> int { throw ConfigError("bad\nname.json: broken"); }), 2);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "prog: error: bad\\nname.json: broken\n");
  testing::internal::CaptureStderr();
  EXPECT_EQ(run(app, {}, []() -> int { throw IoError("disk full"); }), 1);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "prog: error: disk full\n");
}

TEST(CliProgress, SilentForShortWorkPlainLinesOtherwise) {
  testing::internal::CaptureStderr();
  {
    ProgressLine quiet("work", /*after_s=*/100.0, /*many=*/64);
    for (int64_t i = 1; i <= 10; ++i) quiet.update(i, 10);
  }
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  testing::internal::CaptureStderr();
  {
    ProgressLine many("work", /*after_s=*/100.0, /*many=*/64);
    for (int64_t i = 1; i <= 200; ++i) many.update(i, 200);
  }
  const std::string out = testing::internal::GetCapturedStderr();  // not a terminal: plain lines, every 10 %
  EXPECT_EQ(out.find('\r'), std::string::npos);
  EXPECT_EQ(out.rfind("work 1/200 (0%)", 0), 0u) << out;
  EXPECT_NE(out.find("work 200/200 (100%)"), std::string::npos) << out;
  const auto lines = std::count(out.begin(), out.end(), '\n');
  EXPECT_GE(lines, 10);
  EXPECT_LE(lines, 12);
}

}  // namespace
}  // namespace mae
