// Config reading: defaults, overrides, and a one-line error for every kind of bad value.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "train/config.h"
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
