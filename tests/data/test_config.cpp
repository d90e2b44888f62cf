// Strict reading of the `data` config section: defaults, every key, unknown keys with a
// suggestion, wrong types and out-of-range values.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/config.h"

namespace mae {
namespace {

DataConfig read(const std::string& text) {
  JsonReader r(nlohmann::json::parse(text), "data");
  return read_data_config(r);
}

std::string config_error(const std::string& text) {
  try {
    read(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

TEST(DataConfig, Defaults) {
  const DataConfig c = read(R"({"dataset": "d.json"})");
  EXPECT_EQ(c.dataset, "d.json");
  EXPECT_DOUBLE_EQ(c.val_fraction, 0.1);
  EXPECT_EQ(c.orientation, "RAS");
  EXPECT_FALSE(c.spacing_mm.has_value());
  EXPECT_EQ(c.intensity.mode, "none");
  EXPECT_DOUBLE_EQ(c.intensity.a_min, -175);
  EXPECT_DOUBLE_EQ(c.intensity.a_max, 250);
  EXPECT_DOUBLE_EQ(c.intensity.b_min, 0);
  EXPECT_DOUBLE_EQ(c.intensity.b_max, 1);
  EXPECT_TRUE(c.intensity.clip);
  EXPECT_DOUBLE_EQ(c.intensity.lower_percentile, 0.5);
  EXPECT_DOUBLE_EQ(c.intensity.upper_percentile, 99.5);
  EXPECT_FALSE(c.foreground_threshold.has_value());
  EXPECT_EQ(c.num_samples, 1);
  EXPECT_DOUBLE_EQ(c.flip_prob, 0.0);
  EXPECT_DOUBLE_EQ(c.intensity_aug.prob, 0.0);
  EXPECT_EQ(c.intensity_aug.scale, (std::array<double, 2>{0.9, 1.1}));
  EXPECT_EQ(c.intensity_aug.shift, (std::array<double, 2>{-0.1, 0.1}));
  EXPECT_EQ(c.intensity_aug.gamma, (std::array<double, 2>{0.7, 1.5}));
  EXPECT_EQ(c.workers, 2);
  EXPECT_EQ(c.prefetch, 4);
  EXPECT_EQ(c.cache_dir, "");
  EXPECT_EQ(c.on_bad_volume, "error");
  EXPECT_EQ(c.time_point, -1);
  EXPECT_FALSE(c.fourth_axis_as_channels);
  EXPECT_DOUBLE_EQ(c.dicom_slice_tolerance, 0.1);
}

TEST(DataConfig, PublishedCtSettings) {
  const DataConfig c = read(R"({"dataset": "btcv/dataset.json", "orientation": "RAS", "spacing_mm": [1.5, 1.5, 2.0],
    "intensity": {"mode": "ct_window", "a_min": -175, "a_max": 250, "b_min": 0, "b_max": 1, "clip": true},
    "foreground_threshold": 0, "num_samples": 2, "flip_prob": 0.2, "workers": 3, "prefetch": 8,
    "cache_dir": "/tmp/c", "on_bad_volume": "skip", "val_fraction": 0, "time_point": 0,
    "fourth_axis_as_channels": false})");
  ASSERT_TRUE(c.spacing_mm.has_value());
  EXPECT_EQ(*c.spacing_mm, (std::array<double, 3>{1.5, 1.5, 2.0}));
  EXPECT_EQ(c.intensity.mode, "ct_window");
  ASSERT_TRUE(c.foreground_threshold.has_value());
  EXPECT_EQ(*c.foreground_threshold, 0.0);
  EXPECT_EQ(c.num_samples, 2);
  EXPECT_DOUBLE_EQ(c.flip_prob, 0.2);
  EXPECT_EQ(c.workers, 3);
  EXPECT_EQ(c.prefetch, 8);
  EXPECT_EQ(c.cache_dir, "/tmp/c");
  EXPECT_EQ(c.on_bad_volume, "skip");
  EXPECT_EQ(c.time_point, 0);
}

TEST(DataConfig, MriSettingsAndNulls) {
  const DataConfig c = read(R"({"dataset": "list.txt", "spacing_mm": 1.0, "orientation": "",
    "intensity": {"mode": "zscore_nonzero"}, "foreground_threshold": null})");
  EXPECT_EQ(*c.spacing_mm, (std::array<double, 3>{1.0, 1.0, 1.0}));
  EXPECT_EQ(c.orientation, "");
  EXPECT_FALSE(c.foreground_threshold.has_value());
  EXPECT_FALSE(read(R"({"dataset": "x", "spacing_mm": null})").spacing_mm.has_value());
}

TEST(DataConfig, UnknownKeysSuggestTheClosest) {
  EXPECT_EQ(config_error(R"({"dataset": "x", "num_sample": 2})"),
            "\"data.num_sample\" is not a key; did you mean \"data.num_samples\"?");
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity": {"a_mn": 0}})"),
            "\"data.intensity.a_mn\" is not a key; did you mean \"data.intensity.a_min\"?");
  EXPECT_NE(config_error(R"({"dataset": "x", "img_size": [96, 96, 96]})").find("\"data.img_size\" is not a key"),
            std::string::npos);
}

TEST(DataConfig, WrongTypesAndRanges) {
  EXPECT_NE(config_error(R"({"dataset": 3})").find("\"data.dataset\" = 3 has the wrong type"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "flip_prob": "high"})").find("data.flip_prob"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "flip_prob": 1.5})").find("out of range"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "val_fraction": 1.0})").find("data.val_fraction"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "num_samples": 0})").find("data.num_samples"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "workers": -1})").find("data.workers"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "prefetch": 0})").find("data.prefetch"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity": {"mode": "zscore"}})").find("choose one of"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "on_bad_volume": "ignore"})").find("data.on_bad_volume"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": [1, 2]})").find("3 values"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": [1, 0, 2]})").find("positive"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": "1mm"})").find("data.spacing_mm"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "orientation": "RAR"})").find("data.orientation"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity": {"mode": "ct_window", "a_min": 10, "a_max": 10}})")
                .find("data.intensity.a_max"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity": {"mode": "percentile", "lower_percentile": 90,
                             "upper_percentile": 10}})")
                .find("upper_percentile"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity": {"upper_percentile": 101}})").find("out of range"),
            std::string::npos);
  EXPECT_NE(config_error(R"({})").find("\"data.dataset\" is required"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity": 3})").find("must be a JSON object"), std::string::npos);
}

TEST(DataConfig, SpacingMustBeOneAScannerHas) {
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": 1e30})")
                .find("\"data.spacing_mm\" has 1e+30 mm; every spacing must be 0.01 .. 100 mm"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": [1, 1, 0.001]})").find("0.001 mm"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": [1, 1, 101]})").find("101 mm"), std::string::npos);
  EXPECT_NE(
      config_error(R"({"dataset": "x", "spacing_mm": true})").find("\"data.spacing_mm\" = true has the wrong type"),
      std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "spacing_mm": [1, false, 1]})").find("\"data.spacing_mm[1]\" = false"),
            std::string::npos);
  EXPECT_EQ(*read(R"({"dataset": "x", "spacing_mm": [0.01, 100, 2]})").spacing_mm,
            (std::array<double, 3>{0.01, 100, 2}));
}

TEST(DataConfig, StrictNumbersAndBounds) {
  EXPECT_NE(
      config_error(R"({"dataset": "x", "num_samples": 2.5})").find("\"data.num_samples\" = 2.5 is not a whole number"),
      std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "workers": true})").find("\"data.workers\" = true has the wrong type"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "time_point": 18446744073709551615})")
                .find("\"data.time_point\" = 18446744073709551615 is out of range"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "prefetch": 4294967300})").find("is out of range"), std::string::npos);
  EXPECT_NE(
      config_error(R"({"dataset": "x", "flip_prob": false})").find("\"data.flip_prob\" = false has the wrong type"),
      std::string::npos);
  EXPECT_NE(
      config_error(R"({"dataset": "x", "intensity": {"a_max": 1e300}})").find("\"data.intensity.a_max\" = 1e+300"),
      std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "foreground_threshold": -1e20})").find("data.foreground_threshold"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "fourth_axis_as_channels": 1})").find("expected true or false"),
            std::string::npos);
  EXPECT_EQ(read(R"({"dataset": "x", "time_point": 3.0})").time_point, 3);
  EXPECT_DOUBLE_EQ(read(R"({"dataset": "x", "dicom_slice_tolerance": 0.25})").dicom_slice_tolerance, 0.25);
  EXPECT_NE(config_error(R"({"dataset": "x", "dicom_slice_tolerance": 1.0})").find("data.dicom_slice_tolerance"),
            std::string::npos);
}

TEST(DataConfig, IntensityAugReadsEveryKey) {
  const DataConfig c = read(R"({"dataset": "x", "intensity_aug": {"prob": 0.25, "scale": [0.8, 1.25],
    "shift": [-0.5, 0], "gamma": [1, 1]}})");
  EXPECT_DOUBLE_EQ(c.intensity_aug.prob, 0.25);
  EXPECT_EQ(c.intensity_aug.scale, (std::array<double, 2>{0.8, 1.25}));
  EXPECT_EQ(c.intensity_aug.shift, (std::array<double, 2>{-0.5, 0}));
  EXPECT_EQ(c.intensity_aug.gamma, (std::array<double, 2>{1, 1}));
  // Only prob given: the ranges keep their defaults; null reads as {} (off).
  const DataConfig p = read(R"({"dataset": "x", "intensity_aug": {"prob": 1}})");
  EXPECT_DOUBLE_EQ(p.intensity_aug.prob, 1.0);
  EXPECT_EQ(p.intensity_aug.gamma, (std::array<double, 2>{0.7, 1.5}));
  EXPECT_DOUBLE_EQ(read(R"({"dataset": "x", "intensity_aug": null})").intensity_aug.prob, 0.0);
  // The limits themselves are allowed.
  const DataConfig e = read(R"({"dataset": "x", "intensity_aug": {"scale": [10, 10], "shift": [-1e6, 1e6],
    "gamma": [0.001, 10]}})");
  EXPECT_EQ(e.intensity_aug.shift, (std::array<double, 2>{-1e6, 1e6}));
}

TEST(DataConfig, IntensityAugRefusesBadValuesNamingTheKey) {
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"gama": [1, 2]}})"),
            "\"data.intensity_aug.gama\" is not a key; did you mean \"data.intensity_aug.gamma\"?");
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_augment": {}})").find("did you mean \"data.intensity_aug\""),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": 0.5})").find("must be a JSON object"), std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"prob": 1.5}})")
                .find("\"data.intensity_aug.prob\" = 1.5 is out of range; allowed: 0 .. 1"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"prob": true}})")
                .find("\"data.intensity_aug.prob\" = true has the wrong type"),
            std::string::npos);
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"scale": [0, 1]}})"),
            "\"data.intensity_aug.scale\" = [0, 1] is out of range; allowed: each more than 0 .. 10");
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"scale": [1.2, 1.1]}})"),
            "\"data.intensity_aug.scale\" = [1.2, 1.1] must be [lo, hi] with lo <= hi");
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"gamma": [0.5, 11]}})"),
            "\"data.intensity_aug.gamma\" = [0.5, 11] is out of range; allowed: each more than 0 .. 10");
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"gamma": [-1, 2]}})").find("data.intensity_aug.gamma"),
            std::string::npos);
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"shift": [-2e6, 0]}})"),
            "\"data.intensity_aug.shift\" = [-2e+06, 0] is out of range; allowed: each -1e+06 .. 1e+06");
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"shift": [0.1, -0.1]}})").find("lo <= hi"),
            std::string::npos);
  EXPECT_EQ(config_error(R"({"dataset": "x", "intensity_aug": {"shift": 0.1}})"),
            "\"data.intensity_aug.shift\" = 0.1 must be [lo, hi], a list of two numbers");
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"scale": [1, 1, 1]}})").find("a list of two numbers"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"dataset": "x", "intensity_aug": {"scale": [1, "2"]}})")
                .find("\"data.intensity_aug.scale[1]\" = \"2\" has the wrong type"),
            std::string::npos);
  // validate_data_config checks a config edited in code as well.
  DataConfig c = read(R"({"dataset": "x"})");
  c.intensity_aug.gamma = {2.0, 1.0};
  EXPECT_THROW(validate_data_config(c), ConfigError);
  c.intensity_aug.gamma = {1.0, 1.0};
  c.intensity_aug.prob = -0.1;
  EXPECT_THROW(validate_data_config(c), ConfigError);
}

TEST(DataConfig, ControlCharactersInKeysDoNotSplitTheMessage) {
  const std::string e = config_error("{\"dataset\": \"x\", \"num_s\\namples\": 2}");
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  EXPECT_NE(e.find("\"data.num_s\\namples\" is not a key"), std::string::npos) << e;
}

TEST(DataConfig, OrientationCodes) {
  EXPECT_TRUE(is_orientation_code("RAS"));
  EXPECT_TRUE(is_orientation_code("LPS"));
  EXPECT_TRUE(is_orientation_code("SAR"));
  EXPECT_FALSE(is_orientation_code("RLS"));
  EXPECT_FALSE(is_orientation_code("ras"));
  EXPECT_FALSE(is_orientation_code("RASS"));
}

}  // namespace
}  // namespace mae
