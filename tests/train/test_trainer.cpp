// The training loop on a tiny model and synthetic volumes: loss falls, an interrupted run resumed
// gives bit-identical losses, damaged checkpoints are refused, non-finite losses are handled.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>

#include "../common/temp_dir.h"
#include "core/error.h"
#include "io/io.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace {

// A temporary folder for this suite's tests.
struct TempDir : mae::test::TempDir {
  TempDir() : mae::test::TempDir("mae3d_train") {}
};

// Three smooth synthetic volumes (oblique direction, anisotropic spacing) and a list file.
void write_dataset(const TempDir& dir, double scale = 1.0) {
  std::ofstream list(dir / "list.txt");
  for (int i = 0; i < 3; ++i) {
    auto g = torch::linspace(0, 3.0 + i, 20);
    auto x =
        (torch::sin(g).view({20, 1, 1}) + torch::cos(2 * g).view({1, 20, 1}) * torch::sin(g).view({1, 1, 20}) + 2.0)
            .unsqueeze(0) *
        scale;
    mae::Volume v;
    v.data = x.contiguous();
    v.spacing = {1.0, 1.2, 1.5};
    v.origin = {10.0, -5.0, 3.0};
    v.direction = {0, 1, 0, 1, 0, 0, 0, 0, 1};
    const std::string name = "vol" + std::to_string(i) + ".nii.gz";
    mae::write_volume(v, dir / name);
    list << name << "\n";
  }
}

nlohmann::json tiny_tree(const TempDir& dir) {
  return {{"seed", 3},
          {"device", "cpu"},
          {"threads", 1},
          {"data",
           {{"dataset", dir / "list.txt"},
            {"cache_dir", dir / "cache"},
            {"workers", 1},
            {"val_fraction", 0.34},
            {"intensity", {{"mode", "zscore_nonzero"}}},
            {"num_samples", 2},
            {"flip_prob", 0.5}}},
          {"model",
           {{"img_size", {16, 16, 16}},
            {"patch_size", {4, 4, 4}},
            {"hidden_size", 24},
            {"mlp_dim", 48},
            {"num_layers", 1},
            {"num_heads", 2},
            {"decoder_hidden_size", 12},
            {"decoder_mlp_dim", 24},
            {"decoder_num_layers", 1},
            {"decoder_num_heads", 2}}},
          {"train",
           {{"batch_size", 2},
            {"max_steps", 30},
            {"lr", 2e-3},
            {"lr_warmup_steps", 5},
            {"log_every", 1},
            {"checkpoint_every", 10},
            {"keep_last", 2},
            {"val_every", 10}}},
          {"output", {{"dir", dir / "run"}}}};
}

// metrics.jsonl as step -> raw "loss" text and val_loss.
std::map<int64_t, std::string> losses(const std::string& run) {
  std::map<int64_t, std::string> out;
  std::ifstream in(fs::path(run) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto rec = nlohmann::json::parse(line);
    out[rec["step"].get<int64_t>()] = rec["loss"].dump() + "|" + rec["val_loss"].dump();
  }
  return out;
}

class Trainer : public ::testing::Test {
 protected:
  void SetUp() override { mae::clear_stop_request(); }
  void TearDown() override { mae::clear_stop_request(); }
};

TEST_F(Trainer, LossFallsAndOutputsAreWritten) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["max_steps"] = 150;
  tree["train"]["checkpoint_every"] = 75;
  tree["train"]["lr"] = 3e-3;
  tree["data"]["flip_prob"] = 0.0;
  const auto result = mae::train(mae::config_from_json(tree), {});
  EXPECT_EQ(result.step, 150);
  EXPECT_FALSE(result.interrupted);
  const auto l = losses(dir / "run");
  ASSERT_EQ(l.size(), 150u);
  auto loss_at = [&](int64_t s) { return nlohmann::json::parse(l.at(s).substr(0, l.at(s).find('|'))).get<double>(); };
  double first = 0, last = 0;
  for (int s = 1; s <= 10; ++s) first += loss_at(s);
  for (int s = 141; s <= 150; ++s) last += loss_at(s);
  EXPECT_LT(last, 0.7 * first) << "first ten " << first / 10 << ", last ten " << last / 10;
  for (const char* f : {"config.json", "train.log", "metrics.jsonl", "checkpoints/latest"}) {
    EXPECT_TRUE(fs::exists(fs::path(dir / "run") / f)) << f;
  }
  const auto ckpt = mae::resolve_checkpoint(dir / "run");
  EXPECT_EQ(fs::path(ckpt).filename(), "step_00000150");
  for (const char* f : {"model.pt", "optimizer.pt", "rng.pt", "trainer_state.json", "config.json", "meta.json"}) {
    EXPECT_TRUE(fs::exists(fs::path(ckpt) / f)) << f;
  }
  const auto info = mae::read_checkpoint_info(ckpt);
  EXPECT_EQ(info.step, 150);
  EXPECT_TRUE(info.val_loss.has_value());
  // A second fresh start into the same folder is refused rather than overwriting the run.
  EXPECT_THROW(mae::train(mae::config_from_json(tree), {}), mae::ConfigError);
}

// Dropout (global generator) and gradient accumulation, so every random stream and the loader
// position must be restored exactly.
nlohmann::json resume_tree(const TempDir& dir) {
  auto tree = tiny_tree(dir);
  tree["model"]["dropout_rate"] = 0.1;
  tree["train"]["grad_accum_steps"] = 2;
  tree["train"]["keep_last"] = 10;
  return tree;
}

TEST_F(Trainer, InterruptedAndResumedRunHasBitIdenticalLosses) {
  TempDir a, b;
  write_dataset(a);
  write_dataset(b);
  const auto full = mae::train(mae::config_from_json(resume_tree(a)), {});
  ASSERT_EQ(full.step, 30);

  const auto config_b = mae::config_from_json(resume_tree(b));
  mae::TrainOptions stop_at_13;
  stop_at_13.on_step = [](int64_t step, double) {
    if (step == 13) mae::request_stop(SIGINT);
  };
  const auto part = mae::train(config_b, stop_at_13);
  EXPECT_TRUE(part.interrupted);
  EXPECT_EQ(part.step, 13);
  EXPECT_EQ(part.signal, SIGINT);
  EXPECT_EQ(fs::path(part.checkpoint).filename(), "step_00000013");
  EXPECT_EQ(mae::resolve_checkpoint(b / "run"), part.checkpoint);
  mae::clear_stop_request();

  mae::TrainOptions resume;
  resume.resume = true;
  const auto rest = mae::train(config_b, resume);
  EXPECT_EQ(rest.step, 30);
  const auto la = losses(a / "run"), lb = losses(b / "run");
  ASSERT_EQ(la.size(), 30u);
  ASSERT_EQ(lb.size(), 30u);
  for (int64_t s = 1; s <= 30; ++s) EXPECT_EQ(la.at(s), lb.at(s)) << "step " << s;
}

TEST_F(Trainer, StopOnACheckpointStepKeepsThatCheckpointAndResumesExactly) {
  TempDir a, b;
  write_dataset(a);
  write_dataset(b);
  mae::train(mae::config_from_json(resume_tree(a)), {});
  const auto config_b = mae::config_from_json(resume_tree(b));
  mae::TrainOptions stop_at_10;  // 10 is also a checkpoint step: the stop must not rewrite it
  stop_at_10.on_step = [](int64_t step, double) {
    if (step == 10) mae::request_stop(SIGTERM);
  };
  const auto part = mae::train(config_b, stop_at_10);
  EXPECT_TRUE(part.interrupted);
  EXPECT_EQ(fs::path(part.checkpoint).filename(), "step_00000010");
  mae::clear_stop_request();
  mae::TrainOptions resume;
  resume.resume = true;
  EXPECT_EQ(mae::train(config_b, resume).step, 30);
  EXPECT_EQ(losses(a / "run"), losses(b / "run"));

  // Resuming from step 10 again abandons the later checkpoints, and order-deciding keys must match.
  mae::TrainOptions from_10 = resume;
  from_10.resume_from = (fs::path(b / "run") / "checkpoints" / "step_00000010").string();
  auto changed = resume_tree(b);
  changed["train"]["batch_size"] = 3;
  try {
    mae::train(mae::config_from_json(changed), from_10);
    ADD_FAILURE() << "no error";
  } catch (const mae::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("\"train.batch_size\" was 2"), std::string::npos) << e.what();
  }
  auto shorter = resume_tree(b);
  shorter["train"]["max_steps"] = 12;
  EXPECT_EQ(mae::train(mae::config_from_json(shorter), from_10).step, 12);
  EXPECT_FALSE(fs::exists(fs::path(b / "run") / "checkpoints" / "step_00000030"));
  EXPECT_EQ(fs::path(mae::resolve_checkpoint(b / "run")).filename(), "step_00000012");
}

TEST_F(Trainer, DamagedOrForeignCheckpointsAreRefusedNamingTheFile) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["max_steps"] = 10;
  mae::train(mae::config_from_json(tree), {});
  const auto ckpt = mae::resolve_checkpoint(dir / "run");
  mae::TrainOptions resume;
  resume.resume = true;
  tree["train"]["max_steps"] = 20;
  const auto config = mae::config_from_json(tree);

  // Truncated weights.
  const auto model_pt = (fs::path(ckpt) / "model.pt").string();
  const auto size = fs::file_size(model_pt);
  fs::copy_file(model_pt, dir / "model.bak");
  fs::resize_file(model_pt, size / 2);
  try {
    mae::train(config, resume);
    ADD_FAILURE() << "no error";
  } catch (const mae::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("model.pt"), std::string::npos) << e.what();
  }
  fs::remove(model_pt);
  fs::copy_file(dir / "model.bak", model_pt);

  // Another format version.
  const auto meta_path = (fs::path(ckpt) / "meta.json").string();
  auto meta = nlohmann::json::parse(std::ifstream(meta_path));
  meta["format_version"] = 99;
  std::ofstream(meta_path) << meta.dump();
  try {
    mae::train(config, resume);
    ADD_FAILURE() << "no error";
  } catch (const mae::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("meta.json: checkpoint format version 99"), std::string::npos) << e.what();
  }
  meta["format_version"] = mae::kCheckpointFormatVersion;
  std::ofstream(meta_path) << meta.dump();

  // Another model.
  auto other = tree;
  other["model"]["hidden_size"] = 48;
  EXPECT_THROW(mae::train(mae::config_from_json(other), resume), mae::CheckpointError);

  // Not a checkpoint at all.
  mae::TrainOptions from_elsewhere = resume;
  from_elsewhere.resume_from = dir / "cache";
  EXPECT_THROW(mae::train(config, from_elsewhere), mae::CheckpointError);

  // Intact again: the resume works.
  EXPECT_EQ(mae::train(config, resume).step, 20);
}

TEST_F(Trainer, TemporaryFolderOfACrashedWriteIsIgnoredOnResume) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["max_steps"] = 10;
  mae::train(mae::config_from_json(tree), {});
  // A crash while writing step 15: the folder exists, half written, under its temporary name.
  const fs::path tmp = fs::path(dir / "run") / "checkpoints" / ".tmp-step_00000015-999";
  fs::create_directories(tmp);
  std::ofstream(tmp / "model.pt") << "half";
  std::ofstream(tmp / "meta.json") << "{";
  fs::remove(fs::path(dir / "run") / "checkpoints" / "latest");  // even without the pointer
  EXPECT_EQ(fs::path(mae::resolve_checkpoint(dir / "run")).filename(), "step_00000010");
  tree["train"]["max_steps"] = 15;
  mae::TrainOptions resume;
  resume.resume = true;
  EXPECT_EQ(mae::train(mae::config_from_json(tree), resume).step, 15);
  EXPECT_FALSE(fs::exists(tmp));  // cleaned up
}

TEST_F(Trainer, NonFiniteLossStopsWithADivergedCheckpointOrIsSkipped) {
  TempDir dir;
  write_dataset(dir, /*scale=*/1e20);  // finite voxels whose squared error overflows float32
  auto tree = tiny_tree(dir);
  tree["data"]["intensity"]["mode"] = "none";
  try {
    mae::train(mae::config_from_json(tree), {});
    ADD_FAILURE() << "no error";
  } catch (const mae::Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 1: the loss is not finite"), std::string::npos) << e.what();
  }
  // The diverged checkpoint has its own name and is not what a resume would pick up.
  const auto diverged = fs::path(dir / "run") / "checkpoints" / "diverged_step_00000000";
  EXPECT_TRUE(mae::read_checkpoint_info(diverged.string()).diverged);
  EXPECT_THROW(mae::resolve_checkpoint(dir / "run"), mae::CheckpointError);

  tree["output"]["dir"] = dir / "run_skip";
  tree["train"]["on_nonfinite"] = "skip";
  tree["train"]["max_nonfinite"] = 3;
  try {
    mae::train(mae::config_from_json(tree), {});
    ADD_FAILURE() << "no error";
  } catch (const mae::Error& e) {
    EXPECT_NE(std::string(e.what()).find("4 batches had a non-finite loss"), std::string::npos) << e.what();
  }
}

TEST_F(Trainer, BadOutputFolderAndChannelMismatchAreClearErrors) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  std::ofstream(dir / "a_file") << "x";
  tree["output"]["dir"] = dir / "a_file/run";
  try {
    mae::train(mae::config_from_json(tree), {});
    ADD_FAILURE() << "no error";
  } catch (const mae::IoError& e) {
    EXPECT_NE(std::string(e.what()).find("a_file/run"), std::string::npos) << e.what();
  }
  tree = tiny_tree(dir);
  tree["model"]["in_channels"] = 2;
  try {
    mae::train(mae::config_from_json(tree), {});
    ADD_FAILURE() << "no error";
  } catch (const mae::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("model.in_channels is 2"), std::string::npos) << e.what();
  }
}

TEST_F(Trainer, CheckDataReportsEveryFailure) {
  TempDir dir;
  write_dataset(dir);
  std::ofstream(dir / "list.txt", std::ios::app) << "missing.nii.gz\nvol0.nii.gz\n";
  std::ofstream(dir / "empty.nii.gz");
  std::ofstream(dir / "list.txt", std::ios::app) << "empty.nii.gz\n";
  auto tree = tiny_tree(dir);
  mae::TrainOptions check;
  check.check_data_only = true;
  // A missing file is refused when the list is read; without it, every bad volume is counted.
  EXPECT_THROW(mae::train(mae::config_from_json(tree), check), mae::InputError);
  std::ofstream(dir / "list.txt", std::ios::trunc) << "vol0.nii.gz\nempty.nii.gz\nvol1.nii.gz\n";
  EXPECT_EQ(mae::train(mae::config_from_json(tree), check).data_failures, 1);
  // Training refuses the data up front; with "skip" it trains on the rest.
  EXPECT_THROW(mae::train(mae::config_from_json(tree), {}), mae::InputError);
  tree["data"]["on_bad_volume"] = "skip";
  tree["data"]["val_fraction"] = 0.0;
  tree["train"]["max_steps"] = 3;
  EXPECT_EQ(mae::train(mae::config_from_json(tree), {}).step, 3);
}

}  // namespace

namespace {

TEST_F(Trainer, Bfloat16AutocastTrainsWithFiniteLosses) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["precision"] = "bf16";
  tree["train"]["max_steps"] = 5;
  EXPECT_EQ(mae::train(mae::config_from_json(tree), {}).step, 5);
  for (const auto& [step, text] : losses(dir / "run")) {
    const double loss = nlohmann::json::parse(text.substr(0, text.find('|'))).get<double>();
    EXPECT_TRUE(std::isfinite(loss)) << step;
    EXPECT_GT(loss, 0.0);
  }
}

}  // namespace
