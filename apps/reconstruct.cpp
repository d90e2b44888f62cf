// mae-reconstruct: shows what a trained masked autoencoder learned. Thin: parse the command line,
// call mae::run_reconstruction, print where the outputs went and the headline metrics.
#include "infer/reconstruct.h"

#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>

#include "cli.h"
#include "infer/windows.h"

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
  auto* ratio_flag =
      app.add_option("--masking-ratio", ratio, "share of patches masked per window (default: the checkpoint's)");
  app.add_option("--seed", req.options.seed, "seed of the masks (windows in raster order)")
      ->check(mae::int_range(0, std::numeric_limits<int64_t>::max()));
  char overlap_help[96];
  std::snprintf(overlap_help, sizeof overlap_help, "overlap of neighbouring windows, 0 .. %g (default 0.25)",
                mae::kMaxOverlap);
  app.add_option("--overlap", req.options.overlap, overlap_help)->check(mae::real_range(0.0, mae::kMaxOverlap));
  app.add_option("--slice", slice_texts,
                 "montage row: axial|coronal|sagittal[:INDEX] (index in the preprocessed volume; default: the "
                 "middle axial, coronal and sagittal slices; repeatable)");
  app.add_flag("--original-space", req.original_space, "also write the volumes resampled onto the input file's grid");
  app.add_option("--save-tensors", req.save_tensors, "write the first window's {input, mask, pred} for torch.load");
  mae::add_common_flags(app, common);

  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    if (ratio_flag->count() > 0) req.options.masking_ratio = ratio;
    for (const auto& s : slice_texts) req.slices.push_back(mae::parse_slice_spec(s));
    // Many windows (a large volume, a high overlap) or a slow machine: say how far it is.
    auto progress = std::make_shared<mae::ProgressLine>("mae-reconstruct: window");
    req.options.progress = [progress](int64_t done, int64_t total) { progress->update(done, total); };
    const auto report = mae::run_reconstruction(req);
    if (!report.warning.empty()) std::cerr << "mae-reconstruct: warning: " << report.warning << std::endl;
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
