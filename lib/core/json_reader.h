// Strict JSON: parsing that refuses a key given twice, reading files that names the file for every
// way it can be unusable, and strict reading of config sections: a key that is read is remembered,
// and finish() turns every other key into an error naming it and the closest valid key. nlohmann's
// own DEFINE_TYPE macros silently ignore misspelt keys, its parser silently keeps the last of two
// equal keys, and its get<int>() truncates 1.5, reads true as 1 and wraps 2^64 - 1 to -1; this file
// is why none of that reaches a run.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/printable.h"

namespace mae {

/// The candidate closest to `key` by edit distance, or "" when none is reasonably close.
std::string closest_key(const std::string& key, const std::vector<std::string>& candidates);

/// `value` as the JSON text a user wrote, for a message: one line, at most about 80 characters
/// ("..." when cut), non-finite numbers as nan / inf.
std::string json_text(const nlohmann::json& value);

/// Largest file read_json_file accepts unless told otherwise (64 MiB; configs are a few KiB, a
/// dataset.json with thousands of entries a few MiB).
inline constexpr std::uintmax_t kMaxJsonFileBytes = std::uintmax_t{64} << 20;

/// Deepest nesting of lists and objects try_parse_json_strict accepts (configs nest 3 levels).
inline constexpr size_t kMaxJsonDepth = 256;

/// Parses `text` as JSON like nlohmann::json::parse, except that a key given twice in one object
/// is refused instead of silently keeping the last, and nesting deeper than kMaxJsonDepth is
/// refused (it only exhausts memory). Returns nullopt on failure and sets `problem`
/// to one line with the position, e.g.
///   not valid JSON: parse error at line 3, column 5: syntax error while parsing object key - ...
///   "train.lr" appears twice (line 7, column 5; first on line 3); each key may appear only once
std::optional<nlohmann::json> try_parse_json_strict(const std::string& text, std::string& problem);

/// The whole content of the file at `path`; nullopt and `problem` (one line, without the path)
/// when it is missing, a folder, not a regular file, unreadable, larger than `max_bytes` or empty
/// (only white space). `what` names the file's role in messages ("config file").
std::optional<std::string> try_read_text_file(const std::string& path, const std::string& what,
                                              std::uintmax_t max_bytes, std::string& problem);

/// try_parse_json_strict that throws E("<source>: <problem>") on failure; `source` (usually the
/// file name) is passed through printable(). E is ConfigError for configs, CheckpointError for a
/// checkpoint's files, InputError for dataset lists.
template <class E = ConfigError>
nlohmann::json parse_json_strict(const std::string& text, const std::string& source) {
  std::string problem;
  auto j = try_parse_json_strict(text, problem);
  if (!j) throw E(printable(source) + ": " + problem);
  return std::move(*j);
}

/// Reads and strictly parses the JSON file at `path`; E naming the path (printable()) for a
/// missing, unreadable, empty or oversized file, a folder, invalid JSON (with line and column) or
/// a key given twice.
template <class E = ConfigError>
nlohmann::json read_json_file(const std::string& path, const std::string& what = "config file",
                              std::uintmax_t max_bytes = kMaxJsonFileBytes) {
  const std::string shown = path.empty() ? std::string("\"\"") : printable(path);
  std::string problem;
  const auto text = try_read_text_file(path, what, max_bytes, problem);
  if (!text) throw E(shown + ": " + problem);
  auto j = try_parse_json_strict(*text, problem);
  if (!j) throw E(shown + ": " + problem);
  return std::move(*j);
}

/// One JSON object read strictly. `path` is its dotted location ("train"), "" for the root.
///
/// Values are converted strictly: an integer key takes a JSON integer, or a number with an exact
/// whole value (2.0, 1e4: what `--set train.max_steps=1e4` gives), never a fraction or a boolean,
/// and must fit the field; a number key takes any finite JSON number but not a boolean; a boolean
/// key takes only true / false; a string key only a string. Messages show the value as written.
class JsonReader {
 public:
  /// Throws ConfigError when `obj` is neither an object nor null (null reads as {}).
  JsonReader(const nlohmann::json& obj, std::string path);

  /// Dotted name of `key` inside this object ("train.lr"), control characters escaped.
  std::string key_path(const std::string& key) const;

  /// True when the object has `key` with a non-null value (marks it as known).
  bool has(const std::string& key);

  /// The value at `key`, nullptr when absent (marks it as known).
  const nlohmann::json* raw(const std::string& key);

  /// Reads `key` into `field` when present; a wrong type, a fraction for an integer, a value that
  /// does not fit the field or a non-finite number is a ConfigError naming key and value.
  template <class T>
  void read(const std::string& key, T& field) {
    const nlohmann::json* v = raw(key);
    if (v) field = convert<T>(*v, key_path(key));
  }

  /// Reads a number into `field` and checks lo <= value <= hi (checked on the value as written,
  /// before any conversion, so 2^64 - 1 is out of range rather than -1).
  template <class T>
  void read_range(const std::string& key, T& field, T lo, T hi) {
    static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>, "read_range is for numbers");
    const nlohmann::json* v = raw(key);
    if (!v) return;
    const std::string name = key_path(key);
    if constexpr (std::is_integral_v<T>) {
      const long double x = whole_number(*v, name);
      if (x < static_cast<long double>(lo) || x > static_cast<long double>(hi)) throw out_of_range(name, *v, lo, hi);
      field = static_cast<T>(x);
    } else {
      const T x = convert<T>(*v, name);
      if (!(x >= lo && x <= hi)) throw out_of_range(name, *v, lo, hi);
      field = x;
    }
  }

  /// Reads a string and checks it is one of `allowed`.
  void read_choice(const std::string& key, std::string& field, const std::vector<std::string>& allowed);

  /// The sub-object at `key` (an empty one when absent); marks the key as known.
  JsonReader child(const std::string& key);

  /// Throws ConfigError for the first key that was never read, suggesting the closest known key.
  void finish() const;

  /// `value` converted strictly to T (see the class comment); `name` is the dotted key for messages.
  template <class T>
  static T convert(const nlohmann::json& value, const std::string& name) {
    if constexpr (std::is_same_v<T, bool>) {
      if (!value.is_boolean()) throw wrong_type(name, value, "true or false");
      return value.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      const long double x = whole_number(value, name);
      if (x < static_cast<long double>(std::numeric_limits<T>::min()) ||
          x > static_cast<long double>(std::numeric_limits<T>::max())) {
        throw out_of_range(name, value, std::numeric_limits<T>::min(), std::numeric_limits<T>::max());
      }
      return static_cast<T>(x);
    } else if constexpr (std::is_floating_point_v<T>) {
      if (!value.is_number()) throw wrong_type(name, value, "a number");
      const double x = value.get<double>();
      if (!std::isfinite(x)) throw ConfigError("\"" + name + "\" = " + json_text(value) + " is not a finite number");
      if (std::fabs(x) > static_cast<double>(std::numeric_limits<T>::max())) {
        throw ConfigError("\"" + name + "\" = " + json_text(value) + " is too large");
      }
      return static_cast<T>(x);
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!value.is_string()) throw wrong_type(name, value, "a string");
      return value.get<std::string>();
    } else if constexpr (is_vector<T>::value) {
      using U = typename T::value_type;
      if (!value.is_array()) throw wrong_type(name, value, "a list of " + plural_name<U>());
      T out;
      out.reserve(value.size());
      for (size_t i = 0; i < value.size(); ++i)
        out.push_back(convert<U>(value[i], name + "[" + std::to_string(i) + "]"));
      return out;
    } else {
      try {
        return value.get<T>();
      } catch (const nlohmann::json::exception&) {
        throw wrong_type(name, value, "a value of another type (see configs/README.md)");
      }
    }
  }

 private:
  template <class T>
  struct is_vector : std::false_type {};
  template <class U, class A>
  struct is_vector<std::vector<U, A>> : std::true_type {};

  template <class U>
  static std::string plural_name() {
    if constexpr (std::is_same_v<U, bool>)
      return "true / false values";
    else if constexpr (std::is_integral_v<U>)
      return "integers";
    else if constexpr (std::is_floating_point_v<U>)
      return "numbers";
    else if constexpr (std::is_same_v<U, std::string>)
      return "strings";
    else
      return "values";
  }

  /// The exact value of a JSON integer, or of a number with a whole value; ConfigError for a
  /// fraction, a non-finite number or a value that is not a number (booleans included).
  static long double whole_number(const nlohmann::json& value, const std::string& name);

  static ConfigError wrong_type(const std::string& name, const nlohmann::json& value, const std::string& expected);

  template <class T>
  static ConfigError out_of_range(const std::string& name, const nlohmann::json& value, T lo, T hi) {
    std::ostringstream os;
    os << "\"" << name << "\" = " << json_text(value) << " is out of range; allowed: " << +lo << " .. " << +hi;
    return ConfigError(os.str());
  }

  nlohmann::json obj_;
  std::string path_;
  std::set<std::string> known_;
};

}  // namespace mae
