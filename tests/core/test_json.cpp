// lib/core: strict JSON parsing (a key given twice, positions), files that cannot be configs,
// strict value conversion, printable text and device names.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "../common/temp_dir.h"
#include "core/error.h"
#include "core/json_reader.h"
#include "core/printable.h"
#include "core/threads.h"

namespace mae {
namespace {

std::string parse_problem(const std::string& text) {
  std::string problem;
  const auto j = try_parse_json_strict(text, problem);
  EXPECT_FALSE(j.has_value()) << text;
  EXPECT_EQ(problem.find('\n'), std::string::npos) << problem;
  return problem;
}

TEST(StrictJson, RefusesAKeyGivenTwiceAtAnyDepth) {
  EXPECT_EQ(parse_problem("{\"lr\": 5.0,\n \"lr\": 0.001}"),
            "\"lr\" appears twice (line 2, column 2; first on line 1); each key may appear only once");
  EXPECT_NE(
      parse_problem("{\"a\": {\"b\": [0, [1], {\"c\": 1,\n\n \"c\": 2}]}}").find("\"a.b[2].c\" appears twice (line 3"),
      std::string::npos);
  // A key inside a string value, or escaped the same way, is not confused with another key.
  EXPECT_NE(
      parse_problem("{\"s\": \"\\\"k\\\": 1\", \"k\": 1, \"k\": 2}").find("\"k\" appears twice (line 1, column 27"),
      std::string::npos);
  EXPECT_NE(parse_problem("{\"k\": 1, \"\\u006b\": 2}").find("\"k\" appears twice"), std::string::npos);
  std::string problem;
  const auto ok =
      try_parse_json_strict("{\"a\": {\"k\": 1}, \"b\": {\"k\": 2}, \"c\": [{\"k\": 1}, {\"k\": 2}]}", problem);
  ASSERT_TRUE(ok.has_value()) << problem;
  EXPECT_EQ((*ok)["c"][1]["k"], 2);
}

TEST(StrictJson, RefusesAbsurdNestingWithoutExhaustingMemory) {
  // A million levels took 22 GB before the bound.
  const std::string deep = "{\"a\":\n " + std::string(1000000, '[') + std::string(1000000, ']') + "}";
  EXPECT_EQ(parse_problem(deep),
            "lists and objects nest deeper than 256 levels (line 2, column 257); no config needs that");
  std::string problem;
  EXPECT_TRUE(try_parse_json_strict(std::string(255, '[') + std::string(255, ']'), problem).has_value()) << problem;
}

TEST(StrictJson, SyntaxErrorsGiveLineAndColumn) {
  EXPECT_NE(parse_problem("{\n  \"a\": [1, 2,\n}").find("not valid JSON: parse error at line 3, column 1"),
            std::string::npos);
  EXPECT_NE(parse_problem("{\"a\": 1e400}").find("number overflow"), std::string::npos);
  EXPECT_EQ(parse_problem("{\"a\": 1} x").rfind("not valid JSON", 0), 0u);
}

TEST(StrictJson, FilesNameThePathAndTakeTheCallersErrorType) {
  const test::TempDir dir("mae3d_core_json");
  std::ofstream(dir / "dup.json") << "{\"a\": 1, \"a\": 2}";
  try {
    read_json_file<CheckpointError>(dir / "dup.json", "checkpoint file");
    ADD_FAILURE();
  } catch (const CheckpointError& e) {
    EXPECT_EQ(
        std::string(e.what()),
        dir / "dup.json" + ": \"a\" appears twice (line 1, column 10; first on line 1); each key may appear only once");
  }
  EXPECT_THROW(read_json_file<InputError>(dir / "missing.json", "dataset list"), InputError);
  try {
    read_json_file(dir.path.string(), "dataset list");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), dir.path.string() + ": is a folder, not a dataset list");
  }
  std::ofstream(dir / "big.json") << std::string(3 << 20, ' ') << "{}";
  try {
    read_json_file(dir / "big.json", "config file", std::uintmax_t{1} << 20);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("big.json: is 3 MiB; a config file is at most 1 MiB"), std::string::npos);
  }
  std::ofstream(dir / "ok.json") << "{\"a\": [1]}";
  EXPECT_EQ(read_json_file(dir / "ok.json")["a"][0], 1);
  try {
    read_json_file("");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "\"\": no config file given (empty path)");
  }
}

TEST(StrictJson, ValuesConvertStrictly) {
  const auto v = nlohmann::json::parse(R"({"f": 1.5, "b": true, "big": 18446744073709551615, "neg": -1, "w": 3.0,
                                           "s": "x", "l": [1, 2.0, 3]})");
  JsonReader r(v, "sec");
  int64_t i = 0;
  EXPECT_THROW(r.read("f", i), ConfigError);
  EXPECT_THROW(r.read("b", i), ConfigError);
  EXPECT_THROW(r.read("big", i), ConfigError);
  uint32_t u = 0;
  EXPECT_THROW(r.read("neg", u), ConfigError);
  r.read("w", i);
  EXPECT_EQ(i, 3);
  double d = 0;
  EXPECT_THROW(r.read("b", d), ConfigError);
  EXPECT_THROW(r.read("s", d), ConfigError);
  r.read("big", d);
  EXPECT_DOUBLE_EQ(d, 18446744073709551615.0);
  bool flag = false;
  EXPECT_THROW(r.read("neg", flag), ConfigError);
  std::vector<int64_t> list;
  r.read("l", list);
  EXPECT_EQ(list, (std::vector<int64_t>{1, 2, 3}));
  int small = 0;
  try {
    r.read_range("big", small, 0, 10);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "\"sec.big\" = 18446744073709551615 is out of range; allowed: 0 .. 10");
  }
  // Non-finite numbers cannot be written in JSON but can reach a tree built in code.
  JsonReader nan_reader(nlohmann::json{{"x", std::nan("")}}, "");
  EXPECT_THROW(nan_reader.read("x", d), ConfigError);
  EXPECT_EQ(json_text(nlohmann::json(std::string(200, 'a'))).size(), 80u);
}

TEST(Printable, EscapesControlCharactersOnly) {
  EXPECT_EQ(printable("runs/ct \xc3\xa9t\xc3\xa9\\x.json"), "runs/ct \xc3\xa9t\xc3\xa9\\x.json");
  EXPECT_EQ(printable("a\nb\tc\x1b[31m\\"), "a\\nb\\tc\\x1b[31m\\\\");
  EXPECT_EQ(printable(std::string("nul\0end", 7)), "nul\\x00end");
  EXPECT_EQ(printable("bad \xff byte \xc3"), "bad \\xff byte \\xc3");  // not UTF-8
  EXPECT_EQ(printable("csi \xc2\x9b"), "csi \\xc2\\x9b");              // a C1 control
  EXPECT_EQ(printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");             // a UTF-16 surrogate
  EXPECT_EQ(printable("\xf0\x9f\x98\x80 ok"), "\xf0\x9f\x98\x80 ok");  // U+1F600 is kept
  EXPECT_TRUE(has_control_chars("x\r"));
  EXPECT_FALSE(has_control_chars("x y"));
}

TEST(Devices, Names) {
  for (const char* ok : {"cpu", "cuda", "cuda:0", "cuda:15", "auto"}) EXPECT_TRUE(is_device_name(ok)) << ok;
  for (const char* bad : {"banana", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:99999999999", "CPU", ""}) {
    EXPECT_FALSE(is_device_name(bad)) << bad;
  }
  EXPECT_FALSE(is_device_name("auto", /*allow_auto=*/false));
}

}  // namespace
}  // namespace mae
