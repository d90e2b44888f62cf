#include "core/json_reader.h"

#include <algorithm>

namespace mae {

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

std::string closest_key(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(3, key.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(key, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

JsonReader::JsonReader(const nlohmann::json& obj, std::string path) : path_(std::move(path)) {
  if (obj.is_null()) {
    obj_ = nlohmann::json::object();
  } else if (obj.is_object()) {
    obj_ = obj;
  } else {
    throw ConfigError("\"" + (path_.empty() ? std::string("(root)") : path_) + "\" = " + obj.dump() +
                      " must be a JSON object");
  }
}

std::string JsonReader::key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

bool JsonReader::has(const std::string& key) {
  known_.insert(key);
  return obj_.contains(key) && !obj_.at(key).is_null();
}

void JsonReader::read_choice(const std::string& key, std::string& field, const std::vector<std::string>& allowed) {
  read(key, field);
  if (std::find(allowed.begin(), allowed.end(), field) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
    throw ConfigError("\"" + key_path(key) + "\" = \"" + field + "\" is not allowed; choose one of " + list);
  }
}

JsonReader JsonReader::child(const std::string& key) {
  known_.insert(key);
  auto it = obj_.find(key);
  return JsonReader(it == obj_.end() ? nlohmann::json() : *it, key_path(key));
}

void JsonReader::finish() const {
  std::vector<std::string> known(known_.begin(), known_.end());
  for (const auto& item : obj_.items()) {
    if (known_.count(item.key())) continue;
    std::string msg = "\"" + key_path(item.key()) + "\" is not a key";
    const std::string near = closest_key(item.key(), known);
    if (!near.empty()) msg += "; did you mean \"" + key_path(near) + "\"?";
    throw ConfigError(msg);
  }
}

}  // namespace mae
