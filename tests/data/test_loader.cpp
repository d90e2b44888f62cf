// The loader: bit-identical batches for any number of workers, exact resume, ranks slicing the
// batches of one process, worker errors reaching the consumer, clean shutdown mid-epoch, and a
// real MRI end to end.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "core/error.h"
#include "data/loader.h"
#include "data/transforms.h"
#include "helpers.h"
#include "io/io.h"

namespace mae {
namespace {

namespace fs = std::filesystem;
using test::make_volume;
using test::TempDir;

struct LoaderTest : ::testing::Test {
  static inline TempDir* dir = nullptr;
  static inline std::vector<DatasetEntry> entries;
  DataConfig config;
  LoaderOptions options;

  static void SetUpTestSuite() {
    dir = new TempDir;
    for (int i = 0; i < 5; ++i) {
      const std::string p = *dir / ("v" + std::to_string(i) + ".nii");
      // One volume is smaller than the crop along D: it is padded.
      write_volume(make_volume(1, i == 3 ? 10 : 18, 20, 22, -200, 300, {1.0, 1.0, 1.0}, 10 + i), p);
      entries.push_back({{p}, ""});
    }
  }
  static void TearDownTestSuite() {
    delete dir;
    entries.clear();
  }
  void SetUp() override {
    config.dataset = *dir / "v0.nii";
    config.cache_dir = *dir / "cache";
    config.intensity.mode = "ct_window";
    config.num_samples = 2;
    config.flip_prob = 0.5;
    options.crop_size = {12, 12, 12};
    options.batch_size = 3;
    options.seed = 1234;
  }

  std::vector<Batch> run(int workers, int64_t n, LoaderPosition start = {}) {
    DataConfig c = config;
    c.workers = workers;
    Loader loader(entries, c, options, start);
    std::vector<Batch> out;
    for (int64_t i = 0; i < n; ++i) out.push_back(loader.next());
    return out;
  }
};

TEST_F(LoaderTest, BatchesAreIdenticalForAnyNumberOfWorkers) {
  const auto ref = run(0, 8);  // 10 items per epoch, batch 3 -> 3 batches; 8 batches span 3 epochs
  ASSERT_EQ(ref[0].images.sizes(), (std::vector<int64_t>{3, 1, 12, 12, 12}));
  EXPECT_EQ(ref[0].images.scalar_type(), at::kFloat);
  EXPECT_EQ(ref[3].epoch, 1);
  EXPECT_EQ(ref[3].index, 0);
  for (int w : {1, 2, 3}) {
    const auto got = run(w, 8);
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_TRUE(at::equal(ref[i].images, got[i].images)) << "workers " << w << " batch " << i;
      EXPECT_EQ(ref[i].volumes, got[i].volumes);
      EXPECT_EQ(ref[i].items, got[i].items);
    }
  }
  // Crops of one volume are consecutive and epochs are shuffled differently.
  EXPECT_EQ(ref[0].volumes[0], ref[0].volumes[1]);
  Loader l(entries, config, options);
  EXPECT_NE(l.epoch_volumes(0), l.epoch_volumes(1));
  EXPECT_EQ(l.batches_per_epoch(), 3);
}

TEST_F(LoaderTest, ResumesExactlyFromAPosition) {
  DataConfig c = config;
  c.workers = 2;
  Loader full(entries, c, options);
  std::vector<Batch> ref;
  std::vector<LoaderPosition> pos;
  for (int i = 0; i < 7; ++i) {
    pos.push_back(full.position());
    ref.push_back(full.next());
  }
  EXPECT_EQ(full.position(), (LoaderPosition{2, 1}));
  for (int k : {1, 4}) {
    Loader resumed(entries, c, options, pos[k]);
    EXPECT_EQ(resumed.position(), pos[k]);
    for (int i = k; i < 7; ++i) {
      const Batch b = resumed.next();
      EXPECT_EQ(b.epoch, ref[i].epoch);
      EXPECT_EQ(b.index, ref[i].index);
      EXPECT_TRUE(at::equal(b.images, ref[i].images)) << "resumed at " << k << ", batch " << i;
    }
  }
  EXPECT_THROW(Loader(entries, c, options, LoaderPosition{0, 3}), ConfigError);
}

TEST_F(LoaderTest, RanksSliceTheBatchOneProcessDraws) {
  // 5 volumes x 2 samples = 10 items. One process with batch 4: 2 batches per epoch (drop_last);
  // 2 ranks with batch 2 each take halves of exactly those batches, in rank order.
  options.batch_size = 4;
  Loader single(entries, config, options);
  options.batch_size = 2;
  options.world_size = 2;
  options.rank = 0;
  Loader r0(entries, config, options);
  options.rank = 1;
  Loader r1(entries, config, options);
  EXPECT_EQ(single.batches_per_epoch(), 2);
  EXPECT_EQ(r0.batches_per_epoch(), 2);
  EXPECT_EQ(r0.epoch_volumes(1), single.epoch_volumes(1));
  for (int i = 0; i < 5; ++i) {  // across an epoch boundary
    const Batch whole = single.next(), a = r0.next(), b = r1.next();
    ASSERT_EQ(a.index, whole.index);
    ASSERT_EQ(b.epoch, whole.epoch);
    EXPECT_TRUE(at::equal(at::cat({a.images, b.images}, 0), whole.images)) << "batch " << i;
    std::vector<int64_t> items = a.items;
    items.insert(items.end(), b.items.begin(), b.items.end());
    EXPECT_EQ(items, whole.items);
  }
  // Without drop_last the last global batch holds 2 items: rank 1's slice is empty.
  options.drop_last = false;
  options.batch_size = 4;
  options.world_size = 2;
  Loader tail(entries, config, options, LoaderPosition{0, 1});
  EXPECT_EQ(tail.batches_per_epoch(), 2);
  const Batch empty = tail.next();
  EXPECT_FALSE(empty.images.defined());
  EXPECT_TRUE(empty.items.empty());
  options.drop_last = true;
  options.rank = 2;
  EXPECT_THROW(Loader(entries, config, options), ConfigError);
  options.rank = 0;
  options.world_size = 6;  // 6 x 4 = 24 > 10 items
  EXPECT_THROW(Loader(entries, config, options), ConfigError);
}

TEST_F(LoaderTest, WorkerErrorsReachTheConsumer) {
  TempDir bad_dir;
  test::write_text(bad_dir / "broken.nii", "garbage, not a NIfTI file");
  auto list = entries;
  list.push_back({{bad_dir / "broken.nii"}, ""});
  config.workers = 2;
  config.cache_dir.clear();
  options.shuffle = false;  // the broken volume comes last: batch 3 of epoch 0 (items 10, 11)
  options.batch_size = 2;
  Loader l(list, config, options);
  int good = 0;
  try {
    for (int i = 0; i < 10; ++i) {
      l.next();
      ++good;
    }
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("broken.nii"), std::string::npos) << e.what();
  }
  EXPECT_EQ(good, 5);
  EXPECT_THROW(l.next(), InputError);
}

TEST_F(LoaderTest, DestroyedMidEpochWithoutHanging) {
  config.workers = 3;
  config.prefetch = 2;
  for (int i = 0; i < 3; ++i) {
    Loader l(entries, config, options);
    if (i > 0) l.next();
  }
  SUCCEED();
}

TEST_F(LoaderTest, RejectsBadOptions) {
  options.batch_size = 0;
  EXPECT_THROW(Loader(entries, config, options), ConfigError);
  options.batch_size = 11;  // an epoch holds 10 crops
  EXPECT_THROW(Loader(entries, config, options), ConfigError);
  options.drop_last = false;
  EXPECT_EQ(Loader(entries, config, options).batches_per_epoch(), 1);
  EXPECT_THROW(Loader({}, config, options), ConfigError);
}

TEST_F(LoaderTest, IntensityAugOffOrIdentityKeepsCropsBitIdentical) {
  const auto ref = run(0, 4);
  // The crops are exactly random_crop's of the preprocessed volume with the item's seed.
  VolumeCache cache(config);
  for (size_t i = 0; i < ref[0].items.size(); ++i) {
    const at::Tensor v = cache.load(entries[ref[0].volumes[i]]).volume.data;
    const at::Tensor want =
        random_crop(v, options.crop_size, config.flip_prob, item_seed(options.seed, 0, ref[0].items[i]), 0.0);
    EXPECT_TRUE(at::equal(ref[0].images[i], want)) << "crop " << i;
  }
  // prob 0 ignores the ranges; prob 1 with identity ranges leaves every bit (crops and flips too).
  config.intensity_aug.scale = {2.0, 3.0};
  config.intensity_aug.shift = {0.5, 0.6};
  const auto off = run(2, 4);
  config.intensity_aug = IntensityAugConfig{};
  config.intensity_aug.prob = 1.0;
  config.intensity_aug.scale = {1.0, 1.0};
  config.intensity_aug.shift = {0.0, 0.0};
  config.intensity_aug.gamma = {1.0, 1.0};
  const auto identity = run(2, 4);
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_TRUE(at::equal(ref[i].images, off[i].images)) << "batch " << i;
    EXPECT_TRUE(at::equal(ref[i].images, identity[i].images)) << "batch " << i;
  }
}

TEST_F(LoaderTest, IntensityAugIsDrawnPerItemForAnyWorkersAndRanks) {
  const auto plain = run(0, 4);
  config.intensity_aug.prob = 1.0;
  config.intensity_aug.scale = {0.5, 1.5};
  config.intensity_aug.shift = {-0.2, 0.2};
  config.intensity_aug.gamma = {0.5, 2.0};
  const auto ref = run(0, 4);
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_EQ(ref[i].items, plain[i].items);
    EXPECT_FALSE(at::equal(ref[i].images, plain[i].images)) << "batch " << i;
    // Each crop is its un-augmented crop (same position and flips) with the item's own draw applied.
    for (size_t k = 0; k < ref[i].items.size(); ++k) {
      const IntensityAugDraw d =
          draw_intensity_aug(config.intensity_aug, item_seed(options.seed, ref[i].epoch, ref[i].items[k]));
      EXPECT_TRUE(at::equal(ref[i].images[k], apply_intensity_aug(plain[i].images[k], d)))
          << "batch " << i << " crop " << k;
    }
  }
  for (int w : {1, 3}) {
    const auto got = run(w, 4);
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_TRUE(at::equal(ref[i].images, got[i].images)) << "workers " << w << " batch " << i;
    }
  }
  // Two ranks with batch 2 see the halves of one process's batches of 4, augmentation included.
  config.workers = 2;
  options.batch_size = 4;
  Loader single(entries, config, options);
  options.batch_size = 2;
  options.world_size = 2;
  options.rank = 0;
  Loader r0(entries, config, options);
  options.rank = 1;
  Loader r1(entries, config, options);
  for (int i = 0; i < 3; ++i) {
    const Batch whole = single.next(), a = r0.next(), b = r1.next();
    EXPECT_TRUE(at::equal(at::cat({a.images, b.images}, 0), whole.images)) << "batch " << i;
  }
}

TEST(LoaderMri, RealBrainEndToEnd) {
  const std::string ch2 = "/usr/share/mricron/templates/ch2.nii.gz";
  if (!fs::exists(ch2)) GTEST_SKIP() << ch2 << " is not installed (Debian package mricron-data)";
  TempDir dir;
  DataConfig c;
  c.dataset = ch2;
  c.cache_dir = dir / "cache";
  c.spacing_mm = std::array<double, 3>{2.0, 2.0, 2.0};
  c.intensity.mode = "zscore_nonzero";
  c.foreground_threshold = 0.0;
  c.num_samples = 2;
  c.flip_prob = 0.2;
  c.workers = 2;
  LoaderOptions o;
  o.crop_size = {64, 64, 64};
  o.batch_size = 2;
  Loader l({{{ch2}, ""}}, c, o);
  for (int i = 0; i < 2; ++i) {
    const Batch b = l.next();
    EXPECT_EQ(b.images.sizes(), (std::vector<int64_t>{2, 1, 64, 64, 64}));
    EXPECT_TRUE(at::isfinite(b.images).all().item<bool>());
    EXPECT_GT(b.images.std().item<double>(), 0.1);
  }
  EXPECT_EQ(l.position(), (LoaderPosition{2, 0}));
}

}  // namespace
}  // namespace mae
