// Text that is safe to put into a one-line message: file names and JSON keys can hold newlines,
// tabs, terminal escapes or bytes that are not UTF-8, which would split an error line, garble the
// terminal or make the log unreadable.
#pragma once

#include <string>

namespace mae {

/// `text` unchanged when it is printable UTF-8; otherwise every control character escaped
/// (newline -> "\n", CR -> "\r", tab -> "\t", others and DEL -> "\xNN", C1 controls as their
/// bytes "\xc2\x9b"), every byte that is not part of valid UTF-8 as "\xNN", and backslashes
/// doubled so that a literal "\n" in a name stays distinguishable from an escaped newline.
std::string printable(const std::string& text);

/// True when printable() would change `text` (control characters or invalid UTF-8).
bool has_control_chars(const std::string& text);

}  // namespace mae
