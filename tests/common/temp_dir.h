// A fresh temporary folder per test, removed with its contents afterwards; shared by the suites.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>

namespace mae::test {

/// A new empty folder under the system temp folder, named after `prefix`, the process and a
/// counter; removed with its contents on destruction.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "mae3d_test") {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path() /
           (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  /// path / name as a string.
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

}  // namespace mae::test
