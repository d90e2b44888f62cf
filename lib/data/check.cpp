// The pre-flight data check; see check.h.
#include "data/check.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"
#include "io/io.h"

namespace mae {

namespace {

VolumeCheck check_one(const VolumeCache& cache, const DatasetEntry& entry) {
  VolumeCheck c;
  c.entry = entry;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    PreprocessedVolume p = cache.load(entry, &c.cache);
    const Volume& v = p.volume;
    c.source = p.source;
    for (int i = 0; i < 4; ++i) c.shape[i] = v.data.size(i);
    c.spacing = v.spacing;
    c.orientation = orientation_code(v);
    if (v.data.numel() > 0) {
      c.min = v.data.min().item<double>();
      c.max = v.data.max().item<double>();
    }
    c.ok = true;
  } catch (const Error& e) {
    c.error = e.what();
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return c;
}

}  // namespace

std::string VolumeCheck::line() const {
  if (!ok) return "FAIL " + failure();
  char buf[512];
  std::snprintf(buf, sizeof buf,
                " %lldx%lldx%lldx%lld (src %lldx%lldx%lld %.3gx%.3gx%.3g mm %s) spacing %.3gx%.3gx%.3g mm %s "
                "range [%.4g, %.4g] cache %s %.2f s",
                static_cast<long long>(shape[0]), static_cast<long long>(shape[1]), static_cast<long long>(shape[2]),
                static_cast<long long>(shape[3]), static_cast<long long>(source.shape_dhw[0]),
                static_cast<long long>(source.shape_dhw[1]), static_cast<long long>(source.shape_dhw[2]),
                source.spacing[0], source.spacing[1], source.spacing[2], source.orientation.c_str(), spacing[0],
                spacing[1], spacing[2], orientation.c_str(), min, max, to_string(cache), seconds);
  return "ok " + entry.name() + buf;
}

std::string VolumeCheck::failure() const {
  if (ok) return "";
  // Library errors usually name the file already; name it only when they do not.
  if (!entry.paths.empty() && error.find(entry.paths.front()) != std::string::npos) return error;
  return entry.name() + ": " + error;
}

int64_t CheckReport::failures() const {
  int64_t n = 0;
  for (const auto& v : volumes) n += v.ok ? 0 : 1;
  return n;
}

std::vector<DatasetEntry> CheckReport::usable() const {
  std::vector<DatasetEntry> out;
  for (const auto& v : volumes) {
    if (v.ok) out.push_back(v.entry);
  }
  return out;
}

CheckReport check_data(const std::vector<DatasetEntry>& entries, const DataConfig& config, int threads) {
  const VolumeCache cache(config);
  CheckReport report;
  report.volumes.resize(entries.size());
  const int n = std::max(1, std::min<int>(threads > 0 ? threads : config.workers, static_cast<int>(entries.size())));
  std::atomic<size_t> next{0};
  std::exception_ptr fatal;
  std::mutex fatal_mu;
  auto work = [&] {
    at::init_num_threads();
    for (size_t i; (i = next++) < entries.size();) {
      try {
        report.volumes[i] = check_one(cache, entries[i]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(fatal_mu);
        if (!fatal) fatal = std::current_exception();
      }
    }
  };
  if (n == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) {
      try {
        pool.emplace_back(work);
      } catch (const std::exception& e) {
        // Joinable threads must not be destroyed: let the started ones stop after their current
        // volume, join them, then report the failure.
        next = entries.size();
        for (auto& started : pool) started.join();
        throw Error("data check: could not start worker thread " + std::to_string(t + 1) + " of " +
                    std::to_string(n) + ": " + e.what());
      }
    }
    for (auto& t : pool) t.join();
  }
  if (fatal) std::rethrow_exception(fatal);
  return report;
}

std::vector<DatasetEntry> usable_entries(const CheckReport& report, const DataConfig& config) {
  const int64_t bad = report.failures();
  if (bad > 0 && config.on_bad_volume != "skip") {
    for (const auto& v : report.volumes) {
      if (!v.ok) {
        throw InputError(v.failure() + (bad > 1 ? " (and " + std::to_string(bad - 1) + " more bad volumes)" : "") +
                         "; set \"data.on_bad_volume\": \"skip\" to train without them");
      }
    }
  }
  for (const auto& v : report.volumes) {
    if (!v.ok) spdlog::warn("skipping bad volume: {}", v.failure());
  }
  std::vector<DatasetEntry> out = report.usable();
  if (out.empty()) throw InputError("no usable volume is left in the dataset (all " + std::to_string(bad) + " failed)");
  return out;
}

}  // namespace mae
