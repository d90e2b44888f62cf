// Strict reading of JSON config sections: a key that is read is remembered, and finish() turns
// every other key into an error naming it and the closest valid key. nlohmann's own
// DEFINE_TYPE macros silently ignore misspelt keys, which is why this exists.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace mae {

/// The candidate closest to `key` by edit distance, or "" when none is reasonably close.
std::string closest_key(const std::string& key, const std::vector<std::string>& candidates);

/// One JSON object read strictly. `path` is its dotted location ("train"), "" for the root.
class JsonReader {
 public:
  /// Throws ConfigError when `obj` is neither an object nor null (null reads as {}).
  JsonReader(const nlohmann::json& obj, std::string path);

  /// Dotted name of `key` inside this object ("train.lr").
  std::string key_path(const std::string& key) const;

  /// True when the object has `key` (marks it as known).
  bool has(const std::string& key);

  /// Reads `key` into `field` when present; a wrong type is a ConfigError naming key and value.
  template <class T>
  void read(const std::string& key, T& field) {
    known_.insert(key);
    auto it = obj_.find(key);
    if (it == obj_.end()) return;
    try {
      field = it->template get<T>();
    } catch (const nlohmann::json::exception&) {
      throw ConfigError("\"" + key_path(key) + "\" = " + it->dump() + " has the wrong type; expected " +
                        type_name(field));
    }
  }

  /// Reads a number into `field` and checks lo <= value <= hi.
  template <class T>
  void read_range(const std::string& key, T& field, T lo, T hi) {
    read(key, field);
    if (field < lo || field > hi) {
      std::ostringstream os;
      os << "\"" << key_path(key) << "\" = " << field << " is out of range; allowed: " << lo << " .. " << hi;
      throw ConfigError(os.str());
    }
  }

  /// Reads a string and checks it is one of `allowed`.
  void read_choice(const std::string& key, std::string& field, const std::vector<std::string>& allowed);

  /// The sub-object at `key` (an empty one when absent); marks the key as known.
  JsonReader child(const std::string& key);

  /// Throws ConfigError for the first key that was never read, suggesting the closest known key.
  void finish() const;

 private:
  template <class T>
  static std::string type_name(const T&) {
    if constexpr (std::is_same_v<T, bool>)
      return "true or false";
    else if constexpr (std::is_integral_v<T>)
      return "an integer";
    else if constexpr (std::is_floating_point_v<T>)
      return "a number";
    else if constexpr (std::is_same_v<T, std::string>)
      return "a string";
    else
      return "a value of another type (see configs/README.md)";
  }

  nlohmann::json obj_;
  std::string path_;
  std::set<std::string> known_;
};

}  // namespace mae
