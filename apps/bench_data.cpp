// mae-bench-data: speed of the data pipeline. Prints JSON lines: volumes/s and voxels/s for a cold
// read (gzip NIfTI -> reorient -> resample -> intensity, empty cache) and a warm read (from the
// cache) with 1 and 2 intra-op threads, on the real MRI /usr/share/mricron/templates/ch2.nii.gz and
// on a synthetic 512x512x200 int16 CT it writes itself; then the crops/s the loader delivers from a
// warm cache (96^3 crops, batch 2), with and without the in-memory LRU.
#include <ATen/ATen.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include <unistd.h>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "cli.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"
#include "data/cache.h"
#include "data/loader.h"

namespace fs = std::filesystem;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class T>
void put(char* hdr, size_t offset, T value) {
  std::memcpy(hdr + offset, &value, sizeof value);
}

// A synthetic abdomen-like CT: air, an elliptic body with noise, a dense "spine"; int16 HU, stored
// as NIfTI-1 with an LPS orientation (so reading reorients it), 0.78 x 0.78 x 2.5 mm.
void write_synthetic_ct(const std::string& path, int64_t nx, int64_t ny, int64_t nz) {
  at::Generator gen = at::detail::createCPUGenerator(7);
  at::Tensor y = at::arange(ny, at::kFloat).view({1, ny, 1}), x = at::arange(nx, at::kFloat).view({1, 1, nx});
  at::Tensor body = ((x - nx / 2.0) / (0.4 * nx)).pow(2) + ((y - ny / 2.0) / (0.3 * ny)).pow(2) < 1;
  at::Tensor spine = ((x - nx / 2.0).pow(2) + (y - 0.68 * ny).pow(2)) < (0.06 * nx) * (0.06 * nx);
  at::Tensor hu = at::full({nz, ny, nx}, -1000.0f);
  hu = at::where(body, 40.0f + 20.0f * at::randn({nz, ny, nx}, gen), hu);
  hu = at::where(spine, at::full({}, 700.0f), hu);
  at::Tensor voxels = hu.round().clamp(-1024, 3071).to(at::kShort).contiguous();

  char hdr[352] = {};
  const float sx = 0.78f, sy = 0.78f, sz = 2.5f;
  put<int32_t>(hdr, 0, 348);
  const int16_t dim[8] = {3, static_cast<int16_t>(nx), static_cast<int16_t>(ny), static_cast<int16_t>(nz), 1, 1, 1, 1};
  std::memcpy(hdr + 40, dim, sizeof dim);
  put<int16_t>(hdr, 70, 4);   // DT_INT16
  put<int16_t>(hdr, 72, 16);  // bitpix
  const float pixdim[8] = {1.f, sx, sy, sz, 1.f, 1.f, 1.f, 1.f};
  std::memcpy(hdr + 76, pixdim, sizeof pixdim);
  put<float>(hdr, 108, 352.f);  // vox_offset
  put<float>(hdr, 112, 1.f);    // scl_slope
  put<char>(hdr, 123, 2);       // mm
  put<int16_t>(hdr, 252, 1);    // qform_code: scanner
  put<int16_t>(hdr, 254, 1);    // sform_code: scanner
  put<float>(hdr, 264, 1.f);    // quatern_d = 1: 180 degrees about z, x and y point to L and P
  const float ox = sx * nx / 2, oy = sy * ny / 2, oz = -sz * nz / 2;
  put<float>(hdr, 268, ox);
  put<float>(hdr, 272, oy);
  put<float>(hdr, 276, oz);
  const float srow[12] = {-sx, 0, 0, ox, 0, -sy, 0, oy, 0, 0, sz, oz};
  std::memcpy(hdr + 280, srow, sizeof srow);
  std::memcpy(hdr + 344, "n+1\0", 4);

  gzFile f = gzopen(path.c_str(), "wb6");
  if (!f) throw mae::IoError(path + ": cannot write the synthetic CT");
  bool ok = gzwrite(f, hdr, sizeof hdr) == static_cast<int>(sizeof hdr);
  const auto* p = static_cast<const char*>(voxels.data_ptr());
  const size_t n = voxels.numel() * 2;
  for (size_t off = 0; ok && off < n; off += (1u << 24)) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(1u << 24, n - off));
    ok = gzwrite(f, p + off, chunk) == static_cast<int>(chunk);
  }
  if (gzclose(f) != Z_OK || !ok) throw mae::IoError(path + ": cannot write the synthetic CT");
}

void emit(const nlohmann::json& j) { std::cout << j.dump() << std::endl; }

// Cold (fresh cache folder each time) and warm reads of one volume.
void bench_reads(const std::string& name, const std::string& path, mae::DataConfig config, const fs::path& work,
                 int threads, int cold_reps, int warm_reps) {
  mae::set_threads(threads);
  const mae::DatasetEntry entry{{path}, ""};
  int64_t src_voxels = 0, out_voxels = 0;
  double cold = 0.0;
  for (int r = 0; r < cold_reps; ++r) {
    config.cache_dir = (work / ("cold_" + name + "_" + std::to_string(threads) + "_" + std::to_string(r))).string();
    fs::remove_all(config.cache_dir);
    mae::VolumeCache cache(config);
    const double t0 = now_s();
    const mae::PreprocessedVolume v = cache.load(entry);
    cold += now_s() - t0;
    src_voxels = v.source.channels * v.source.shape_dhw[0] * v.source.shape_dhw[1] * v.source.shape_dhw[2];
    out_voxels = v.volume.data.numel();
  }
  mae::VolumeCache cache(config);
  cache.load(entry);
  const double t0 = now_s();
  for (int r = 0; r < warm_reps; ++r) cache.load(entry);
  const double warm = now_s() - t0;
  for (auto [mode, secs, reps] : {std::tuple{"cold", cold, cold_reps}, std::tuple{"warm", warm, warm_reps}}) {
    emit({{"bench", "read"},
          {"volume", name},
          {"mode", mode},
          {"threads", threads},
          {"volumes_per_s", reps / secs},
          {"source_voxels_per_s", src_voxels * reps / secs},
          {"output_voxels_per_s", out_voxels * reps / secs},
          {"seconds_per_volume", secs / reps},
          {"source_voxels", src_voxels},
          {"output_voxels", out_voxels}});
  }
}

void bench_loader(const std::string& ct, mae::DataConfig config, int64_t memory_mb, int batches) {
  mae::LoaderOptions o;
  o.crop_size = {96, 96, 96};
  o.batch_size = 2;
  o.seed = 1;
  o.memory_cache_mb = memory_mb;
  std::vector<mae::DatasetEntry> entries(4, mae::DatasetEntry{{ct}, ""});  // 4 items of one warm file
  mae::Loader loader(entries, config, o);
  loader.next();  // start-up
  const double t0 = now_s();
  for (int i = 0; i < batches; ++i) loader.next();
  const double secs = now_s() - t0;
  emit({{"bench", "loader"},
        {"crop", {96, 96, 96}},
        {"batch_size", 2},
        {"workers", config.workers},
        {"memory_cache_mb", memory_mb},
        {"batches", batches},
        {"crops_per_s", 2 * batches / secs},
        {"target_crops_per_s", 10}});
}

// The benchmark's scratch folder: created on construction, removed with its contents on
// destruction (also when a measurement fails) when the program made it.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& user_dir) {
    own_ = user_dir.empty();
    path_ = own_ ? fs::temp_directory_path() / ("mae3d_bench_data_" + std::to_string(::getpid())) : fs::path(user_dir);
    std::error_code ec;
    if (!own_ && fs::exists(path_, ec) && !fs::is_directory(path_, ec)) {
      throw mae::ConfigError("--work-dir " + mae::printable(user_dir) + ": is a file, not a folder");
    }
    if (own_) fs::remove_all(path_, ec);  // left by an earlier process with the same id
    fs::create_directories(path_, ec);
    if (!fs::is_directory(path_)) {
      throw mae::IoError(mae::printable(path_.string()) + ": cannot create the scratch folder: " + ec.message());
    }
  }
  ~ScratchDir() {
    if (!own_) return;
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  /// The folder.
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  bool own_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Benchmarks the data pipeline (cold and warm reads, loader throughput).", "mae-bench-data"};
  const std::string default_mri = "/usr/share/mricron/templates/ch2.nii.gz";
  std::string work_dir, mri = default_mri;
  int cold_reps = 1, warm_reps = 3, batches = 40, workers = 2;
  mae::CommonFlags common;
  app.add_option("--work-dir", work_dir, "scratch folder (default: a new folder under the temp folder, removed)");
  auto* mri_flag = app.add_option("--mri", mri, "real MRI to read (default " + default_mri + ", skipped when absent)");
  app.add_option("--cold-reps", cold_reps, "cold reads per measurement")->check(mae::int_range(1, 1000));
  app.add_option("--warm-reps", warm_reps, "warm reads per measurement")->check(mae::int_range(1, 100000));
  app.add_option("--batches", batches, "loader batches to time")->check(mae::int_range(1, 100000));
  app.add_option("--workers", workers, "loader threads")->check(mae::int_range(0, 256));
  mae::add_common_flags(app, common);
  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    std::error_code ec;
    const bool use_mri = mri_flag->count() > 0 || fs::exists(mri, ec);
    if (mri_flag->count() > 0) {
      if (!fs::exists(mri, ec)) throw mae::ConfigError("--mri " + mae::printable(mri) + ": no such file or folder");
    } else if (!use_mri) {
      emit({{"bench", "skip"}, {"volume", mri}, {"reason", "not installed (Debian package mricron-data)"}});
    }
    const ScratchDir scratch(work_dir);
    const fs::path& work = scratch.path();

    mae::DataConfig mri_cfg;  // published MRI settings
    mri_cfg.spacing_mm = std::array<double, 3>{1.0, 1.0, 1.0};
    mri_cfg.intensity.mode = "zscore_nonzero";
    mae::DataConfig ct_cfg;  // published CT settings (SelfMedMAE / BTCV)
    ct_cfg.spacing_mm = std::array<double, 3>{1.5, 1.5, 2.0};
    ct_cfg.intensity.mode = "ct_window";
    ct_cfg.foreground_threshold = 0.0;
    ct_cfg.flip_prob = 0.2;
    ct_cfg.workers = workers;

    if (use_mri) {  // a bad --mri fails here, before the minute of synthetic-CT work
      mri_cfg.cache_dir = (work / "check_mri").string();
      mae::VolumeCache(mri_cfg).load({{mri}, ""});
    }
    const std::string ct = (work / "synthetic_ct_512x512x200.nii.gz").string();
    double t0 = now_s();
    write_synthetic_ct(ct, 512, 512, 200);
    emit({{"bench", "setup"}, {"wrote", ct}, {"seconds", now_s() - t0}, {"bytes", fs::file_size(ct)}});

    for (int threads : {1, 2}) {
      if (use_mri) bench_reads("ch2_mri", mri, mri_cfg, work, threads, cold_reps, warm_reps);
      bench_reads("synthetic_ct", ct, ct_cfg, work, threads, cold_reps, warm_reps);
    }
    mae::set_threads(common.threads);
    ct_cfg.cache_dir = (work / "loader_cache").string();
    mae::VolumeCache(ct_cfg).load({{ct}, ""});  // warm it
    bench_loader(ct, ct_cfg, 1024, batches);
    bench_loader(ct, ct_cfg, 0, batches);
    return 0;
  });
}
