// Strict reading and validation of the `data` config section.
#include "data/config.h"

#include <array>
#include <cmath>
#include <sstream>
#include <vector>

namespace mae {

namespace {

std::string num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string range_text(const std::array<double, 2>& r) { return "[" + num(r[0]) + ", " + num(r[1]) + "]"; }

// An intensity_aug range: lo <= hi, each in (0, max] when `positive`, else in [-max, max].
void check_aug_range(const std::string& key, const std::array<double, 2>& r, bool positive, double max) {
  const std::string name = "\"data.intensity_aug." + key + "\"";
  for (double v : r) {
    const bool ok = std::isfinite(v) && (positive ? v > 0.0 && v <= max : std::fabs(v) <= max);
    if (!ok) {
      throw ConfigError(name + " = " + range_text(r) + " is out of range; allowed: each " +
                        (positive ? "more than 0 .. " + num(max) : num(-max) + " .. " + num(max)));
    }
  }
  if (!(r[0] <= r[1])) throw ConfigError(name + " = " + range_text(r) + " must be [lo, hi] with lo <= hi");
}

// Reads an intensity_aug range [lo, hi] (a list of two numbers) when present.
void read_aug_range(JsonReader& r, const std::string& key, std::array<double, 2>& field) {
  const nlohmann::json* v = r.raw(key);
  if (!v) return;
  const auto name = r.key_path(key);
  if (!v->is_array() || v->size() != 2) {
    throw ConfigError("\"" + name + "\" = " + json_text(*v) + " must be [lo, hi], a list of two numbers");
  }
  const auto pair = JsonReader::convert<std::vector<double>>(*v, name);
  field = {pair[0], pair[1]};
}

}  // namespace

bool is_orientation_code(const std::string& code) {
  if (code.size() != 3) return false;
  const std::string pairs[3] = {"RL", "AP", "SI"};
  int seen[3] = {0, 0, 0};
  for (char c : code) {
    bool found = false;
    for (int p = 0; p < 3; ++p) {
      if (c == pairs[p][0] || c == pairs[p][1]) {
        ++seen[p];
        found = true;
      }
    }
    if (!found) return false;
  }
  return seen[0] == 1 && seen[1] == 1 && seen[2] == 1;
}

void validate_data_config(const DataConfig& c) {
  if (c.dataset.empty()) throw ConfigError("\"data.dataset\" is required (a dataset.json, list file or folder)");
  if (!c.orientation.empty() && !is_orientation_code(c.orientation)) {
    throw ConfigError("\"data.orientation\" = " + json_text(c.orientation) +
                      " is not an orientation code; use three letters, one of R/L, A/P, S/I (\"RAS\"), or \"\"");
  }
  if (c.spacing_mm) {
    for (double s : *c.spacing_mm) {
      if (!(s > 0.0) || !std::isfinite(s)) {
        throw ConfigError("\"data.spacing_mm\" has " + num(s) + "; every spacing must be a positive number of mm");
      }
      if (s < kMinTargetSpacingMm || s > kMaxTargetSpacingMm) {
        throw ConfigError("\"data.spacing_mm\" has " + num(s) + " mm; every spacing must be " +
                          num(kMinTargetSpacingMm) + " .. " + num(kMaxTargetSpacingMm) +
                          " mm (micro-CT voxels to the thickest clinical slices)");
      }
    }
  }
  const auto& in = c.intensity;
  if (in.mode == "ct_window" && !(in.a_max > in.a_min)) {
    throw ConfigError("\"data.intensity.a_max\" = " + num(in.a_max) + " must be greater than a_min = " + num(in.a_min));
  }
  if ((in.mode == "ct_window" || in.mode == "percentile") && !(in.b_max > in.b_min)) {
    throw ConfigError("\"data.intensity.b_max\" = " + num(in.b_max) + " must be greater than b_min = " + num(in.b_min));
  }
  if (in.mode == "percentile" && !(in.upper_percentile > in.lower_percentile)) {
    throw ConfigError("\"data.intensity.upper_percentile\" = " + num(in.upper_percentile) +
                      " must be greater than lower_percentile = " + num(in.lower_percentile));
  }
  if (c.foreground_threshold && !std::isfinite(*c.foreground_threshold)) {
    throw ConfigError("\"data.foreground_threshold\" must be a finite number or null");
  }
  const auto& aug = c.intensity_aug;
  if (!(aug.prob >= 0.0 && aug.prob <= 1.0)) {
    throw ConfigError("\"data.intensity_aug.prob\" = " + num(aug.prob) + " is out of range; allowed: 0 .. 1");
  }
  check_aug_range("scale", aug.scale, true, kMaxAugScale);
  check_aug_range("shift", aug.shift, false, kMaxAugShift);
  check_aug_range("gamma", aug.gamma, true, kMaxAugScale);
  const double values[] = {in.a_min, in.a_max, in.b_min, in.b_max};
  for (double v : values) {
    if (!std::isfinite(v) || std::fabs(v) > kMaxIntensity) {
      throw ConfigError("\"data.intensity\" has " + num(v) +
                        "; a_min, a_max, b_min and b_max must be finite and at most " + num(kMaxIntensity) +
                        " in size");
    }
  }
}

DataConfig read_data_config(JsonReader& r) {
  DataConfig c;
  if (!r.has("dataset"))
    throw ConfigError("\"" + r.key_path("dataset") + "\" is required (a dataset.json, list file or folder)");
  r.read("dataset", c.dataset);
  if (c.dataset.empty()) throw ConfigError("\"" + r.key_path("dataset") + "\" is empty");
  r.read_range("val_fraction", c.val_fraction, 0.0, 0.9);
  r.read("orientation", c.orientation);
  if (const nlohmann::json* v = r.raw("spacing_mm"); v && !v->is_null()) {
    const auto key = r.key_path("spacing_mm");
    std::vector<double> s;
    if (v->is_number()) {
      const double iso = JsonReader::convert<double>(*v, key);
      s = {iso, iso, iso};
    } else if (v->is_array()) {
      s = JsonReader::convert<std::vector<double>>(*v, key);
    } else {
      throw ConfigError("\"" + key + "\" = " + json_text(*v) +
                        " has the wrong type; expected [x, y, z] in mm, one number, or null");
    }
    if (s.size() != 3)
      throw ConfigError("\"" + key + "\" must have 3 values [x, y, z] in mm, got " + std::to_string(s.size()));
    c.spacing_mm = std::array<double, 3>{s[0], s[1], s[2]};
  }
  {
    JsonReader in = r.child("intensity");
    auto& i = c.intensity;
    in.read_choice("mode", i.mode, {"ct_window", "zscore_nonzero", "percentile", "none"});
    in.read_range("a_min", i.a_min, -kMaxIntensity, kMaxIntensity);
    in.read_range("a_max", i.a_max, -kMaxIntensity, kMaxIntensity);
    in.read_range("b_min", i.b_min, -kMaxIntensity, kMaxIntensity);
    in.read_range("b_max", i.b_max, -kMaxIntensity, kMaxIntensity);
    in.read("clip", i.clip);
    in.read_range("lower_percentile", i.lower_percentile, 0.0, 100.0);
    in.read_range("upper_percentile", i.upper_percentile, 0.0, 100.0);
    in.finish();
  }
  if (r.has("foreground_threshold")) {
    double t = 0.0;
    r.read_range("foreground_threshold", t, -kMaxIntensity, kMaxIntensity);
    c.foreground_threshold = t;
  }
  r.read_range<int64_t>("num_samples", c.num_samples, 1, 4096);
  r.read_range("flip_prob", c.flip_prob, 0.0, 1.0);
  {
    JsonReader aug = r.child("intensity_aug");
    aug.read_range("prob", c.intensity_aug.prob, 0.0, 1.0);
    read_aug_range(aug, "scale", c.intensity_aug.scale);
    read_aug_range(aug, "shift", c.intensity_aug.shift);
    read_aug_range(aug, "gamma", c.intensity_aug.gamma);
    aug.finish();
  }
  r.read_range("workers", c.workers, 0, 256);
  r.read_range("prefetch", c.prefetch, 1, 1024);
  r.read("cache_dir", c.cache_dir);
  r.read_choice("on_bad_volume", c.on_bad_volume, {"error", "skip"});
  r.read_range<int64_t>("time_point", c.time_point, -1, 1 << 20);
  r.read("fourth_axis_as_channels", c.fourth_axis_as_channels);
  r.read_range("dicom_slice_tolerance", c.dicom_slice_tolerance, 0.0, 0.99);
  r.finish();
  validate_data_config(c);
  return c;
}

}  // namespace mae
