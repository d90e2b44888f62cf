#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

std::atomic<uint64_t> g_temporaries{0};

[[noreturn]] void fail(const std::string& path, int error) {
  throw IoError(path + ": cannot write: " + std::strerror(error));
}

// Closes a descriptor on every way out of a scope.
struct Descriptor {
  int fd = -1;
  ~Descriptor() {
    if (fd >= 0) ::close(fd);
  }
  // Closes now; 0 or the errno of close (where NFS reports a failed write).
  int close() {
    const int rc = ::close(fd);
    fd = -1;
    return rc == 0 ? 0 : errno;
  }
};

// Writes the produced bytes to `file` (created or truncated) and flushes it to disk. Returns 0 or
// the errno of the first failure; `opened` tells whether the file was opened (and so is left behind
// for the caller to remove). An exception from `produce` passes through with the descriptor closed.
int write_and_sync(const std::string& file, const ByteProducer& produce, bool& opened) {
  Descriptor d;
  d.fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  opened = d.fd >= 0;
  if (!opened) return errno;
  int error = 0;
  const ByteSink sink = [&](const void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    while (error == 0 && size > 0) {
      const ssize_t n = ::write(d.fd, p, size);
      if (n < 0) {
        if (errno == EINTR) continue;
        error = errno;
      } else if (n == 0) {
        error = ENOSPC;
      } else {
        p += n;
        size -= static_cast<size_t>(n);
      }
    }
  };
  produce(sink);
  if (error == 0 && ::fsync(d.fd) != 0) error = errno;
  const int closed = d.close();
  return error != 0 ? error : closed;
}

ByteProducer bytes_of(const std::string& bytes) {
  return [&bytes](const ByteSink& sink) { sink(bytes.data(), bytes.size()); };
}

}  // namespace

void write_file_synced(const std::string& path, const ByteProducer& produce) {
  int error = 0;
  bool opened = false;
  try {
    error = write_and_sync(path, produce, opened);
  } catch (...) {
    ::unlink(path.c_str());
    throw;
  }
  if (error != 0) {
    if (opened) ::unlink(path.c_str());
    fail(path, error);
  }
}

void write_file_synced(const std::string& path, const std::string& bytes) { write_file_synced(path, bytes_of(bytes)); }

void write_file_atomically(const std::string& path, const ByteProducer& produce) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(g_temporaries++);
  int error = 0;
  bool opened = false;
  try {
    error = write_and_sync(tmp, produce, opened);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  if (error == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    ::unlink(tmp.c_str());
    fail(path, error);
  }
  const fs::path folder = fs::path(path).parent_path();
  sync_folder(folder.empty() ? std::string(".") : folder.string());
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  write_file_atomically(path, bytes_of(bytes));
}

void sync_folder(const std::string& path) {
  Descriptor d;
  d.fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (d.fd < 0) throw IoError(path + ": cannot open the folder to flush it to disk: " + std::strerror(errno));
  if (::fsync(d.fd) != 0) throw IoError(path + ": cannot flush the folder to disk: " + std::strerror(errno));
}

}  // namespace mae
