// Config reading: defaults, overrides, and a one-line error for every kind of bad value.
#include <gtest/gtest.h>

#include <unistd.h>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "run/checkpoint.h"
#include "run/config.h"
#include "train/schedule.h"

namespace {

nlohmann::json minimal() { return {{"data", {{"dataset", "list.txt"}}}}; }

std::string error_of(const nlohmann::json& tree) {
  try {
    mae::config_from_json(tree);
  } catch (const mae::ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreFilledAndRoundTrip) {
  const auto c = mae::config_from_json(minimal());
  EXPECT_EQ(c.seed, 0u);
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.model.hidden_size, 768);
  EXPECT_EQ(c.model.img_size, (std::vector<int64_t>{96, 96, 96}));
  EXPECT_EQ(c.train.batch_size, 2);
  EXPECT_FALSE(c.train.lr.has_value());
  EXPECT_DOUBLE_EQ(c.train.beta2, 0.95);
  const auto resolved = mae::config_to_json(c);
  EXPECT_TRUE(resolved["train"]["lr"].is_null());
  // The resolved config reads back to the same resolved config.
  EXPECT_EQ(mae::config_to_json(mae::config_from_json(resolved)), resolved);
}

TEST(Config, OverridesParseJsonValuesAndStrings) {
  auto tree = minimal();
  mae::apply_overrides(
      tree, {"train.lr=2e-4", "model.img_size=[64,64,64]", "output.dir=runs/x", "device=cpu", "model.qkv_bias=true"});
  const auto c = mae::config_from_json(tree);
  EXPECT_DOUBLE_EQ(*c.train.lr, 2e-4);
  EXPECT_EQ(c.model.img_size, (std::vector<int64_t>{64, 64, 64}));
  EXPECT_EQ(c.output.dir, "runs/x");
  EXPECT_TRUE(c.model.qkv_bias);
  EXPECT_THROW(mae::apply_overrides(tree, {"train.lr"}), mae::ConfigError);
  EXPECT_THROW(mae::apply_overrides(tree, {"device.x=1"}), mae::ConfigError);  // device is not a section
}

TEST(Config, UnknownKeysNameTheClosestValidKey) {
  auto tree = minimal();
  tree["train"] = {{"lr_warmup_step", 10}};
  EXPECT_EQ(error_of(tree), "\"train.lr_warmup_step\" is not a key; did you mean \"train.lr_warmup_steps\"?");
  tree = minimal();
  tree["modle"] = nlohmann::json::object();
  EXPECT_NE(error_of(tree).find("did you mean \"model\""), std::string::npos);
  tree = minimal();
  tree["data"]["num_sample"] = 2;
  EXPECT_NE(error_of(tree).find("\"data.num_samples\""), std::string::npos);
}

TEST(Config, WrongTypesAndRangesNameKeyAndValue) {
  auto tree = minimal();
  tree["train"] = {{"batch_size", "four"}};
  EXPECT_NE(error_of(tree).find("\"train.batch_size\" = \"four\" has the wrong type"), std::string::npos);
  tree = minimal();
  tree["train"] = {{"batch_size", 0}};
  EXPECT_NE(error_of(tree).find("\"train.batch_size\" = 0 is out of range"), std::string::npos);
  tree = minimal();
  tree["train"] = {{"precision", "fp8"}};
  EXPECT_NE(error_of(tree).find("\"train.precision\" = \"fp8\" is not allowed"), std::string::npos);
  tree = minimal();
  tree["train"] = {{"fp32_matmul", "mkl"}};
  EXPECT_NE(error_of(tree).find("\"train.fp32_matmul\" = \"mkl\" is not allowed"), std::string::npos);
  tree = minimal();
  tree["train"] = {{"max_steps", 0}, {"epochs", 0}};
  EXPECT_NE(error_of(tree).find("train.max_steps"), std::string::npos);
  tree = minimal();
  tree["device"] = "gpu";
  EXPECT_NE(error_of(tree).find("\"device\" = \"gpu\""), std::string::npos);
  tree = minimal();
  tree["seed"] = -1;
  EXPECT_NE(error_of(tree).find("\"seed\""), std::string::npos);
}

TEST(Config, ModelChecksSurfaceUnderModelKeys) {
  auto tree = minimal();
  tree["model"] = {{"hidden_size", 770}};
  EXPECT_NE(error_of(tree).find("model.hidden_size = 770"), std::string::npos);
  tree = minimal();
  tree["model"] = {{"patch_size", {16, 16, 20}}};
  EXPECT_NE(error_of(tree).find("model.patch_size"), std::string::npos);
  tree = minimal();
  tree["model"] = {{"img_size", {96, 96}}, {"patch_size", {16, 16}}};
  EXPECT_NE(error_of(tree).find("model.img_size"), std::string::npos);
  tree = minimal();
  tree["model"] = {{"dropout_rate", 2.0}};
  EXPECT_NE(error_of(tree).find("model.dropout_rate"), std::string::npos);
}

TEST(Config, FileErrorsNameTheFile) {
  const auto dir = std::filesystem::temp_directory_path() / ("mae3d_cfg_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto bad = (dir / "bad.json").string();
  std::ofstream(bad) << "{\"data\": {\"dataset\": \"x\",}";
  try {
    mae::load_config(bad);
    ADD_FAILURE();
  } catch (const mae::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(bad + ": not valid JSON"), std::string::npos) << e.what();
  }
  try {
    mae::load_config((dir / "missing.json").string());
    ADD_FAILURE();
  } catch (const mae::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("missing.json: cannot open"), std::string::npos);
  }
  const auto good = (dir / "good.json").string();
  std::ofstream(good) << minimal().dump();
  EXPECT_EQ(mae::load_config(good, {"train.batch_size=8"}).train.batch_size, 8);
  try {
    mae::load_config(good, {"train.batch_sise=8"});
    ADD_FAILURE();
  } catch (const mae::ConfigError& e) {
    EXPECT_NE(
        std::string(e.what()).find("good.json: \"train.batch_sise\" is not a key; did you mean \"train.batch_size\"?"),
        std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

// The ConfigError message of load_config(path, overrides), or "" when it loads.
std::string load_error(const std::string& path, const std::vector<std::string>& overrides = {}) {
  try {
    mae::load_config(path, overrides);
  } catch (const mae::ConfigError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << "not one line: " << what;
    return what;
  }
  return "";
}

struct ConfigDir {
  std::filesystem::path dir;
  ConfigDir() {
    static int counter = 0;
    dir = std::filesystem::temp_directory_path() /
          ("mae3d_cfg2_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(dir);
  }
  ~ConfigDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const auto path = (dir / name).string();
    std::ofstream(path) << text;
    return path;
  }
};

#define EXPECT_HAS(haystack, needle) EXPECT_NE((haystack).find(needle), std::string::npos) << (haystack)

TEST(Config, DuplicateKeysAreRefusedWithTheDottedKeyAndLine) {
  const ConfigDir d;
  auto path = d.write("lr.json", "{\"data\": {\"dataset\": \"x\"},\n \"train\": {\"lr\": 5.0,\n   \"lr\": 0.001}}");
  auto e = load_error(path);
  EXPECT_HAS(e, "lr.json: \"train.lr\" appears twice (line 3");
  EXPECT_HAS(e, "first on line 2");
  path = d.write("data.json", "{\"data\": {\"dataset\": \"a\"},\n\"model\": {},\n\"data\": {\"dataset\": \"b\"}}");
  e = load_error(path);
  EXPECT_HAS(e, "\"data\" appears twice (line 3, column 1; first on line 1)");
  // Inside a list of objects the key names its element.
  path = d.write("list.json", "{\"data\": {\"dataset\": \"a\"}, \"x\": [1, {\"y\": 1, \"y\": 2}]}");
  EXPECT_HAS(load_error(path), "\"x[1].y\" appears twice");
  // Equal keys in different objects are fine.
  path = d.write("fine.json", "{\"data\": {\"dataset\": \"a\"}, \"train\": {\"epochs\": 2}, \"model\": {}}");
  EXPECT_EQ(load_error(path), "");
}

TEST(Config, IntegerKeysTakeOnlyWholeNumbersThatFit) {
  auto tree = minimal();
  tree["train"] = {{"batch_size", 1.5}};
  EXPECT_HAS(error_of(tree), "\"train.batch_size\" = 1.5 is not a whole number");
  tree = minimal();
  tree["threads"] = true;
  EXPECT_HAS(error_of(tree), "\"threads\" = true has the wrong type; expected an integer");
  tree = minimal();
  tree["threads"] = 4294967296;  // would wrap to 0 = all cores
  EXPECT_HAS(error_of(tree), "\"threads\" = 4294967296 is out of range");
  tree = minimal();
  tree["data"]["time_point"] = 18446744073709551615ull;  // would wrap to -1
  EXPECT_HAS(error_of(tree), "\"data.time_point\" = 18446744073709551615 is out of range");
  tree = minimal();
  tree["seed"] = 1e30;  // the value as written, not the converted one
  EXPECT_HAS(error_of(tree), "\"seed\" = 1e+30 is out of range");
  tree = minimal();
  tree["model"] = {{"img_size", {16.5, 16, 16}}};
  EXPECT_HAS(error_of(tree), "\"model.img_size[0]\" = 16.5 is not a whole number");
  tree = minimal();
  tree["model"] = {{"qkv_bias", 1}};
  EXPECT_HAS(error_of(tree), "\"model.qkv_bias\" = 1 has the wrong type; expected true or false");
  tree = minimal();
  tree["train"] = {{"lr", true}};
  EXPECT_HAS(error_of(tree), "\"train.lr\" = true has the wrong type; expected a number");
  // Whole numbers written as floats are what they say (2.0, and 1e4 as --set gives it).
  tree = minimal();
  tree["train"] = {{"batch_size", 2.0}, {"max_steps", 1e4}};
  const auto c = mae::config_from_json(tree);
  EXPECT_EQ(c.train.batch_size, 2);
  EXPECT_EQ(c.train.max_steps, 10000);
}

TEST(Config, SetValuesThatLookLikeJsonMustBeJson) {
  auto tree = minimal();
  try {
    mae::apply_overrides(tree, {"model.img_size=[16,16"});
    ADD_FAILURE();
  } catch (const mae::ConfigError& e) {
    const std::string what = e.what();
    EXPECT_HAS(what, "--set \"model.img_size=[16,16\": the value is not valid JSON");
    EXPECT_HAS(what, "column 7");
  }
  EXPECT_THROW(mae::apply_overrides(tree, {"data.dataset={\"a\": 1"}), mae::ConfigError);
  EXPECT_THROW(mae::apply_overrides(tree, {"output.dir=\"runs"}), mae::ConfigError);
  try {
    mae::apply_overrides(tree, {"seed=1e400"});
    ADD_FAILURE();
  } catch (const mae::ConfigError& e) {
    EXPECT_HAS(std::string(e.what()), "1e400 is too large");
  }
  // Bare words and quoted JSON strings are strings; a typo in a number is a string the type check refuses.
  mae::apply_overrides(tree, {"device=cpu", "output.dir=\"[x]\"", "data.cache_dir=2024_cache"});
  EXPECT_EQ(tree["device"], "cpu");
  EXPECT_EQ(tree["output"]["dir"], "[x]");
  EXPECT_EQ(tree["data"]["cache_dir"], "2024_cache");
  mae::apply_overrides(tree, {"train.lr=2e-4x"});
  EXPECT_HAS(error_of(tree), "\"train.lr\" = \"2e-4x\" has the wrong type; expected a number");
}

TEST(Config, UnusableConfigFilesNameThePath) {
  const ConfigDir d;
  EXPECT_HAS(load_error(d.dir.string()), d.dir.string() + ": is a folder, not a config file");
  EXPECT_HAS(load_error(d.write("empty.json", "  \n")), "empty.json: the config file is empty");
  EXPECT_HAS(load_error("/dev/null"), "/dev/null: is not a regular file");
  EXPECT_HAS(load_error(d.write("array.json", "[1, 2]")), "array.json: the config must be a JSON object");
  const auto bad = d.write("bad.json", "{\"data\": {\"dataset\": \"x\"},\n  \"train\": {\"lr\": }}");
  EXPECT_HAS(load_error(bad), "bad.json: not valid JSON: parse error at line 2, column 19");
  // A newline in the file name does not split the message.
  EXPECT_HAS(load_error((d.dir / "a\nb.json").string()), "a\\nb.json: cannot open the config file: no such file");
  if (::geteuid() != 0) {
    const auto locked = d.write("locked.json", minimal().dump());
    std::filesystem::permissions(locked, std::filesystem::perms::none);
    EXPECT_HAS(load_error(locked), "locked.json: cannot open the config file");
  }
}

TEST(Config, AbsurdValuesAreRefused) {
  auto tree = minimal();
  tree["model"] = {{"img_size", {2048, 96, 96}}};
  EXPECT_HAS(error_of(tree), "\"model.img_size\" has 2048; every entry must be 1 .. 1024");
  tree = minimal();
  tree["model"] = {{"img_size", {1024, 1024, 64}}, {"patch_size", {4, 4, 4}}};
  EXPECT_HAS(error_of(tree), "1048576 patches per crop; at most 65536");
  tree = minimal();
  tree["model"] = {{"patch_size", {16, 16, -16}}};
  EXPECT_HAS(error_of(tree), "\"model.patch_size\" has -16");
  tree = minimal();
  tree["model"] = {{"masking_ratio", 1.5}};
  EXPECT_HAS(error_of(tree), "\"model.masking_ratio\" = 1.5 is out of range");
  tree = minimal();
  tree["train"] = {{"lr", 5.0}};
  EXPECT_HAS(error_of(tree), "\"train.lr\" = 5.0 is out of range; allowed: 1e-12 .. 1");
  tree = minimal();
  tree["train"] = {{"lr", 0}};
  EXPECT_HAS(error_of(tree), "\"train.lr\" = 0 is out of range");
  tree = minimal();
  tree["train"] = {{"base_lr", 0.5}, {"batch_size", 1024}};  // 0.5 x 1024 / 256 = 2
  EXPECT_HAS(error_of(tree), "gives a learning rate of 2");
  tree = minimal();
  tree["train"] = {{"lr_min", 1e-3}};  // above 1.5e-4 x 2 / 256
  EXPECT_HAS(error_of(tree), "\"train.lr_min\" = 0.001 is larger than the learning rate");
}

TEST(Config, DistributedDefaultsAreResolved) {
  const auto c = mae::config_from_json(minimal());
  EXPECT_EQ(c.distributed.backend, "auto");
  EXPECT_EQ(c.distributed.timeout_s, 300);
  EXPECT_DOUBLE_EQ(c.distributed.bucket_mb, 25.0);
  EXPECT_TRUE(c.distributed.overlap);
  const auto resolved = mae::config_to_json(c);
  EXPECT_EQ(resolved["distributed"],
            (nlohmann::json{{"backend", "auto"}, {"timeout_s", 300}, {"bucket_mb", 25.0}, {"overlap", true}}));
  auto tree = minimal();
  tree["device"] = "cuda";
  tree["distributed"] = {{"backend", "nccl"}, {"timeout_s", 60}, {"bucket_mb", 0.5}, {"overlap", false}};
  const auto d = mae::config_from_json(tree).distributed;
  EXPECT_EQ(d.backend, "nccl");
  EXPECT_EQ(d.timeout_s, 60);
  EXPECT_DOUBLE_EQ(d.bucket_mb, 0.5);
  EXPECT_FALSE(d.overlap);
  // A config without the section (every checkpoint written before it existed) reads with the defaults.
  auto old = resolved;
  old.erase("distributed");
  EXPECT_EQ(mae::config_to_json(mae::config_from_json(old)), resolved);
}

TEST(Config, DistributedValuesAreChecked) {
  auto tree = minimal();
  tree["distributed"] = {{"backend", "mpi"}};
  EXPECT_HAS(error_of(tree), "\"distributed.backend\" = \"mpi\" is not allowed");
  tree = minimal();
  tree["distributed"] = {{"timeout_s", 0}};
  EXPECT_HAS(error_of(tree), "\"distributed.timeout_s\" = 0 is out of range; allowed: 1 .. 86400");
  tree = minimal();
  tree["distributed"] = {{"timeout_s", 1.5}};
  EXPECT_HAS(error_of(tree), "\"distributed.timeout_s\"");
  tree = minimal();
  tree["distributed"] = {{"bucket_mb", 0}};
  EXPECT_HAS(error_of(tree), "\"distributed.bucket_mb\" = 0 is out of range");
  tree = minimal();
  tree["distributed"] = {{"bucket_mb", 2048}};
  EXPECT_HAS(error_of(tree), "\"distributed.bucket_mb\" = 2048 is out of range");
  tree = minimal();
  tree["distributed"] = {{"bucket_mb", "big"}};
  EXPECT_HAS(error_of(tree), "\"distributed.bucket_mb\" = \"big\" has the wrong type");
  tree = minimal();
  tree["distributed"] = {{"overlap", 1}};
  EXPECT_HAS(error_of(tree), "\"distributed.overlap\"");
  tree = minimal();
  tree["device"] = "cpu";
  tree["distributed"] = {{"backend", "nccl"}};
  EXPECT_HAS(error_of(tree), "\"distributed.backend\" = \"nccl\" needs a CUDA device");
  tree["device"] = "auto";  // decided when the run starts
  EXPECT_EQ(error_of(tree), "");
  tree = minimal();
  tree["distributed"] = {{"bucket_mib", 25}};
  EXPECT_EQ(error_of(tree), "\"distributed.bucket_mib\" is not a key; did you mean \"distributed.bucket_mb\"?");
  tree = minimal();
  tree["distributd"] = nlohmann::json::object();
  EXPECT_HAS(error_of(tree), "did you mean \"distributed\"");
}

TEST(TrainerStateJson, WorldSizeAndBatchSizeRoundTripAndAreOptional) {
  mae::TrainerState s;
  s.step = 7;
  s.world_size = 4;
  s.batch_size = 3;
  const auto j = mae::trainer_state_to_json(s, "0123456789abcdef");
  EXPECT_EQ(j["world_size"], 4);
  EXPECT_EQ(j["batch_size"], 3);
  const auto back = mae::trainer_state_from_json(j, "trainer_state.json");
  EXPECT_EQ(back.step, 7);
  EXPECT_EQ(back.world_size, 4);
  EXPECT_EQ(back.batch_size, 3);
  // Checkpoints written before these keys existed: one rank, batch size not recorded.
  auto old = j;
  old.erase("world_size");
  old.erase("batch_size");
  const auto legacy = mae::trainer_state_from_json(old, "trainer_state.json");
  EXPECT_EQ(legacy.world_size, 1);
  EXPECT_EQ(legacy.batch_size, 0);
  auto error_of_state = [&](const char* key, const nlohmann::json& value) -> std::string {
    auto bad = j;
    bad[key] = value;
    try {
      mae::trainer_state_from_json(bad, "trainer_state.json");
    } catch (const mae::CheckpointError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_HAS(error_of_state("world_size", 0), "trainer_state.json: \"world_size\" = 0 is out of range");
  // The last change of world size: round trip, absent = 0, never beyond the step or skipped count.
  s.base_step = 5;
  s.nonfinite_skipped = 2;
  s.base_skipped = 1;
  s.base_read = 11;
  const auto moved = mae::trainer_state_from_json(mae::trainer_state_to_json(s, "0123456789abcdef"), "t.json");
  EXPECT_EQ(moved.base_step, 5);
  EXPECT_EQ(moved.base_skipped, 1);
  EXPECT_EQ(moved.base_read, 11);
  EXPECT_EQ(legacy.base_step, 0);
  EXPECT_EQ(legacy.base_read, 0);
  EXPECT_HAS(error_of_state("base_step", 8), "\"base_step\" = 8 is out of range");
  EXPECT_HAS(error_of_state("base_skipped", 1), "\"base_skipped\" = 1 is out of range");
  EXPECT_HAS(error_of_state("world_size", 1000001), "\"world_size\" = 1000001 is out of range");
  EXPECT_HAS(error_of_state("world_size", 2.5), "\"world_size\" is the fraction 2.5");
  EXPECT_HAS(error_of_state("batch_size", -1), "\"batch_size\" = -1 is out of range");
  EXPECT_HAS(error_of_state("batch_size", "2"), "\"batch_size\" is the string");
  EXPECT_EQ(error_of_state("world_size", 1000000), "");
  EXPECT_EQ(error_of_state("batch_size", 0), "");
}

TEST(Schedule, WarmupPeakAndEnd) {
  // 10 warmup steps to 1e-3, cosine to 1e-5 at step 110.
  EXPECT_DOUBLE_EQ(mae::lr_at(0, 110, 10, 1e-3, 1e-5), 1e-4);
  EXPECT_DOUBLE_EQ(mae::lr_at(4, 110, 10, 1e-3, 1e-5), 5e-4);
  EXPECT_DOUBLE_EQ(mae::lr_at(9, 110, 10, 1e-3, 1e-5), 1e-3);                    // end of warmup: peak
  EXPECT_DOUBLE_EQ(mae::lr_at(10, 110, 10, 1e-3, 1e-5), 1e-3);                   // cosine starts at peak
  EXPECT_NEAR(mae::lr_at(60, 110, 10, 1e-3, 1e-5), 0.5 * (1e-3 + 1e-5), 1e-15);  // half way
  EXPECT_NEAR(mae::lr_at(110, 110, 10, 1e-3, 1e-5), 1e-5, 1e-15);
  EXPECT_NEAR(mae::lr_at(500, 110, 10, 1e-3, 1e-5), 1e-5, 1e-15);  // clamped past the end
  EXPECT_DOUBLE_EQ(mae::lr_at(0, 100, 0, 1e-3, 0.0), 1e-3);        // no warmup
  EXPECT_DOUBLE_EQ(mae::scaled_lr(1.5e-4, 512), 3e-4);
}

}  // namespace
