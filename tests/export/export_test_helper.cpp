// Test helper for test_export.py: writes the inputs the Python test needs without a training run.
//   export_test_helper checkpoint RUN_DIR CONFIG.json [key=value ...]
//       a checkpoint (step 3) of a model freshly initialised from the config (seeded with its seed)
//   export_test_helper volume OUT.nii.gz D H W [SEED]
//       a float32 volume of smooth random values (identity geometry, 1 mm)
//   export_test_helper predict CHECKPOINT OUT.pt [SEED]
//       the checkpoint's model (as mae-export loads it) on a batch of 2 random windows with masks drawn by
//       the model itself from SEED, one intra-op thread: {"x" (B, C, D, H, W), "visible" (B, K) int64 in
//       draw order, "mask" (B, N), "pred" (B, N, prod(patch)·C)}, all in mae3d's own axis order
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <vector>

#include "core/error.h"
#include "export/tensor_file.h"
#include "io/io.h"
#include "run/config.h"
#include "run/trained_model.h"
#include "train/checkpoint.h"

int main(int argc, char** argv) {
  try {
    const std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() >= 3 && args[0] == "checkpoint") {
      const std::vector<std::string> overrides(args.begin() + 3, args.end());
      const mae::Config config = mae::load_config(args[2], overrides);
      torch::manual_seed(config.seed);
      auto model = mae::MaskedAutoencoder(mae::model_options_from(config.model));
      mae::CheckpointInfo info;
      info.step = 3;
      info.config = mae::config_to_json(config);
      std::cout << mae::save_checkpoint(args[1], info, *model, nullptr, {}) << std::endl;
      return 0;
    }
    if (args.size() >= 5 && args[0] == "volume") {
      const uint64_t seed = args.size() > 5 ? std::stoull(args[5]) : 1;
      at::Generator gen = at::detail::createCPUGenerator(seed);
      const int64_t d = std::stoll(args[2]), h = std::stoll(args[3]), w = std::stoll(args[4]);
      // Smooth values: coarse noise upsampled, plus an offset so that no voxel is zero.
      auto coarse = at::rand({1, 1, d / 4 + 2, h / 4 + 2, w / 4 + 2}, gen, at::kFloat);
      auto fine = at::upsample_trilinear3d(coarse, {d, h, w}, /*align_corners=*/false);
      mae::Volume v;
      v.data = (fine[0] * 100.0 + 10.0).contiguous();
      mae::write_volume(v, args[1]);
      return 0;
    }
    if (args.size() >= 3 && args[0] == "predict") {
      const uint64_t seed = args.size() > 3 ? std::stoull(args[3]) : 1;
      at::set_num_threads(1);
      mae::TrainedModel trained = mae::load_trained_model(args[1]);
      const auto& o = trained.model->options();
      at::Generator gen = at::detail::createCPUGenerator(seed);
      std::vector<int64_t> shape{2, o.in_channels()};
      for (int64_t s : o.img_size()) shape.push_back(s);
      const auto x = at::randn(shape, gen, at::kFloat);
      torch::NoGradGuard no_grad;
      const auto out = trained.model->forward(x, std::nullopt, gen);
      mae::save_tensor_dict({{"x", x}, {"visible", out.visible}, {"mask", out.mask}, {"pred", out.pred}}, args[2]);
      return 0;
    }
    std::cerr << "usage: export_test_helper checkpoint RUN_DIR CONFIG.json [key=value ...]\n"
                 "       export_test_helper volume OUT.nii.gz D H W [SEED]\n"
                 "       export_test_helper predict CHECKPOINT OUT.pt [SEED]\n";
    return 2;
  } catch (const mae::Error& e) {
    std::cerr << "export_test_helper: " << e.what() << std::endl;
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "export_test_helper: " << e.what() << std::endl;
    return 1;
  }
}
