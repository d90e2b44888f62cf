#include "core/json_reader.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

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

// Thrown from the parser callback to stop at the first key given twice.
struct DuplicateKey {
  std::string path;
  size_t key_number;    // 1-based count of keys in text order, for key_position()
  size_t first_number;  // the same for the first occurrence
};

// Line and column (1-based) of the n-th (1-based) object key of `text`. Only used on text that
// parsed as JSON up to that key, where a string followed by ':' is exactly a key and raw newlines
// never occur inside strings.
std::pair<size_t, size_t> key_position(const std::string& text, size_t n) {
  size_t line = 1, line_start = 0, count = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
      continue;
    }
    if (text[i] != '"') continue;
    const size_t start = i;
    for (++i; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] == '\\') ++i;
    }
    size_t j = i + 1;
    while (j < text.size() && std::strchr(" \t\r\n", text[j]) != nullptr && text[j] != '\0') ++j;
    if (j < text.size() && text[j] == ':' && ++count == n) return {line, start - line_start + 1};
  }
  return {0, 0};
}

// Where the parser is inside nested containers. Names are built only for a message, from the
// whole stack: keeping each container's full path would cost depth² memory on deep nesting.
struct Frame {
  bool array = false;
  std::map<std::string, size_t> keys;  // key -> its number in text order
  std::string key;                     // the last key seen (objects)
  size_t index = 0;                    // elements completed so far (arrays)
};

// Dotted path of the current key ("a.b[2].c").
std::string key_path_of(const std::vector<Frame>& stack) {
  std::string out;
  for (const Frame& f : stack) {
    if (f.array) {
      out += "[" + std::to_string(f.index) + "]";
    } else {
      out += (out.empty() ? "" : ".") + f.key;
    }
  }
  return out;
}

// Thrown from the parser callback when containers nest deeper than kMaxJsonDepth.
struct TooDeep {};

// Line and column (1-based) where containers of `text` first nest deeper than `limit`.
std::pair<size_t, size_t> depth_position(const std::string& text, size_t limit) {
  size_t line = 1, line_start = 0, depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '\n') {
      ++line;
      line_start = i + 1;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return {line, i - line_start + 1};
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return {0, 0};
}

std::string strip_exception_id(const std::string& what) {
  // "[json.exception.parse_error.101] parse error at line 1, ..." -> "parse error at line 1, ..."
  if (!what.empty() && what[0] == '[') {
    const auto close = what.find("] ");
    if (close != std::string::npos) return what.substr(close + 2);
  }
  return what;
}

}  // namespace

std::string json_text(const nlohmann::json& value) {
  std::string text;
  if (value.is_number_float() && !std::isfinite(value.get<double>())) {
    const double x = value.get<double>();
    text = std::isnan(x) ? "nan" : (x > 0 ? "inf" : "-inf");
  } else {
    text = value.dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
  }
  text = printable(text);  // dump() escapes control characters inside strings; this is for safety
  constexpr size_t kMax = 80;
  if (text.size() > kMax) text = text.substr(0, kMax - 3) + "...";
  return text;
}

std::optional<nlohmann::json> try_parse_json_strict(const std::string& text, std::string& problem) {
  std::vector<Frame> stack;
  size_t keys_seen = 0;
  using Event = nlohmann::json::parse_event_t;
  auto callback = [&](int /*depth*/, Event event, nlohmann::json& parsed) {
    switch (event) {
      case Event::object_start:
      case Event::array_start: {
        if (stack.size() >= kMaxJsonDepth) throw TooDeep{};
        Frame f;
        f.array = event == Event::array_start;
        stack.push_back(std::move(f));
        break;
      }
      case Event::key: {
        ++keys_seen;
        Frame& f = stack.back();
        f.key = parsed.get<std::string>();
        const auto [it, fresh] = f.keys.emplace(f.key, keys_seen);
        if (!fresh) throw DuplicateKey{key_path_of(stack), keys_seen, it->second};
        break;
      }
      case Event::object_end:
      case Event::array_end:
        stack.pop_back();
        if (!stack.empty() && stack.back().array) ++stack.back().index;
        break;
      case Event::value:
        if (!stack.empty() && stack.back().array) ++stack.back().index;
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text, callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const DuplicateKey& d) {
    const auto [line, column] = key_position(text, d.key_number);
    const auto first = key_position(text, d.first_number);
    problem = "\"" + printable(d.path) + "\" appears twice (line " + std::to_string(line) + ", column " +
              std::to_string(column) + "; first on line " + std::to_string(first.first) +
              "); each key may appear only once";
  } catch (const TooDeep&) {
    const auto [line, column] = depth_position(text, kMaxJsonDepth);
    problem = "lists and objects nest deeper than " + std::to_string(kMaxJsonDepth) + " levels (line " +
              std::to_string(line) + ", column " + std::to_string(column) + "); no config needs that";
  } catch (const nlohmann::json::exception& e) {
    problem = "not valid JSON: " + printable(strip_exception_id(e.what()));
  }
  return std::nullopt;
}

std::optional<std::string> try_read_text_file(const std::string& path, const std::string& what,
                                              std::uintmax_t max_bytes, std::string& problem) {
  namespace fs = std::filesystem;
  if (path.empty()) {
    problem = "no " + what + " given (empty path)";
    return std::nullopt;
  }
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (st.type() == fs::file_type::not_found) {
    problem = "cannot open the " + what + ": no such file";
    return std::nullopt;
  }
  if (ec) {
    problem = "cannot open the " + what + ": " + ec.message();
    return std::nullopt;
  }
  if (fs::is_directory(st)) {
    problem = "is a folder, not a " + what;
    return std::nullopt;
  }
  if (!fs::is_regular_file(st)) {
    problem = "is not a regular file (a device, pipe or socket), so it cannot be the " + what;
    return std::nullopt;
  }
  const std::uintmax_t size = fs::file_size(path, ec);
  if (!ec && size > max_bytes) {
    problem = "is " + std::to_string(size >> 20) + " MiB; a " + what + " is at most " +
              std::to_string(max_bytes >> 20) + " MiB, so this is not one";
    return std::nullopt;
  }
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    problem = "cannot open the " + what + ": " + (errno ? std::strerror(errno) : "unreadable");
    return std::nullopt;
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) {
    problem = "cannot read the " + what + ": " + (errno ? std::strerror(errno) : "read error");
    return std::nullopt;
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    problem = "the " + what + " is empty";
    return std::nullopt;
  }
  return text;
}

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
    throw ConfigError("\"" + (path_.empty() ? std::string("(root)") : printable(path_)) + "\" = " + json_text(obj) +
                      " must be a JSON object");
  }
}

std::string JsonReader::key_path(const std::string& key) const {
  return printable(path_.empty() ? key : path_ + "." + key);
}

bool JsonReader::has(const std::string& key) {
  known_.insert(key);
  return obj_.contains(key) && !obj_.at(key).is_null();
}

const nlohmann::json* JsonReader::raw(const std::string& key) {
  known_.insert(key);
  const auto it = obj_.find(key);
  return it == obj_.end() ? nullptr : &*it;
}

long double JsonReader::whole_number(const nlohmann::json& value, const std::string& name) {
  if (value.is_number_unsigned()) return static_cast<long double>(value.get<uint64_t>());
  if (value.is_number_integer()) return static_cast<long double>(value.get<int64_t>());
  if (!value.is_number_float()) throw wrong_type(name, value, "an integer");
  const double x = value.get<double>();
  if (!std::isfinite(x)) throw ConfigError("\"" + name + "\" = " + json_text(value) + " is not a finite number");
  if (x != std::floor(x)) {
    throw ConfigError("\"" + name + "\" = " + json_text(value) + " is not a whole number; expected an integer");
  }
  return static_cast<long double>(x);
}

ConfigError JsonReader::wrong_type(const std::string& name, const nlohmann::json& value, const std::string& expected) {
  return ConfigError("\"" + name + "\" = " + json_text(value) + " has the wrong type; expected " + expected);
}

void JsonReader::read_choice(const std::string& key, std::string& field, const std::vector<std::string>& allowed) {
  read(key, field);
  if (std::find(allowed.begin(), allowed.end(), field) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
    throw ConfigError("\"" + key_path(key) + "\" = " + json_text(field) + " is not allowed; choose one of " + list);
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
