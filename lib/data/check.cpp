// The pre-flight data check; see check.h.
#include "data/check.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"
#include "io/io.h"

namespace mae {

namespace {

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// "" when the volume carries signal, else why not: every voxel equal as read, or every voxel of a
// channel equal after preprocessing (an intensity setting that maps a whole volume to one value).
std::string constant_problem(const PreprocessedVolume& p, const at::Tensor& lo, const at::Tensor& hi) {
  if (p.source.min == p.source.max) {
    return "constant volume: every voxel is " + number(p.source.min) +
           " as read (an empty or failed export?); it carries nothing to learn";
  }
  const auto l = lo.accessor<float, 1>(), h = hi.accessor<float, 1>();
  for (int64_t c = 0; c < l.size(0); ++c) {
    if (l[c] == h[c]) {
      return "constant volume after preprocessing: every voxel" +
             (l.size(0) > 1 ? " of channel " + std::to_string(c) : std::string()) + " is " + number(l[c]) +
             " (as read the volume spans " + number(p.source.min) + " .. " + number(p.source.max) +
             "; check \"data.intensity\")";
    }
  }
  return "";
}

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
      const auto [lo, hi] = at::aminmax(v.data.reshape({v.data.size(0), -1}), 1);
      c.min = lo.min().item<double>();
      c.max = hi.max().item<double>();
      const std::string constant = constant_problem(p, lo.to(at::kFloat), hi.to(at::kFloat));
      if (!constant.empty()) throw InputError(printable(entry.name() + ": " + constant), "constant volume");
      c.voxel_hash = voxel_hash(v.data);
    }
    c.ok = true;
  } catch (const InputError& e) {
    c.error = e.what();
    c.cause = e.cause().empty() ? "other" : e.cause();
  } catch (const Error& e) {
    c.error = e.what();
    c.cause = "other";
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return c;
}

// Refuses every volume whose voxels are identical to an earlier one's: the same scan under two
// names (a copy, another format) would otherwise be trained on twice or leak into validation.
void refuse_identical(CheckReport& report) {
  std::map<std::pair<uint64_t, std::array<int64_t, 4>>, size_t> first;
  for (size_t i = 0; i < report.volumes.size(); ++i) {
    VolumeCheck& v = report.volumes[i];
    if (!v.ok) continue;
    const auto [it, inserted] = first.emplace(std::make_pair(v.voxel_hash, v.shape), i);
    if (inserted) continue;
    v.ok = false;
    v.cause = "duplicate volume";
    v.error = printable(v.entry.name() + ": the same voxels as " + report.volumes[it->second].entry.name() +
                        " (one scan listed twice under other names?); list each scan once");
  }
}

}  // namespace

std::string VolumeCheck::line() const {
  if (!ok) return "FAIL " + failure() + " [" + cause + "]";
  char buf[512];
  std::snprintf(buf, sizeof buf,
                " %lldx%lldx%lldx%lld (src %lldx%lldx%lld %.3gx%.3gx%.3g mm %s) spacing %.3gx%.3gx%.3g mm %s "
                "range [%.4g, %.4g] cache %s %.2f s",
                static_cast<long long>(shape[0]), static_cast<long long>(shape[1]), static_cast<long long>(shape[2]),
                static_cast<long long>(shape[3]), static_cast<long long>(source.shape_dhw[0]),
                static_cast<long long>(source.shape_dhw[1]), static_cast<long long>(source.shape_dhw[2]),
                source.spacing[0], source.spacing[1], source.spacing[2], source.orientation.c_str(), spacing[0],
                spacing[1], spacing[2], orientation.c_str(), min, max, to_string(cache), seconds);
  return printable("ok " + entry.name() + buf);
}

std::string VolumeCheck::failure() const {
  if (ok) return "";
  // Library errors usually name the file already; name it only when they do not.
  const std::string text = printable(error);
  if (!entry.paths.empty() && text.find(printable(entry.paths.front())) != std::string::npos) return text;
  return printable(entry.name()) + ": " + text;
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

std::vector<std::pair<std::string, int64_t>> CheckReport::causes() const {
  std::map<std::string, int64_t> counts;
  for (const auto& v : volumes) {
    if (!v.ok) ++counts[v.cause.empty() ? "other" : v.cause];
  }
  std::vector<std::pair<std::string, int64_t>> out(counts.begin(), counts.end());
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

std::string CheckReport::summary() const {
  const int64_t bad = failures();
  const auto n = static_cast<int64_t>(volumes.size());
  std::string out = "checked " + std::to_string(n) + (n == 1 ? " volume: " : " volumes: ") + std::to_string(n - bad) +
                    " ok, " + std::to_string(bad) + " refused";
  std::string by_cause;
  for (const auto& [cause, count] : causes()) {
    by_cause += (by_cause.empty() ? "" : ", ") + std::to_string(count) + " " + cause;
  }
  return by_cause.empty() ? out : out + " (" + by_cause + ")";
}

std::string CheckReport::text() const {
  std::string out;
  for (const auto& v : volumes) out += v.line() + "\n";
  out += summary() + "\n";
  if (failures() > 0) {
    out += "failures:\n";
    for (const auto& v : volumes) {
      if (!v.ok) out += "  " + v.failure() + "\n";
    }
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
        throw Error("data check: could not start worker thread " + std::to_string(t + 1) + " of " + std::to_string(n) +
                    ": " + e.what());
      }
    }
    for (auto& t : pool) t.join();
  }
  if (fatal) std::rethrow_exception(fatal);
  refuse_identical(report);
  return report;
}

std::vector<DatasetEntry> usable_entries(const CheckReport& report, const DataConfig& config) {
  const int64_t bad = report.failures();
  if (bad > 0 && config.on_bad_volume != "skip") {
    for (const auto& v : report.volumes) {
      if (!v.ok) {
        throw InputError(
            v.failure() +
                (bad > 1 ? " (and " + std::to_string(bad - 1) + " more bad volumes; " + report.summary() + ")" : "") +
                "; set \"data.on_bad_volume\": \"skip\" to train without them",
            v.cause);
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
