// Deterministic preprocessing through files and the on-disk cache: hits, invalidation on changed
// settings or files, recovery from damaged files, and the pre-flight check.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "data/cache.h"
#include "data/check.h"
#include "helpers.h"
#include "io/io.h"

namespace mae {
namespace {

namespace fs = std::filesystem;
using test::LogCapture;
using test::make_volume;
using test::TempDir;

struct CacheTest : ::testing::Test {
  TempDir dir;
  DataConfig config;
  DatasetEntry entry;
  void SetUp() override {
    Volume v = make_volume(1, 12, 14, 16, -500, 500, {1.0, 1.5, 2.0});
    write_volume(v, dir / "ct.nii.gz");
    entry.paths = {dir / "ct.nii.gz"};
    config.dataset = dir / "ct.nii.gz";
    config.cache_dir = dir / "cache";
    config.orientation = "RAS";
    config.spacing_mm = std::array<double, 3>{2.0, 2.0, 2.0};
    config.intensity.mode = "ct_window";
  }
  std::vector<fs::path> cache_files() const {
    std::vector<fs::path> out;
    for (const auto& it : fs::directory_iterator(config.cache_dir)) out.push_back(it.path());
    return out;
  }
};

TEST_F(CacheTest, PreprocessReorientsResamplesAndNormalises) {
  const PreprocessedVolume p = preprocess_volume(entry, config);
  EXPECT_EQ(orientation_code(p.volume), "RAS");
  EXPECT_EQ(p.source.orientation, "LPS");
  EXPECT_EQ(p.source.shape_dhw, (std::array<int64_t, 3>{12, 14, 16}));
  EXPECT_EQ(p.volume.spacing, (std::array<double, 3>{2.0, 2.0, 2.0}));
  EXPECT_EQ(p.volume.data.size(0), 1);
  EXPECT_NEAR(p.volume.data.size(3), 8, 1);  // 16 voxels of 1 mm -> 8 of 2 mm
  EXPECT_GE(p.volume.data.min().item<float>(), 0.f);
  EXPECT_LE(p.volume.data.max().item<float>(), 1.f);
}

TEST_F(CacheTest, SecondLoadIsAHitWithTheSameVoxels) {
  VolumeCache cache(config);
  CacheState s1, s2;
  const PreprocessedVolume a = cache.load(entry, &s1);
  const PreprocessedVolume b = cache.load(entry, &s2);
  EXPECT_EQ(s1, CacheState::built);
  EXPECT_EQ(s2, CacheState::hit);
  EXPECT_TRUE(at::equal(a.volume.data, b.volume.data));
  EXPECT_EQ(a.volume.spacing, b.volume.spacing);
  EXPECT_EQ(a.volume.origin, b.volume.origin);
  EXPECT_EQ(a.volume.direction, b.volume.direction);
  EXPECT_EQ(b.source.orientation, "LPS");
  EXPECT_EQ(b.source.shape_dhw, a.source.shape_dhw);
  EXPECT_EQ(cache_files().size(), 1u);
  // No temporary file is left behind, and the cache off gives the same voxels.
  DataConfig off = config;
  off.cache_dir.clear();
  CacheState s3;
  EXPECT_TRUE(at::equal(VolumeCache(off).load(entry, &s3).volume.data, a.volume.data));
  EXPECT_EQ(s3, CacheState::off);
}

TEST_F(CacheTest, ChangedSettingsOrFileInvalidate) {
  CacheState s;
  VolumeCache(config).load(entry, &s);
  ASSERT_EQ(s, CacheState::built);
  DataConfig other = config;
  other.intensity.a_max = 300;
  VolumeCache(other).load(entry, &s);
  EXPECT_EQ(s, CacheState::built);
  other = config;
  other.spacing_mm.reset();
  VolumeCache(other).load(entry, &s);
  EXPECT_EQ(s, CacheState::built);
  other = config;  // decides which DICOM series are read, so it is part of the key
  other.dicom_slice_tolerance = 0.25;
  VolumeCache(other).load(entry, &s);
  EXPECT_EQ(s, CacheState::built);
  VolumeCache(config).load(entry, &s);
  EXPECT_EQ(s, CacheState::hit);
  // Rewrite the source with other voxels: the key changes (size/mtime), the volume is rebuilt.
  const auto before = VolumeCache(config).load(entry).volume.data;
  write_volume(make_volume(1, 12, 14, 16, -500, 500, {1.0, 1.5, 2.0}, /*seed=*/99), entry.paths[0]);
  fs::last_write_time(entry.paths[0], fs::last_write_time(entry.paths[0]) + std::chrono::seconds(5));
  const auto after = VolumeCache(config).load(entry, &s).volume.data;
  EXPECT_EQ(s, CacheState::built);
  EXPECT_FALSE(at::equal(before, after));
  // Touching alone (same bytes, new mtime) also rebuilds.
  fs::last_write_time(entry.paths[0], fs::last_write_time(entry.paths[0]) + std::chrono::seconds(5));
  VolumeCache(config).load(entry, &s);
  EXPECT_EQ(s, CacheState::built);
}

// Same size, old modification time restored (`touch -r`): only the inode, the status-change time
// and the content tell the files apart; the cache must not serve the old volume.
TEST_F(CacheTest, ReplacedContentWithRestoredMtimeIsRebuilt) {
  DataConfig raw;
  raw.cache_dir = dir / "cache_raw";
  raw.orientation = "";
  const std::string path = dir / "vol.nii";
  write_volume(make_volume(1, 6, 7, 8, 0, 1000), path);
  const DatasetEntry e{{path}, ""};
  VolumeCache cache(raw);
  CacheState s;
  const PreprocessedVolume first = cache.load(e, &s);
  ASSERT_EQ(s, CacheState::built);
  EXPECT_GT(first.volume.data.max().item<double>(), 100.0);
  const auto size = fs::file_size(path);
  const auto mtime = fs::last_write_time(path);
  // In place (same inode).
  write_volume(make_volume(1, 6, 7, 8, 7, 8, {1.0, 1.0, 1.0}, 3), path);
  fs::last_write_time(path, mtime);
  ASSERT_EQ(fs::file_size(path), size);
  ASSERT_EQ(fs::last_write_time(path), mtime);
  const PreprocessedVolume second = cache.load(e, &s);
  EXPECT_EQ(s, CacheState::built);
  EXPECT_GE(second.volume.data.min().item<double>(), 7.0);
  EXPECT_LE(second.volume.data.max().item<double>(), 8.0);
  // Replaced by renaming another file over it (a new inode).
  write_volume(make_volume(1, 6, 7, 8, 20, 21, {1.0, 1.0, 1.0}, 4), dir / "other.nii");
  fs::last_write_time(dir / "other.nii", mtime);
  fs::rename(dir / "other.nii", path);
  ASSERT_EQ(fs::file_size(path), size);
  const PreprocessedVolume third = cache.load(e, &s);
  EXPECT_EQ(s, CacheState::built);
  EXPECT_GE(third.volume.data.min().item<double>(), 20.0);
  // Unchanged since: a hit.
  cache.load(e, &s);
  EXPECT_EQ(s, CacheState::hit);
}

TEST_F(CacheTest, DamagedFileIsRebuiltWithAWarning) {
  VolumeCache cache(config);
  const at::Tensor good = cache.load(entry).volume.data;
  const fs::path file = cache.file_for(entry);
  ASSERT_TRUE(fs::exists(file));
  const auto size = fs::file_size(file);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size - 7));
    char c;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(static_cast<std::streamoff>(size - 7));
    f.write(&c, 1);
  }
  CacheState s;
  at::Tensor again;
  {
    LogCapture log;
    again = cache.load(entry, &s).volume.data;
    EXPECT_NE(log.text().find("damaged cache file"), std::string::npos) << log.text();
    EXPECT_NE(log.text().find("checksum"), std::string::npos) << log.text();
  }
  EXPECT_EQ(s, CacheState::rebuilt);
  EXPECT_TRUE(at::equal(good, again));
  cache.load(entry, &s);
  EXPECT_EQ(s, CacheState::hit);
  // A truncated file and a foreign file are rebuilt too.
  fs::resize_file(file, size / 2);
  cache.load(entry, &s);
  EXPECT_EQ(s, CacheState::rebuilt);
  test::write_text(file.string(), std::string(400, 'z'));
  cache.load(entry, &s);
  EXPECT_EQ(s, CacheState::rebuilt);
  EXPECT_THROW(read_cache_file(file.string() + ".none", 0), InputError);
}

TEST_F(CacheTest, MultiChannelEntryAndLargeValuesKeepFloat32) {
  write_volume(make_volume(1, 12, 14, 16, 0, 100, {1.0, 1.5, 2.0}, 5), dir / "t2.nii.gz");
  DatasetEntry two{{dir / "ct.nii.gz", dir / "t2.nii.gz"}, ""};
  config.intensity.mode = "zscore_nonzero";
  const PreprocessedVolume p = VolumeCache(config).load(two);
  EXPECT_EQ(p.volume.data.size(0), 2);
  EXPECT_EQ(p.source.channels, 2);
  // Values beyond float16's range are stored as float32, exactly.
  Volume big = make_volume(1, 4, 4, 4, 1e5, 2e5);
  write_volume(big, dir / "big.nii");
  DataConfig raw;
  raw.cache_dir = dir / "cache2";
  raw.orientation = "";
  VolumeCache c2(raw);
  DatasetEntry be{{dir / "big.nii"}, ""};
  c2.load(be);
  CacheState s;
  EXPECT_TRUE(at::equal(c2.load(be, &s).volume.data, big.data));
  EXPECT_EQ(s, CacheState::hit);
}

TEST_F(CacheTest, CheckDataReportsEveryFailure) {
  test::write_text(dir / "bad.nii.gz", "not a volume at all");
  std::vector<DatasetEntry> entries = {entry, {{dir / "missing.nii.gz"}, ""}, {{dir / "bad.nii.gz"}, ""}};
  const CheckReport r = check_data(entries, config, 2);
  ASSERT_EQ(r.volumes.size(), 3u);
  EXPECT_TRUE(r.volumes[0].ok);
  EXPECT_EQ(r.volumes[0].cache, CacheState::built);
  EXPECT_EQ(r.volumes[0].orientation, "RAS");
  EXPECT_EQ(r.volumes[0].source.orientation, "LPS");
  EXPECT_GE(r.volumes[0].min, 0.0);
  EXPECT_LE(r.volumes[0].max, 1.0);
  EXPECT_EQ(r.volumes[0].line().rfind("ok " + entry.paths[0], 0), 0u) << r.volumes[0].line();
  EXPECT_FALSE(r.volumes[1].ok);
  EXPECT_NE(r.volumes[1].error.find("missing.nii.gz"), std::string::npos) << r.volumes[1].error;
  EXPECT_FALSE(r.volumes[2].ok);
  EXPECT_NE(r.volumes[2].error.find("bad.nii.gz"), std::string::npos) << r.volumes[2].error;
  EXPECT_EQ(r.failures(), 2);
  EXPECT_EQ(r.usable().size(), 1u);
  EXPECT_EQ(check_data({entry}, config, 1).volumes[0].cache, CacheState::hit);
  // "error" stops on a bad volume, "skip" drops it with a log line.
  EXPECT_THROW(usable_entries(r, config), InputError);
  config.on_bad_volume = "skip";
  LogCapture log;
  EXPECT_EQ(usable_entries(r, config).size(), 1u);
  EXPECT_NE(log.text().find("skipping bad volume"), std::string::npos);
}

}  // namespace
}  // namespace mae
