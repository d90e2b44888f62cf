// Asserting on library errors: the type, one line, and the words the message must contain.
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

namespace mae::test {

/// Runs `fn`, expects an exception of type E whose one-line message contains every one of `needles`.
template <typename E, typename Fn>
void expect_error(Fn&& fn, std::initializer_list<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << "message is not one line: " << what;
    for (const auto& needle : needles) {
      EXPECT_NE(what.find(needle), std::string::npos) << "'" << needle << "' not in: " << what;
    }
  }
}

}  // namespace mae::test
