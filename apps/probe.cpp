// mae-probe: how much a pretrained encoder's patch tokens say about anatomy, against a random-init
// encoder of the same architecture and raw intensity features, in seconds. One line to the terminal,
// the full table as JSON (--out). Thin: parse the command line, call the library.
#include <filesystem>
#include <iostream>

#include "cli.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "probe/probe.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{
      "mae-probe: fit a linear probe from a pretrained encoder's patch tokens to label volumes and compare it "
      "with a random-init encoder and raw intensity features"};
  app.name("mae-probe");
  std::string checkpoint, out, target = "fractions", split = "none";
  std::vector<std::string> train, test;
  mae::ProbeOptions options;
  int64_t seed = 0;
  mae::CommonFlags common;
  app.add_option("--checkpoint", checkpoint, "checkpoint folder, or a run folder (its latest checkpoint)")->required();
  app.add_option("--train", train, "IMAGE=LABELS: a volume and its integer label volume to fit the probe on")
      ->required();
  app.add_option("--test", test, "IMAGE=LABELS: a volume and its label volume to score the probe on");
  app.add_option("--out", out, "write the full report here as JSON");
  app.add_option("--target", target,
                 "fractions (default): each label's share of the patch, ridge regression, R²; majority: the patch's "
                 "majority label, logistic regression, accuracy");
  app.add_option("--split", split,
                 "none (default): --train fits, --test scores; checkerboard: 2x2x2-patch blocks of the --train "
                 "volumes alternate between fit and score");
  app.add_flag("--include-background", options.include_background,
               "keep patches whose voxels are all background (label 0); left out by default");
  app.add_option("--folds", options.folds, "cross-validation folds choosing the L2 strength, 2 .. 10 (default 3)")
      ->check(mae::int_range(2, 10));
  app.add_option("--seed", seed, "assigns patch blocks to cross-validation folds (default 0)")
      ->check(mae::int_range(0, INT64_MAX));
  app.add_option("--batch", options.batch, "windows per encoder call (default 4)")->check(mae::int_range(1, 1024));
  mae::add_common_flags(app, common);

  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    options.target = mae::parse_probe_target(target, "--target");
    if (split == "none") {
      options.split = mae::ProbeSplit::none;
    } else if (split == "checkerboard") {
      options.split = mae::ProbeSplit::checkerboard;
    } else {
      throw mae::ConfigError("--split \"" + split + "\": expected \"none\" or \"checkerboard\"");
    }
    options.seed = static_cast<uint64_t>(seed);
    if (!out.empty()) {
      const auto parent = fs::absolute(out).parent_path();
      std::error_code ec;
      if (fs::is_directory(out, ec)) throw mae::ConfigError("--out " + out + " is a folder; give a file name");
      if (!fs::is_directory(parent, ec)) throw mae::ConfigError("--out " + out + ": no folder " + parent.string());
    }
    std::vector<mae::ProbePair> train_pairs, test_pairs;
    for (const auto& t : train) train_pairs.push_back(mae::parse_probe_pair(t, "--train"));
    for (const auto& t : test) test_pairs.push_back(mae::parse_probe_pair(t, "--test"));
    const auto report = mae::probe_checkpoint(checkpoint, train_pairs, test_pairs, options);
    std::cout << mae::probe_summary(report) << " (" << report.seconds_features + report.seconds_fit << " s)"
              << std::endl;
    if (!out.empty()) {
      auto j = mae::probe_report_json(report);
      j["checkpoint"] = fs::absolute(checkpoint).lexically_normal().string();
      for (const auto* side : {&train_pairs, &test_pairs}) {
        auto& list = j[side == &train_pairs ? "train" : "test"] = nlohmann::json::array();
        for (const auto& p : *side) list.push_back({{"image", p.image}, {"labels", p.labels}});
      }
      mae::write_file_atomically(out, j.dump(2) + "\n");
      std::cout << "wrote " << out << std::endl;
    }
    return 0;
  });
}
