// Error types of the mae library. The library throws; each program catches once in main and maps
// the type to its exit status (2: bad usage, config or input data; 1: failure while running).
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace mae {

/// Base of every error the library throws on purpose. Messages are one line and name the file or key.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  /// Exit status a program should end with for this error.
  virtual int exit_code() const { return 1; }
};

/// A bad configuration value, unknown key or bad command-line argument.
class ConfigError : public Error {
 public:
  using Error::Error;
  int exit_code() const override { return 2; }
};

/// Input data that cannot be used: missing, corrupt, wrong dimensions, non-finite voxels.
class InputError : public Error {
 public:
  /// `cause` is the check that refused the input, in a user's words, for summaries that count
  /// refusals by cause ("truncated data", "impossible geometry", ...); "" when not classified.
  explicit InputError(const std::string& what, std::string cause = "") : Error(what), cause_(std::move(cause)) {}
  int exit_code() const override { return 2; }
  /// The check that refused the input ("" when not classified).
  const std::string& cause() const { return cause_; }

 private:
  std::string cause_;
};

/// A damaged, foreign or mismatched checkpoint.
class CheckpointError : public Error {
 public:
  using Error::Error;
  int exit_code() const override { return 2; }
};

/// A failure of the file system while running (disk full, unwritable folder).
class IoError : public Error {
 public:
  using Error::Error;
};

}  // namespace mae
