// Whole-file writes that a crash or a full disk cannot leave half done. write_file_atomically
// replaces a file through a temporary sibling that is flushed to disk and renamed over it, so a
// reader sees the old file or the new one, never a mix; write_file_synced writes and flushes a file
// in place, for files inside a temporary folder whose own rename is the atomic step (checkpoints).
// Every failure is an IoError naming the path and the system's reason ("No space left on device").
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace mae {

/// Receives a file's bytes in order. Never throws: the first failure is remembered, later bytes
/// are dropped, and the writer throws IoError once the producer has returned (so a producer such as
/// LibTorch's archive writer, which may not see an exception, always sees success).
using ByteSink = std::function<void(const void* data, size_t size)>;

/// Produces a file's bytes by calling the sink (any number of times).
using ByteProducer = std::function<void(const ByteSink& sink)>;

/// Writes `bytes` to `path` (created or truncated, mode 0644) and flushes it to disk (fsync). On a
/// failure the partial file is removed and IoError("<path>: cannot write: <reason>") is thrown.
void write_file_synced(const std::string& path, const std::string& bytes);

/// write_file_synced with the bytes streamed from `produce`.
void write_file_synced(const std::string& path, const ByteProducer& produce);

/// Replaces `path` atomically: writes `<path>.tmp.<pid>.<n>` in the same folder (n counts the
/// writes of this process, so threads writing the same path never share a temporary), flushes it,
/// renames it over `path` and flushes the folder. On any failure the temporary is removed, the old
/// file (if any) is left intact, and IoError("<path>: cannot write: <reason>") is thrown.
void write_file_atomically(const std::string& path, const std::string& bytes);

/// write_file_atomically with the bytes streamed from `produce`.
void write_file_atomically(const std::string& path, const ByteProducer& produce);

/// Flushes a folder's entries (files created, renamed or removed in it) to disk. IoError naming
/// the folder when it cannot be opened or flushed.
void sync_folder(const std::string& path);

}  // namespace mae
