// mae-export: hands a pretrained encoder to segmentation code. Either writes the weights under
// MONAI's ViT / UNETR / MaskedAutoEncoderViT names (FILE.pt + FILE.json), or encodes a whole volume
// with the encoder (--features), both in MONAI's (C, i, j, k) axis order unless --axis-order native.
// Thin: parse the command line, call one library function.
#include <chrono>
#include <iostream>

#include "cli.h"
#include "core/error.h"
#include "export/features.h"
#include "export/monai_export.h"
#include "infer/windows.h"

int main(int argc, char** argv) {
  CLI::App app{
      "mae-export: export a pretrained mae3d encoder for MONAI (ViT, UNETR, MaskedAutoEncoderViT), "
      "or encode a volume with it"};
  app.name("mae-export");
  std::string checkpoint, out, format, features, axis_order = "monai", cross_attention_keys = "true";
  bool allow_diverged = false;
  double overlap = 0.25;
  mae::CommonFlags common;
  app.add_option("--checkpoint", checkpoint, "checkpoint folder, or a run folder (its latest checkpoint)")->required();
  app.add_option("--out", out, "file to write (FILE.pt; the description goes to FILE.json)")->required();
  auto* format_opt =
      app.add_option("--format", format, "monai-vit | monai-unetr | monai-mae: the MONAI network to load into");
  auto* cross_opt = app.add_option("--cross-attention-keys", cross_attention_keys,
                                   "true|norm|false: the unused cross-attention keys of MONAI 1.4 - 1.5 "
                                   "(true, the default), MONAI >= 1.6 (norm) or none (false, MONAI 1.3)");
  app.add_option("--axis-order", axis_order,
                 "monai|native: weights and features for MONAI's (C, i, j, k) arrays (default monai), or in "
                 "mae3d's (C, D, H, W) order as trained");
  auto* features_opt =
      app.add_option("--features", features, "encode this volume (file or DICOM folder) instead of exporting weights");
  auto* overlap_opt =
      app.add_option("--overlap", overlap, "with --features: least overlap of neighbouring windows, 0 .. 0.75")
          ->check(mae::real_range(0.0, mae::kMaxOverlap));
  app.add_flag("--allow-diverged", allow_diverged,
               "export a checkpoint marked diverged (its loss became non-finite) instead of refusing it");
  features_opt->excludes(format_opt)->excludes(cross_opt);
  overlap_opt->needs(features_opt);
  mae::add_common_flags(app, common);

  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    const auto start = std::chrono::steady_clock::now();
    auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    const mae::AxisOrder order = mae::parse_axis_order(axis_order);
    if (!features.empty() || features_opt->count() > 0) {
      const auto r = mae::export_features(checkpoint, features, out, overlap, order, allow_diverged);
      std::cout << "wrote " << r.pt_path << " (" << r.num_windows << " windows) and " << r.json_path << " in "
                << seconds() << " s" << std::endl;
      return 0;
    }
    if (format_opt->count() == 0) {
      throw mae::ConfigError("give --format monai-vit|monai-unetr|monai-mae, or --features VOLUME");
    }
    mae::ExportOptions options;
    options.format = mae::parse_export_format(format);
    options.set_cross_attention(mae::parse_cross_attention_keys(cross_attention_keys));
    options.axis_order = order;
    options.allow_diverged = allow_diverged;
    const auto r = mae::export_checkpoint(checkpoint, out, options);
    std::cout << "wrote " << r.pt_path << " (" << r.num_tensors << " tensors, " << r.num_values << " values) and "
              << r.json_path << " in " << seconds() << " s" << std::endl;
    return 0;
  });
}
