// lib/core/atomic_file: whole-file writes through a flushed temporary and a rename, and their
// failures (an impossible folder, a read-only folder, a full disk, a failing producer), which must
// leave the old file as it was, no temporary behind, and name the path and the reason.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../common/temp_dir.h"
#include "core/atomic_file.h"
#include "core/error.h"

namespace mae {
namespace {

namespace fs = std::filesystem;

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The names in a folder, sorted.
std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// The message of the IoError `f` throws, or "" when it throws none.
template <class F>
std::string io_error_of(F&& f) {
  try {
    f();
  } catch (const IoError& e) {
    return e.what();
  }
  return "";
}

TEST(AtomicFile, WritesANewFileAndLeavesNoTemporary) {
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "out.json";
  write_file_atomically(path, "{\"a\": 1}\n");
  EXPECT_EQ(read_all(path), "{\"a\": 1}\n");
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"out.json"});
  // Bytes are bytes: embedded NULs and an empty file.
  const std::string binary("a\0b\0c", 5);
  write_file_atomically(dir / "bin", binary);
  EXPECT_EQ(read_all(dir / "bin"), binary);
  write_file_atomically(dir / "empty", "");
  EXPECT_TRUE(fs::exists(dir / "empty"));
  EXPECT_EQ(fs::file_size(dir / "empty"), 0u);
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::owner_write, fs::perms::owner_write);
}

TEST(AtomicFile, ReplacesAnExistingFileAndStreamsChunks) {
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "data.bin";
  write_file_atomically(path, std::string(1000, 'x'));
  write_file_atomically(path, [](const ByteSink& sink) {
    sink("head", 4);
    sink("", 0);
    const std::string big(1 << 20, 'y');
    sink(big.data(), big.size());
  });
  const std::string got = read_all(path);
  ASSERT_EQ(got.size(), 4u + (1u << 20));
  EXPECT_EQ(got.substr(0, 5), "heady");
  EXPECT_EQ(got.back(), 'y');
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"data.bin"});
  // A relative path (its folder is ".") works too.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path);
  write_file_atomically("relative.txt", "r");
  fs::current_path(cwd);
  EXPECT_EQ(read_all(dir / "relative.txt"), "r");
}

TEST(AtomicFile, SyncedWriteWritesInPlace) {
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "meta.json";
  write_file_synced(path, "old");
  write_file_synced(path, [](const ByteSink& sink) {
    sink("n", 1);
    sink("ew", 2);
  });
  EXPECT_EQ(read_all(path), "new");
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"meta.json"});
  sync_folder(dir.path.string());
}

TEST(AtomicFile, AFolderThatCannotExistNamesThePathAndTheReason) {
  // As root permissions are not enforced, so the parent is a regular file: nothing can be created in it.
  test::TempDir dir("mae3d_atomic");
  write_file_atomically(dir / "plain", "i am a file");
  const std::string path = dir / "plain/out.json";
  const std::string e = io_error_of([&] { write_file_atomically(path, "x"); });
  EXPECT_NE(e.find(path + ": cannot write: "), std::string::npos) << e;
  EXPECT_NE(e.find("Not a directory"), std::string::npos) << e;
  const std::string s = io_error_of([&] { write_file_synced(path, "x"); });
  EXPECT_NE(s.find(path + ": cannot write: Not a directory"), std::string::npos) << s;
  EXPECT_EQ(read_all(dir / "plain"), "i am a file");
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"plain"});
  // /proc takes no new files either.
  const std::string proc = io_error_of([] { write_file_atomically("/proc/mae3d-atomic-test", "x"); });
  EXPECT_NE(proc.find("/proc/mae3d-atomic-test: cannot write: "), std::string::npos) << proc;
  const std::string folder = io_error_of([&] { sync_folder(dir / "missing"); });
  EXPECT_NE(folder.find(dir / "missing"), std::string::npos) << folder;
}

TEST(AtomicFile, AReadOnlyFolderLeavesTheOldFile) {
  test::TempDir dir("mae3d_atomic");
  const fs::path ro = dir.path / "ro";
  fs::create_directories(ro);
  const std::string path = (ro / "state.json").string();
  write_file_atomically(path, "old");
  fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
  if (::access(ro.c_str(), W_OK) == 0) {
    fs::permissions(ro, fs::perms::owner_all);
    GTEST_SKIP() << "folder permissions are not enforced for this user (root); the other failure cases cover it";
  }
  const std::string e = io_error_of([&] { write_file_atomically(path, "new"); });
  fs::permissions(ro, fs::perms::owner_all);
  EXPECT_NE(e.find(path + ": cannot write: Permission denied"), std::string::npos) << e;
  EXPECT_EQ(read_all(path), "old");
  EXPECT_EQ(names_in(ro), std::vector<std::string>{"state.json"});
}

TEST(AtomicFile, AFullDiskLeavesTheOldFileAndNoTemporary) {
  // RLIMIT_FSIZE makes write() fail as a full disk does (EFBIG instead of ENOSPC), also for root.
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "cache.mvc";
  write_file_atomically(path, "old contents");
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto* previous = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string e = io_error_of([&] { write_file_atomically(path, std::string(100000, 'z')); });
  const std::string s = io_error_of([&] { write_file_synced(dir / "part.json", std::string(100000, 'z')); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous);
  EXPECT_NE(e.find(path + ": cannot write: File too large"), std::string::npos) << e;
  EXPECT_NE(s.find((dir / "part.json") + ": cannot write: File too large"), std::string::npos) << s;
  EXPECT_EQ(read_all(path), "old contents");
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"cache.mvc"});  // no temporary, no partial file
}

TEST(AtomicFile, AFailingProducerLeavesTheOldFileAndPassesItsError) {
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "model.pt";
  write_file_atomically(path, "old");
  const auto failing = [](const ByteSink& sink) {
    sink("partial", 7);
    throw std::runtime_error("serialiser failed");
  };
  EXPECT_THROW(write_file_atomically(path, failing), std::runtime_error);
  EXPECT_EQ(read_all(path), "old");
  EXPECT_THROW(write_file_synced(dir / "other.pt", failing), std::runtime_error);
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"model.pt"});
}

TEST(AtomicFile, ATargetThatIsAFolderIsRefusedAndKept) {
  test::TempDir dir("mae3d_atomic");
  fs::create_directories(dir.path / "taken" / "inside");
  const std::string path = dir / "taken";
  const std::string e = io_error_of([&] { write_file_atomically(path, "x"); });
  EXPECT_NE(e.find(path + ": cannot write: "), std::string::npos) << e;
  EXPECT_TRUE(fs::is_directory(dir.path / "taken" / "inside"));
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"taken"});
}

TEST(AtomicFile, ThreadsWritingOnePathNeverMixTheirBytes) {
  // Loader threads may build the same cache file at once: each writes its own temporary, and the
  // file ends up as exactly one of the writes.
  test::TempDir dir("mae3d_atomic");
  const std::string path = dir / "shared.bin";
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) write_file_atomically(path, std::string(50000, static_cast<char>('a' + t)));
    });
  }
  for (auto& t : threads) t.join();
  const std::string got = read_all(path);
  ASSERT_EQ(got.size(), 50000u);
  EXPECT_EQ(got.find_first_not_of(got[0]), std::string::npos);
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"shared.bin"});
}

}  // namespace
}  // namespace mae
