// The training loop on a tiny model and synthetic volumes: loss falls, an interrupted run resumed
// gives bit-identical losses, damaged checkpoints are refused, non-finite losses are handled.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "../common/temp_dir.h"
#include "core/error.h"
#include "io/io.h"
#include "probe/probe.h"
#include "run/config.h"
#include "run/trained_model.h"
#include "train/checkpoint.h"
#include "train/memory.h"
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

// A run interrupted at step 13 and resumed logs the same 30 losses, bit for bit, as one unbroken run.
void expect_bit_identical_resume(const std::string& precision) {
  TempDir a, b;
  write_dataset(a);
  write_dataset(b);
  auto tree_a = resume_tree(a), tree_b = resume_tree(b);
  tree_a["train"]["precision"] = precision;
  tree_b["train"]["precision"] = precision;
  const auto full = mae::train(mae::config_from_json(tree_a), {});
  ASSERT_EQ(full.step, 30);

  const auto config_b = mae::config_from_json(tree_b);
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
  for (int64_t s = 1; s <= 30; ++s) EXPECT_EQ(la.at(s), lb.at(s)) << precision << " step " << s;
}

TEST_F(Trainer, InterruptedAndResumedRunHasBitIdenticalLosses) { expect_bit_identical_resume("fp32"); }

// bf16 autocast keeps fp32 weights and optimizer state, so resuming is as exact as in fp32.
TEST_F(Trainer, InterruptedAndResumedBfloat16RunHasBitIdenticalLosses) { expect_bit_identical_resume("bf16"); }

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
  // A missing file is refused when the list is read; without it, every bad volume is counted.
  EXPECT_THROW(mae::check_training_data(mae::config_from_json(tree)), mae::InputError);
  std::ofstream(dir / "list.txt", std::ios::trunc) << "vol0.nii.gz\nempty.nii.gz\nvol1.nii.gz\n";
  EXPECT_EQ(mae::check_training_data(mae::config_from_json(tree)).failures(), 1);
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

namespace {

// Every file and folder under `root` with a digest of its contents ("" when it does not exist).
std::map<std::string, size_t> snapshot(const fs::path& root) {
  std::map<std::string, size_t> out;
  std::error_code ec;
  if (!fs::exists(root, ec)) return out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    const std::string rel = fs::relative(e.path(), root).string();
    if (e.is_directory()) {
      out[rel + "/"] = 0;
    } else {
      std::ifstream in(e.path(), std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(in)), {});
      out[rel] = std::hash<std::string>()(bytes);
    }
  }
  return out;
}

template <typename E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong error type: ") + e.what();
  }
  return "no error";
}

// The message must name every part of `names`.
void expect_names(const std::string& message, const std::vector<std::string>& names) {
  for (const auto& n : names) EXPECT_NE(message.find(n), std::string::npos) << "\"" << n << "\" not in: " << message;
}

nlohmann::json read_json_file(const fs::path& p) { return nlohmann::json::parse(std::ifstream(p)); }
void write_json_file(const fs::path& p, const nlohmann::json& j) { std::ofstream(p, std::ios::trunc) << j.dump(2); }

fs::path step_dir(const std::string& run, int64_t step) {
  return fs::path(run) / "checkpoints" / mae::checkpoint_name(step);
}

TEST_F(Trainer, WeightsOfAnotherArchitectureAreRefusedNamingTheTensorAndBothShapes) {
  TempDir dir;
  write_dataset(dir);
  const auto tree = tiny_tree(dir);
  const auto config = mae::config_from_json(tree);
  // A checkpoint whose config.json says hidden_size 24 but whose model.pt holds 48-wide tensors.
  auto wide_tree = tree;
  wide_tree["model"]["hidden_size"] = 48;
  mae::MaskedAutoencoder wide(mae::model_options_from(mae::config_from_json(wide_tree).model));
  mae::CheckpointInfo info;
  info.step = 4;
  info.config = mae::config_to_json(config);
  const auto ckpt = mae::save_checkpoint(dir / "run", info, *wide, nullptr, {});
  const auto msg = error_of<mae::CheckpointError>([&] { mae::load_trained_model(ckpt); });
  expect_names(msg, {"model.pt", "\"cls_token\"", "[1, 1, 48]", "[1, 1, 24]"});
  // One layer more in the weights than in the config: a tensor the config's model does not have.
  auto deep_tree = tree;
  deep_tree["model"]["num_layers"] = 2;
  mae::MaskedAutoencoder deep(mae::model_options_from(mae::config_from_json(deep_tree).model));
  info.step = 5;
  const auto ckpt2 = mae::save_checkpoint(dir / "run", info, *deep, nullptr, {});
  expect_names(error_of<mae::CheckpointError>([&] { mae::load_trained_model(ckpt2); }),
               {"model.pt", "\"blocks.1.weight\" [24]", "is missing"});
  // Fewer layers: a missing tensor.
  auto shallow_tree = tree;
  shallow_tree["model"]["decoder_num_layers"] = 2;
  info.config = mae::config_to_json(mae::config_from_json(shallow_tree));
  mae::MaskedAutoencoder right(mae::model_options_from(config.model));
  info.step = 6;
  const auto ckpt3 = mae::save_checkpoint(dir / "run", info, *right, nullptr, {});
  expect_names(error_of<mae::CheckpointError>([&] { mae::load_trained_model(ckpt3); }),
               {"model.pt", "\"decoder_blocks.1.norm1.weight\" [12]", "is missing"});
  // A bias the config's model does not have: an unexpected tensor.
  auto bias_tree = tree;
  bias_tree["model"]["qkv_bias"] = true;
  mae::MaskedAutoencoder biased(mae::model_options_from(mae::config_from_json(bias_tree).model));
  info.config = mae::config_to_json(config);
  info.step = 7;
  const auto ckpt4 = mae::save_checkpoint(dir / "run", info, *biased, nullptr, {});
  expect_names(error_of<mae::CheckpointError>([&] { mae::load_trained_model(ckpt4); }),
               {"model.pt", "unexpected tensor \"blocks.0.attn.qkv.bias\" [72]"});
}

TEST_F(Trainer, PartsOfAnotherRunOrStepAreRefusedNamingThePart) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["max_steps"] = 20;
  tree["train"]["keep_last"] = 10;
  mae::train(mae::config_from_json(tree), {});
  auto other = tree;
  other["seed"] = 4;
  other["output"]["dir"] = dir / "other";
  mae::train(mae::config_from_json(other), {});
  const std::string run = dir / "run";
  const fs::path mine = step_dir(run, 10), theirs = step_dir(dir / "other", 10);
  const std::string own_id = mae::read_checkpoint_info(mine.string()).run_id;
  EXPECT_NE(own_id, mae::read_checkpoint_info(theirs.string()).run_id);
  mae::TrainOptions resume;
  resume.resume = true;
  resume.resume_from = mine.string();
  tree["train"]["max_steps"] = 15;
  const auto config = mae::config_from_json(tree);
  auto swap_in = [&](const fs::path& from, const std::string& part, const std::vector<std::string>& names) {
    SCOPED_TRACE(from.string() + " " + part);
    fs::copy_file(mine / part, dir / "backup", fs::copy_options::overwrite_existing);
    fs::copy_file(from / part, mine / part, fs::copy_options::overwrite_existing);
    auto all = names;
    all.push_back(part);
    expect_names(error_of<mae::CheckpointError>([&] { mae::train(config, resume); }), all);
    fs::copy_file(dir / "backup", mine / part, fs::copy_options::overwrite_existing);
  };
  for (const char* part : {"model.pt", "optimizer.pt", "rng.pt", "trainer_state.json"}) {
    swap_in(theirs, part, {own_id});
  }
  swap_in(theirs, "config.json", {"digest"});
  for (const char* part : {"model.pt", "optimizer.pt", "rng.pt", "trainer_state.json"}) {
    swap_in(step_dir(run, 20), part, {"20", "10"});  // another step of the same run
  }
  // meta.json at step 7 beside trainer_state.json at step 10.
  auto meta = read_json_file(mine / "meta.json");
  const auto good_meta = meta;
  meta["step"] = 7;
  write_json_file(mine / "meta.json", meta);
  expect_names(error_of<mae::CheckpointError>([&] { mae::train(config, resume); }), {"trainer_state.json", "7"});
  write_json_file(mine / "meta.json", good_meta);
  // A version 1 checkpoint (before run ids) is refused with a clear message.
  meta = good_meta;
  meta["format_version"] = 1;
  write_json_file(mine / "meta.json", meta);
  expect_names(error_of<mae::CheckpointError>([&] { mae::train(config, resume); }),
               {"meta.json", "format version 1", "older mae3d"});
  write_json_file(mine / "meta.json", good_meta);
  // Nothing was lost along the way: the intact checkpoint resumes.
  EXPECT_TRUE(fs::exists(step_dir(run, 20)));
  EXPECT_EQ(mae::train(config, resume).step, 15);
}

TEST_F(Trainer, NumbersReadFromCheckpointsAreTypeAndRangeChecked) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["max_steps"] = 10;
  mae::train(mae::config_from_json(tree), {});
  const fs::path ckpt = step_dir(dir / "run", 10);
  tree["train"]["max_steps"] = 12;
  const auto config = mae::config_from_json(tree);
  mae::TrainOptions resume;
  resume.resume = true;
  const auto state = read_json_file(ckpt / "trainer_state.json");
  const auto meta = read_json_file(ckpt / "meta.json");
  struct Case {
    const char* file;
    const char* field;
    nlohmann::json value;
  };
  const std::vector<Case> cases = {
      {"trainer_state.json", "loader_epoch", 4611686018427387904LL},
      {"trainer_state.json", "loader_epoch", 9223372036854775806LL},
      {"trainer_state.json", "loader_epoch", INT64_MAX},
      {"trainer_state.json", "loader_epoch", 18446744073709551615ULL},
      {"trainer_state.json", "loader_epoch", 3},  // does not fit step 10
      {"trainer_state.json", "step", -5},
      {"trainer_state.json", "step", 2.5},
      {"trainer_state.json", "step", "10"},
      {"trainer_state.json", "step", true},
      {"trainer_state.json", "loader_batch", 999},
      {"trainer_state.json", "loader_batch", nullptr},
      {"trainer_state.json", "nonfinite_skipped", -1},
      {"trainer_state.json", "smoothed_loss", "low"},
      {"trainer_state.json", "best_val_loss", -1.0},
      {"trainer_state.json", "total_steps", 1e300},
      {"trainer_state.json", "unknown_counter", 1},
      {"meta.json", "step", -5},
      {"meta.json", "step", 10.5},
      {"meta.json", "diverged", "yes"},
      {"meta.json", "val_loss", "x"},
      {"meta.json", "run_id", 12},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.file) + " " + c.field + " = " + c.value.dump());
    auto j = std::string(c.file) == "meta.json" ? meta : state;
    j[c.field] = c.value;
    write_json_file(ckpt / c.file, j);
    expect_names(error_of<mae::CheckpointError>([&] { mae::train(config, resume); }), {c.file, c.field});
    write_json_file(ckpt / c.file, std::string(c.file) == "meta.json" ? meta : state);
  }
  EXPECT_EQ(mae::train(config, resume).step, 12);
}

TEST_F(Trainer, DryRunAndDataCheckChangeNothingOnDisk) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["keep_last"] = 10;
  mae::train(mae::config_from_json(tree), {});  // step_10, 20, 30
  const std::string run = dir / "run";
  const auto before = snapshot(run);
  ASSERT_TRUE(before.count("checkpoints/step_00000030/model.pt"));
  auto changed = tree;
  changed["train"]["lr"] = 1e-3;  // a config.json that would differ if rewritten
  mae::TrainOptions dry;
  dry.dry_run = true;
  dry.resume = true;
  dry.resume_from = step_dir(run, 10).string();
  EXPECT_EQ(mae::train(mae::config_from_json(changed), dry).step, 10);
  EXPECT_EQ(snapshot(run), before);
  dry.resume_from.clear();
  EXPECT_EQ(mae::train(mae::config_from_json(changed), dry).step, 30);
  EXPECT_EQ(snapshot(run), before);
  // Into a folder that does not exist: it is not created, nor is anything else.
  const auto outside = snapshot(dir.path);
  changed["output"]["dir"] = dir / "new/run";
  mae::TrainOptions fresh_dry;
  fresh_dry.dry_run = true;
  mae::train(mae::config_from_json(changed), fresh_dry);
  mae::check_training_data(mae::config_from_json(changed));
  EXPECT_FALSE(fs::exists(dir / "new"));
  EXPECT_EQ(snapshot(dir.path), outside);
}

TEST_F(Trainer, ResumeDeletesAbandonedCheckpointsOnlyAfterItsFirstCheckpoint) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["keep_last"] = 10;
  mae::train(mae::config_from_json(tree), {});  // step_10, 20, 30
  const std::string run = dir / "run";
  tree["train"]["max_steps"] = 25;
  mae::TrainOptions resume;
  resume.resume = true;
  resume.resume_from = step_dir(run, 10).string();
  bool checked_before = false, checked_after = false;
  resume.on_step = [&](int64_t step, double) {
    std::string name;
    std::ifstream(fs::path(run) / "checkpoints" / "latest") >> name;
    EXPECT_TRUE(fs::exists(fs::path(run) / "checkpoints" / name / "meta.json")) << "latest = " << name;
    if (step == 11) {  // nothing written yet: the old continuation is intact
      EXPECT_TRUE(fs::exists(step_dir(run, 30)));
      EXPECT_EQ(name, "step_00000030");
      checked_before = true;
    }
    if (step == 20) {  // the first new checkpoint is written: the abandoned one is gone
      EXPECT_FALSE(fs::exists(step_dir(run, 30)));
      EXPECT_EQ(name, "step_00000020");
      checked_after = true;
    }
  };
  EXPECT_EQ(mae::train(mae::config_from_json(tree), resume).step, 25);
  EXPECT_TRUE(checked_before && checked_after);
  // A stop before the first new step writes nothing and deletes nothing.
  tree["train"]["max_steps"] = 40;
  const auto before = snapshot(fs::path(run) / "checkpoints");
  mae::TrainOptions again;
  again.resume = true;
  again.resume_from = step_dir(run, 10).string();
  again.on_step = [](int64_t, double) {};
  mae::request_stop(SIGINT);
  const auto r = mae::train(mae::config_from_json(tree), again);
  EXPECT_TRUE(r.interrupted && r.before_training);
  EXPECT_EQ(snapshot(fs::path(run) / "checkpoints"), before);
}

TEST_F(Trainer, ResumingAnotherRunsCheckpointIntoThisRunIsRefusedAndDeletesNothing) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["keep_last"] = 10;
  mae::train(mae::config_from_json(tree), {});  // run: step_10, 20, 30
  auto other = tree;
  other["output"]["dir"] = dir / "other";
  other["train"]["max_steps"] = 10;
  mae::train(mae::config_from_json(other), {});
  const std::string run = dir / "run";
  const auto before = snapshot(run);
  mae::TrainOptions foreign;
  foreign.resume = true;
  foreign.resume_from = step_dir(dir / "other", 10).string();
  expect_names(error_of<mae::CheckpointError>([&] { mae::train(mae::config_from_json(tree), foreign); }),
               {"step_00000010", "holds run", mae::run_id_of(run)});
  EXPECT_EQ(snapshot(run), before);
  // Into an empty folder the other run continues there, under its own run id.
  auto moved = other;
  moved["output"]["dir"] = dir / "continued";
  moved["train"]["max_steps"] = 12;
  EXPECT_EQ(mae::train(mae::config_from_json(moved), foreign).step, 12);
  EXPECT_EQ(mae::run_id_of(dir / "continued"), mae::run_id_of(dir / "other"));
  std::string id;
  std::ifstream(fs::path(dir / "continued") / "run_id") >> id;
  EXPECT_EQ(id, mae::run_id_of(dir / "other"));
}

TEST_F(Trainer, RunFolderIsLockedAndPruningSkipsACheckpointAReaderHolds) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  tree["train"]["keep_last"] = 10;
  tree["train"]["val_every"] = 1000;  // validation (and so a "best" checkpoint) only at the end
  fs::create_directories(dir / "run");
  {
    const mae::RunLock held(dir / "run");
    expect_names(error_of<mae::ConfigError>([&] { mae::train(mae::config_from_json(tree), {}); }),
                 {"output.dir", "PID " + std::to_string(::getpid())});
  }
  mae::train(mae::config_from_json(tree), {});  // released: step_10, 20, 30
  const std::string run = dir / "run";
  {
    const auto reading = mae::lock_checkpoint(step_dir(run, 10).string());
    mae::prune_checkpoints(run, 1);
    EXPECT_TRUE(fs::exists(step_dir(run, 10) / "model.pt"));  // held by the reader: kept for now
    EXPECT_FALSE(fs::exists(step_dir(run, 20)));
    EXPECT_TRUE(fs::exists(step_dir(run, 30)));
  }
  mae::prune_checkpoints(run, 1);  // the reader is done: a later prune deletes it
  EXPECT_FALSE(fs::exists(step_dir(run, 10)));
  EXPECT_TRUE(fs::exists(step_dir(run, 30)));
}

TEST_F(Trainer, DivergedCheckpointIsExposedOnTheLoadedModel) {
  TempDir dir;
  write_dataset(dir, /*scale=*/1e20);
  auto tree = tiny_tree(dir);
  tree["data"]["intensity"]["mode"] = "none";
  EXPECT_THROW(mae::train(mae::config_from_json(tree), {}), mae::Error);
  const auto trained =
      mae::load_trained_model((fs::path(dir / "run") / "checkpoints" / "diverged_step_00000000").string());
  EXPECT_TRUE(trained.diverged);
  expect_names(trained.diverged_reason, {"not finite", "step 1"});
  expect_names(mae::diverged_warning(trained), {"diverged_step_00000000", "marked diverged", "not finite"});
}

TEST_F(Trainer, StopRequestedBeforeTrainingStartsWritesNothing) {
  TempDir dir;
  write_dataset(dir);
  auto tree = tiny_tree(dir);
  mae::request_stop(SIGINT);
  const auto r = mae::train(mae::config_from_json(tree), {});
  EXPECT_TRUE(r.interrupted);
  EXPECT_TRUE(r.before_training);
  EXPECT_EQ(r.step, 0);
  EXPECT_EQ(r.checkpoint, "");
  EXPECT_FALSE(fs::exists(dir / "run"));
}

TEST_F(Trainer, MemoryPreflightRefusesImpossibleSizesAndAcceptsTheShippedConfigs) {
  TempDir dir;
  write_dataset(dir);
  // 1024^3 crops of 32^3 patches (32768 tokens: within the config's limits) with a ViT-B and an
  // 8-layer decoder: terabytes of attention matrices, refused in the dry run before any allocation.
  auto tree = tiny_tree(dir);
  for (const auto& [key, value] : std::map<std::string, nlohmann::json>{{"img_size", {1024, 1024, 1024}},
                                                                        {"patch_size", {32, 32, 32}},
                                                                        {"hidden_size", 768},
                                                                        {"mlp_dim", 3072},
                                                                        {"num_layers", 12},
                                                                        {"num_heads", 12},
                                                                        {"decoder_hidden_size", 384},
                                                                        {"decoder_mlp_dim", 1536},
                                                                        {"decoder_num_layers", 8},
                                                                        {"decoder_num_heads", 12}}) {
    tree["model"][key] = value;
  }
  tree["train"]["batch_size"] = 8;
  mae::TrainOptions dry;
  dry.dry_run = true;
  const auto t0 = std::chrono::steady_clock::now();
  expect_names(error_of<mae::ConfigError>([&] { mae::train(mae::config_from_json(tree), dry); }),
               {"model.img_size", "[1024,1024,1024]", "train.batch_size", "GiB", "memory"});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_FALSE(fs::exists(dir / "run"));
  // A smaller one that needs about 11 GiB: refused on a machine of 8 GiB, accepted on 24 GiB.
  tree["model"]["img_size"] = {256, 256, 256};
  tree["model"]["patch_size"] = {16, 16, 16};
  tree["train"]["batch_size"] = 1;
  const auto mid = mae::config_from_json(tree);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double need = mae::estimate_training_memory(mid).total;
  EXPECT_GT(need, 8 * gib);
  EXPECT_LT(need, 24 * gib);
  expect_names(error_of<mae::ConfigError>([&] { mae::check_training_memory(mid, 8 * gib); }),
               {"needs about", "8.0 GiB"});
  EXPECT_NO_THROW(mae::check_training_memory(mid, 24 * gib));
  // The shipped configs fit a 24 GiB machine; ViT-B at 96^3 needs more than 1 GiB.
  for (const char* name : {"demo.json", "ct_96.json", "mri_96.json"}) {
    const auto config = mae::load_config(std::string(MAE3D_SOURCE_DIR) + "/configs/" + name);
    const auto m = mae::estimate_training_memory(config);
    EXPECT_LT(m.total, 24 * gib) << name;
    EXPECT_NO_THROW(mae::check_training_memory(config, 24 * gib)) << name;
  }
  const auto ct =
      mae::estimate_training_memory(mae::load_config(std::string(MAE3D_SOURCE_DIR) + "/configs/ct_96.json"));
  EXPECT_GT(ct.total, 1.0 * gib);
  // The parameter count is exact for the tiny model.
  const auto tiny = mae::config_from_json(tiny_tree(dir));
  mae::MaskedAutoencoder model(mae::model_options_from(tiny.model));
  double n = 0;
  for (const auto& p : model->parameters()) n += static_cast<double>(p.numel());
  EXPECT_DOUBLE_EQ(mae::estimate_training_memory(tiny).parameters, n);
}

// Labels for vol0 of write_dataset: its intensities cut into three classes, on its own grid.
std::string write_labels(const TempDir& dir) {
  auto v = mae::read_volume(dir / "vol0.nii.gz");
  v.data = (v.data > 2.0).to(torch::kFloat) + (v.data > 2.8).to(torch::kFloat);
  mae::write_volume(v, dir / "labels0.nii.gz");
  return dir / "labels0.nii.gz";
}

nlohmann::json probe_tree(const TempDir& dir) {
  auto tree = resume_tree(dir);
  tree["probe"] = {{"train", {{{"image", dir / "vol0.nii.gz"}, {"labels", write_labels(dir)}}}},
                   {"split", "checkerboard"},
                   {"include_background", true},
                   {"every", 5}};
  tree["train"]["best_by"] = "probe";
  tree["train"]["keep_last"] = 1;
  return tree;
}

TEST_F(Trainer, ProbeDuringTrainingRecordsScoresKeepsTheBestAndResumesBitExactly) {
  TempDir a, b;
  write_dataset(a);
  write_dataset(b);
  const auto full = mae::train(mae::config_from_json(probe_tree(a)), {});
  ASSERT_EQ(full.step, 30);
  // Every 5 steps: the pretrained score, and the same baselines each time.
  std::map<int64_t, nlohmann::json> probes;
  std::ifstream in(fs::path(a / "run") / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec.contains("probe_r2")) probes[rec["step"].get<int64_t>()] = rec;
  }
  ASSERT_EQ(probes.size(), 6u);
  for (const auto& [step, rec] : probes) {
    EXPECT_EQ(step % 5, 0);
    EXPECT_LE(rec["probe_r2"].get<double>(), 1.0);
    EXPECT_EQ(rec["probe_random_r2"], probes.begin()->second["probe_random_r2"]);
    EXPECT_EQ(rec["probe_raw_r2"], probes.begin()->second["probe_raw_r2"]);
  }
  // The random-init baseline is the probe of this run's own initial weights: mae-probe on a
  // checkpoint sees the same number.
  const auto ckpt = mae::resolve_checkpoint(a / "run");
  mae::ProbeOptions o;
  o.split = mae::ProbeSplit::checkerboard;
  o.include_background = true;
  o.seed = 3;
  const auto report = mae::probe_checkpoint(ckpt, {{a / "vol0.nii.gz", a / "labels0.nii.gz"}}, {}, o);
  EXPECT_DOUBLE_EQ(report.scores[1].r2, probes.begin()->second["probe_random_r2"].get<double>());
  EXPECT_DOUBLE_EQ(report.scores[0].r2, probes.at(30)["probe_r2"].get<double>());
  // keep_last 1: the latest checkpoint and the one with the best probe score remain.
  int64_t best_step = 10;
  for (int64_t s : {10, 20, 30}) {
    if (probes.at(s)["probe_r2"].get<double>() > probes.at(best_step)["probe_r2"].get<double>()) best_step = s;
  }
  std::set<std::string> kept;
  for (const auto& e : fs::directory_iterator(fs::path(a / "run") / "checkpoints")) {
    if (e.is_directory()) kept.insert(e.path().filename().string());
  }
  std::set<std::string> expected{mae::checkpoint_name(30), mae::checkpoint_name(best_step)};
  EXPECT_EQ(kept, expected);
  EXPECT_DOUBLE_EQ(*mae::read_checkpoint_info(ckpt).probe_score, probes.at(30)["probe_r2"].get<double>());

  // Interrupted at 13 and resumed: the same losses and probe scores as the uninterrupted run.
  const auto config_b = mae::config_from_json(probe_tree(b));
  mae::TrainOptions stop_at_13;
  stop_at_13.on_step = [](int64_t step, double) {
    if (step == 13) mae::request_stop(SIGINT);
  };
  EXPECT_TRUE(mae::train(config_b, stop_at_13).interrupted);
  mae::clear_stop_request();
  mae::TrainOptions resume;
  resume.resume = true;
  EXPECT_EQ(mae::train(config_b, resume).step, 30);
  const auto la = losses(a / "run"), lb = losses(b / "run");
  for (int64_t s = 1; s <= 30; ++s) EXPECT_EQ(la.at(s), lb.at(s)) << "step " << s;
  std::ifstream inb(fs::path(b / "run") / "metrics.jsonl");
  for (std::string line; std::getline(inb, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec.contains("probe_r2")) {
      EXPECT_EQ(rec["probe_r2"], probes.at(rec["step"].get<int64_t>())["probe_r2"]);
    }
  }
}

TEST_F(Trainer, ProbeSectionIsReadStrictly) {
  TempDir dir;
  write_dataset(dir);
  auto error_of_tree = [](const nlohmann::json& tree) {
    try {
      mae::config_from_json(tree);
    } catch (const mae::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  auto tree = probe_tree(dir);
  EXPECT_NO_THROW(mae::config_from_json(tree));
  auto t = tree;
  t["probe"]["train"][0]["label"] = "x";
  EXPECT_NE(error_of_tree(t).find("probe.train[0].label"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["probe"]["train"][0].erase("labels");
  EXPECT_NE(error_of_tree(t).find("probe.train[0]"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["probe"]["split"] = "none";
  EXPECT_NE(error_of_tree(t).find("probe.test"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["probe"]["target"] = "dice";
  EXPECT_NE(error_of_tree(t).find("probe.target"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["probe"]["every"] = 0;
  EXPECT_NE(error_of_tree(t).find("train.best_by"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["probe"]["every"] = 3;  // does not divide checkpoint_every 10
  EXPECT_NE(error_of_tree(t).find("must divide"), std::string::npos) << error_of_tree(t);
  t = tree;
  t["train"]["best_by"] = "loss";
  EXPECT_NE(error_of_tree(t).find("train.best_by"), std::string::npos) << error_of_tree(t);
  // A label file that is not in the image's space stops the run before any step, naming it.
  auto shifted = mae::read_volume(dir / "labels0.nii.gz");
  shifted.origin[0] += 50.0;
  mae::write_volume(shifted, dir / "shifted.nii.gz");
  t = tree;
  t["probe"]["train"][0]["labels"] = dir / "shifted.nii.gz";
  try {
    mae::train(mae::config_from_json(t), {});
    ADD_FAILURE() << "expected an InputError";
  } catch (const mae::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("shifted.nii.gz"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(fs::path(dir / "run") / "checkpoints" / "latest"));
}

}  // namespace
