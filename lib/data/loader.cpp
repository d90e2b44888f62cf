// Worker threads, the reorder buffer that keeps batches in order, and the in-memory LRU of
// preprocessed volumes; see loader.h.
#include "data/loader.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

#include <condition_variable>
#include <exception>
#include <future>
#include <list>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "core/error.h"
#include "core/threads.h"
#include "data/transforms.h"

namespace mae {

namespace {

constexpr uint64_t kEpochOrderTag = 0x65706F63686F7264ULL;  // "epochord"

using VolumePtr = std::shared_ptr<const at::Tensor>;

}  // namespace

struct Loader::Impl {
  std::vector<DatasetEntry> entries;
  DataConfig config;
  LoaderOptions opt;
  VolumeCache cache;
  int64_t vols_per_epoch = 0;
  int64_t items = 0;
  int64_t bpe = 0;
  double pad = 0.0;

  // Scheduling: batches are numbered by sequence s = epoch * bpe + batch.
  mutable std::mutex mu;
  std::condition_variable cv_work, cv_ready;
  int64_t next_claim = 0;
  int64_t next_deliver = 0;
  bool stop = false;
  std::map<int64_t, std::pair<Batch, std::exception_ptr>> ready;
  std::exception_ptr failed;
  std::vector<std::thread> workers;

  // In-memory LRU of preprocessed volumes, with loads in flight shared between workers.
  std::mutex lru_mu;
  std::list<std::pair<int64_t, VolumePtr>> lru;
  std::unordered_map<int64_t, std::list<std::pair<int64_t, VolumePtr>>::iterator> lru_index;
  std::unordered_map<int64_t, std::shared_future<VolumePtr>> in_flight;
  int64_t lru_bytes = 0;
  std::set<int64_t> pad_warned;

  Impl(std::vector<DatasetEntry> e, DataConfig c, LoaderOptions o)
      : entries(std::move(e)), config(std::move(c)), opt(o), cache(config) {}

  std::vector<int64_t> epoch_volumes(int64_t epoch) const {
    const auto n = static_cast<int64_t>(entries.size());
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    if (opt.shuffle) {
      std::mt19937_64 rng(item_seed(opt.seed ^ kEpochOrderTag, epoch, -1));
      for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % static_cast<uint64_t>(i + 1)]);
    }
    return order;
  }

  VolumePtr volume(int64_t v) {
    std::promise<VolumePtr> promise;
    {
      std::unique_lock<std::mutex> lock(lru_mu);
      auto it = lru_index.find(v);
      if (it != lru_index.end()) {
        lru.splice(lru.begin(), lru, it->second);
        return it->second->second;
      }
      auto f = in_flight.find(v);
      if (f != in_flight.end()) {
        auto fut = f->second;
        lock.unlock();
        return fut.get();
      }
      in_flight.emplace(v, promise.get_future().share());
    }
    VolumePtr result;
    try {
      result = std::make_shared<const at::Tensor>(cache.load(entries[v]).volume.data);
    } catch (...) {
      std::lock_guard<std::mutex> lock(lru_mu);
      promise.set_exception(std::current_exception());
      in_flight.erase(v);
      throw;
    }
    std::lock_guard<std::mutex> lock(lru_mu);
    const int64_t budget = opt.memory_cache_mb * 1024 * 1024;
    const int64_t bytes = result->numel() * 4;
    if (bytes <= budget) {
      lru.emplace_front(v, result);
      lru_index[v] = lru.begin();
      lru_bytes += bytes;
      while (lru_bytes > budget && !lru.empty()) {
        lru_bytes -= lru.back().second->numel() * 4;
        lru_index.erase(lru.back().first);
        lru.pop_back();
      }
    }
    promise.set_value(result);
    in_flight.erase(v);
    return result;
  }

  Batch build(int64_t seq) {
    Batch b;
    b.epoch = seq / bpe;
    b.index = seq % bpe;
    const std::vector<int64_t> vols = epoch_volumes(b.epoch);
    const int64_t first = b.index * opt.batch_size * opt.world_size + opt.rank * opt.batch_size;
    const int64_t last = std::min(items, first + opt.batch_size);
    std::vector<at::Tensor> crops;
    for (int64_t item = first; item < last; ++item) {
      const int64_t v = vols[item / config.num_samples];
      VolumePtr x = volume(v);
      bool small = false;
      for (int a = 0; a < 3; ++a) small = small || x->size(a + 1) < opt.crop_size[a];
      if (small) {
        std::lock_guard<std::mutex> lock(lru_mu);
        if (pad_warned.insert(v).second) {
          spdlog::warn("{}: preprocessed size {}x{}x{} is smaller than the crop {}x{}x{}; padding with {}",
                       entries[v].name(), x->size(1), x->size(2), x->size(3), opt.crop_size[0], opt.crop_size[1],
                       opt.crop_size[2], pad);
        }
      }
      const uint64_t seed = item_seed(opt.seed, b.epoch, item);
      at::Tensor crop = random_crop(*x, opt.crop_size, config.flip_prob, seed, pad);
      if (config.intensity_aug.prob > 0.0)
        crop = apply_intensity_aug(crop, draw_intensity_aug(config.intensity_aug, seed));
      crops.push_back(std::move(crop));
      b.volumes.push_back(v);
      b.items.push_back(item);
    }
    for (size_t i = 1; i < crops.size(); ++i) {
      if (crops[i].size(0) != crops[0].size(0)) {
        throw InputError(entries[b.volumes[i]].name() + " has " + std::to_string(crops[i].size(0)) + " channels, but " +
                         entries[b.volumes[0]].name() + " has " + std::to_string(crops[0].size(0)) +
                         "; every volume needs the same channel count");
      }
    }
    if (!crops.empty()) b.images = at::stack(crops, 0).contiguous();
    return b;
  }

  void worker() {
    setup_background_thread();
    for (;;) {
      int64_t seq;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv_work.wait(lock, [&] { return stop || next_claim < next_deliver + config.prefetch; });
        if (stop) return;
        seq = next_claim++;
      }
      std::pair<Batch, std::exception_ptr> result;
      try {
        result.first = build(seq);
      } catch (...) {
        result.second = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        ready.emplace(seq, std::move(result));
      }
      cv_ready.notify_all();
    }
  }
};

Loader::Loader(std::vector<DatasetEntry> entries, DataConfig config, LoaderOptions options, LoaderPosition start) {
  if (entries.empty()) throw ConfigError("the loader got no volumes (\"data.dataset\")");
  if (options.batch_size < 1) throw ConfigError("batch_size = " + std::to_string(options.batch_size) + " must be >= 1");
  for (int64_t s : options.crop_size) {
    if (s < 1) throw ConfigError("img_size has " + std::to_string(s) + "; every crop size must be >= 1");
  }
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw ConfigError("rank " + std::to_string(options.rank) + " is outside world_size " +
                      std::to_string(options.world_size));
  }
  if (options.memory_cache_mb < 0) throw ConfigError("memory_cache_mb must be >= 0");
  if (config.num_samples < 1) throw ConfigError("\"data.num_samples\" must be >= 1");
  if (config.workers < 0) throw ConfigError("\"data.workers\" must be >= 0");
  if (config.prefetch < 1) throw ConfigError("\"data.prefetch\" must be >= 1");
  impl_ = std::make_unique<Impl>(std::move(entries), std::move(config), options);
  Impl& m = *impl_;
  m.vols_per_epoch = static_cast<int64_t>(m.entries.size());
  m.items = m.vols_per_epoch * m.config.num_samples;
  const int64_t global = options.batch_size * options.world_size;
  m.bpe = options.drop_last ? m.items / global : (m.items + global - 1) / global;
  if (m.bpe == 0) {
    throw ConfigError("batch_size = " + std::to_string(options.batch_size) +
                      (options.world_size > 1 ? " x " + std::to_string(options.world_size) + " ranks" : std::string()) +
                      " exceeds the " + std::to_string(m.items) + " crops an epoch holds (volumes x data.num_samples)");
  }
  if (start.epoch < 0 || start.batch < 0 || start.batch >= m.bpe) {
    throw ConfigError("loader position (epoch " + std::to_string(start.epoch) + ", batch " +
                      std::to_string(start.batch) + ") is outside an epoch of " + std::to_string(m.bpe) + " batches");
  }
  m.pad = pad_value(m.config.intensity);
  m.next_claim = m.next_deliver = start.epoch * m.bpe + start.batch;
  try {
    for (int i = 0; i < m.config.workers; ++i) m.workers.emplace_back([&m] { m.worker(); });
  } catch (const std::system_error& e) {
    // The destructor does not run for a constructor that throws: stop and join what started.
    {
      std::lock_guard<std::mutex> lock(m.mu);
      m.stop = true;
    }
    m.cv_work.notify_all();
    for (auto& t : m.workers) t.join();
    throw Error("cannot start " + std::to_string(m.config.workers) + " loader threads (\"data.workers\"): " + e.what());
  }
}

Loader::~Loader() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv_work.notify_all();
  for (auto& t : impl_->workers) t.join();
}

Batch Loader::next() {
  Impl& m = *impl_;
  if (m.failed) std::rethrow_exception(m.failed);
  if (m.workers.empty()) {
    try {
      Batch b = m.build(m.next_deliver);
      ++m.next_deliver;
      return b;
    } catch (...) {
      m.failed = std::current_exception();
      throw;
    }
  }
  std::pair<Batch, std::exception_ptr> result;
  {
    std::unique_lock<std::mutex> lock(m.mu);
    m.cv_ready.wait(lock, [&] { return m.ready.count(m.next_deliver) > 0; });
    auto it = m.ready.find(m.next_deliver);
    result = std::move(it->second);
    m.ready.erase(it);
    ++m.next_deliver;
  }
  m.cv_work.notify_all();
  if (result.second) {
    m.failed = result.second;
    std::rethrow_exception(result.second);
  }
  return std::move(result.first);
}

LoaderPosition Loader::position() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return {impl_->next_deliver / impl_->bpe, impl_->next_deliver % impl_->bpe};
}

int64_t Loader::batches_per_epoch() const { return impl_->bpe; }
int64_t Loader::items_per_epoch() const { return impl_->items; }
int64_t Loader::volumes_per_epoch() const { return impl_->vols_per_epoch; }
const std::vector<DatasetEntry>& Loader::entries() const { return impl_->entries; }
std::vector<int64_t> Loader::epoch_volumes(int64_t epoch) const { return impl_->epoch_volumes(epoch); }

}  // namespace mae
