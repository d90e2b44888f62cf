#include "core/printable.h"

#include <cstdint>

namespace mae {

namespace {

// Length of the valid, non-control UTF-8 sequence starting at text[i]; 0 when the byte there is a
// control character, a C1 control's sequence, or not the start of valid UTF-8.
size_t printable_length(const std::string& text, size_t i) {
  const auto c = static_cast<unsigned char>(text[i]);
  if (c < 0x20 || c == 0x7f) return 0;
  if (c < 0x80) return 1;
  size_t n = 0;
  uint32_t min = 0;
  if ((c & 0xE0) == 0xC0) {
    n = 2;
    min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3;
    min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  if (i + n > text.size()) return 0;
  uint32_t cp = c & (0x7Fu >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto b = static_cast<unsigned char>(text[i + k]);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3Fu);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) || (cp >= 0x80 && cp <= 0x9F)) return 0;
  return n;
}

}  // namespace

bool has_control_chars(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    const size_t n = printable_length(text, i);
    if (n == 0) return true;
    i += n;
  }
  return false;
}

std::string printable(const std::string& text) {
  if (!has_control_chars(text)) return text;  // the common case: unchanged, backslashes and all
  static const char* kHex = "0123456789abcdef";
  std::string out;
  out.reserve(text.size() + 8);
  for (size_t i = 0; i < text.size();) {
    const size_t n = printable_length(text, i);
    const auto c = static_cast<unsigned char>(text[i]);
    if (n > 0) {
      if (c == '\\') {
        out += "\\\\";  // escapes are present, so a literal backslash must not read as one
      } else {
        out.append(text, i, n);
      }
      i += n;
      continue;
    }
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
    ++i;
  }
  return out;
}

}  // namespace mae
