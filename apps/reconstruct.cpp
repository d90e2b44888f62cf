// mae-reconstruct: shows what a trained masked autoencoder learned. Thin: parse the command line,
// call mae::run_reconstruction, print where the outputs went and the headline metrics.
#include "infer/reconstruct.h"

#include <cstdio>
#include <iostream>

#include "cli.h"

int main(int argc, char** argv) {
  CLI::App app{
      "mae-reconstruct: mask and reconstruct a whole volume with a trained checkpoint; writes NIfTI "
      "volumes, montage.png and metrics.json"};
  app.name("mae-reconstruct");
  mae::ReconstructRequest req;
  std::vector<std::string> slice_texts;
  double ratio = -1.0;
  mae::CommonFlags common;
  app.add_option("--checkpoint", req.checkpoint, "checkpoint folder, or a run folder (its latest checkpoint)")
      ->required();
  app.add_option("--input", req.inputs, "volume file or DICOM folder (repeat for multi-channel models)")->required();
  app.add_option("--out", req.out_dir, "output folder (created)")->required();
  app.add_option("--masking-ratio", ratio, "share of patches masked per window (default: the checkpoint's)");
  app.add_option("--seed", req.options.seed, "seed of the masks (windows in raster order)");
  app.add_option("--overlap", req.options.overlap, "overlap of neighbouring windows, 0 <= overlap < 1 (default 0.25)");
  app.add_option("--slice", slice_texts,
                 "montage row: axial|coronal|sagittal[:INDEX] (index in the preprocessed volume; default: the "
                 "middle axial, coronal and sagittal slices; repeatable)");
  app.add_flag("--original-space", req.original_space, "also write the volumes resampled onto the input file's grid");
  app.add_option("--save-tensors", req.save_tensors, "write the first window's {input, mask, pred} for torch.load");
  mae::add_common_flags(app, common);

  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    if (ratio != -1.0) req.options.masking_ratio = ratio;
    for (const auto& s : slice_texts) req.slices.push_back(mae::parse_slice_spec(s));
    const auto report = mae::run_reconstruction(req);
    const auto& m = report.metrics;
    auto psnr = [](const nlohmann::json& j) {
      if (j.is_null()) return std::string("inf");
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.2f", j.get<double>());
      return std::string(buf);
    };
    std::cout << "checkpoint " << report.checkpoint << " (step " << report.step << "), "
              << m["num_windows"].get<int64_t>() << " windows, masking ratio " << m["masking_ratio"].get<double>()
              << ", seed " << m["seed"].get<uint64_t>() << "\n"
              << "PSNR over masked voxels: model " << psnr(m["model"]["masked"]["psnr_db"])
              << " dB, window-mean baseline " << psnr(m["baseline_window_mean"]["masked"]["psnr_db"])
              << " dB; over all voxels: model " << psnr(m["model"]["all"]["psnr_db"]) << " dB (data range "
              << m["data_range"].get<double>() << ")\n"
              << "wrote " << report.files.size() << " files to " << req.out_dir << " in " << report.seconds << " s\n";
    return 0;
  });
}
