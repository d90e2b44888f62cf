// mae-check-data: the pre-flight data check. Reads every volume of the dataset once through the
// preprocessing cache (filling it for training), prints one line per volume, a summary counting
// refusals by cause ("checked 12 volumes: 9 ok, 3 refused (2 truncated data, 1 constant volume)")
// and every failure at the end. Exit status 0 when all volumes are usable, 2 when any was refused
// or on bad usage, config or dataset list (e.g. a volume listed twice).
#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>

#include "cli.h"
#include "core/error.h"
#include "core/json_reader.h"
#include "data/cache.h"
#include "data/check.h"
#include "data/config.h"
#include "data/dataset.h"

namespace {

mae::DataConfig load_config(const std::string& path) {
  const nlohmann::json j = mae::read_json_file<mae::ConfigError>(path);
  mae::JsonReader root(j, "");
  mae::JsonReader data = root.child("data");  // other sections belong to other programs
  return mae::read_data_config(data);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Reads every volume of a dataset once (through the cache) and reports all problems.", "mae-check-data"};
  std::string config_path, dataset, cache_dir;
  bool no_cache = false;
  int check_threads = 0;
  mae::CommonFlags common;
  app.add_option("--config", config_path, "run config (JSON); its \"data\" section is used");
  app.add_option("--dataset", dataset, "dataset.json, list file or folder (overrides data.dataset)");
  app.add_option("--cache-dir", cache_dir,
                 "cache folder (overrides data.cache_dir; default " + mae::default_cache_dir() + ")");
  app.add_flag("--no-cache", no_cache, "read without the disk cache");
  app.add_option("--check-threads", check_threads, "volumes checked at once (0 = data.workers)")
      ->check(mae::int_range(0, mae::kMaxThreads));
  mae::add_common_flags(app, common);
  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    if (config_path.empty() && dataset.empty()) throw mae::ConfigError("give --config run.json or --dataset PATH");
    mae::DataConfig config;
    if (!config_path.empty()) config = load_config(config_path);
    if (!dataset.empty()) config.dataset = dataset;
    if (!cache_dir.empty()) config.cache_dir = cache_dir;
    if (config.cache_dir.empty()) config.cache_dir = mae::default_cache_dir();
    if (no_cache) config.cache_dir.clear();
    mae::validate_data_config(config);

    const mae::DatasetSplit split = mae::read_dataset(config.dataset, /*require_files=*/false);
    std::vector<mae::DatasetEntry> all = split.training;
    all.insert(all.end(), split.validation.begin(), split.validation.end());
    std::cout << "checking " << all.size() << (all.size() == 1 ? " volume of " : " volumes of ")
              << mae::printable(config.dataset) << " (cache "
              << (config.cache_dir.empty() ? std::string("off") : mae::printable(config.cache_dir)) << ")" << std::endl;
    const mae::CheckReport report = mae::check_data(all, config, check_threads);
    std::cout << report.text() << std::flush;
    if (report.failures() > 0) return 2;
    return 0;
  });
}
