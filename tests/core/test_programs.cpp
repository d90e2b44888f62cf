// The programs as a user runs them with bad flags and configs: exit status 2 and one line naming
// the flag, file or key. mae-bench-data also removes its scratch folder when it fails.
#include <gtest/gtest.h>
#include <strings.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "../common/temp_dir.h"
#include "core/threads.h"
#include "run_binary.h"

namespace fs = std::filesystem;

namespace mae {
namespace {

// One line on stderr containing every needle, and the exit status `status`.
void expect_one_line_error(const test::RunResult& r, int status, std::initializer_list<std::string> needles) {
  EXPECT_EQ(r.status, status) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_LT(r.err.size(), 400u) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "'" << n << "' not in: " << r.err;
}

#ifdef MAE_BENCH_BIN
TEST(BenchCli, BadFlagsExit2WithAReadableLine) {
  const test::TempDir dir("mae3d_bench_cli");
  const std::string d = dir.path.string();
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--device", "banana"}, d), 2,
                        {"--device \"banana\" is not a device", "cpu, cuda, cuda:N"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--iters", "0"}, d), 2,
                        {"--iters: 0 is out of range; allowed: 1 .. 100000"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--iters", "2.5"}, d), 2, {"--iters: 2.5 is not a whole"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--warmup", "-1"}, d), 2, {"--warmup: -1 is out of range"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--threads", "4294967296"}, d), 2,
                        {"--threads: 4294967296 is out of range; allowed: 0 .. 4096"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--preset", "Z"}, d), 2, {"--preset", "A,B,tiny"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--precision", "fp16"}, d), 2, {"--precision", "fp16"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--preset", "tiny", "--img", "30"}, d), 2,
                        {"preset tiny with the given flags", "does not divide img_size = [30, 30, 30]"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--preset", "A", "--num-heads", "7"}, d), 2,
                        {"preset A with the given flags"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--set", "train.lr=1"}, d), 2,
                        {"--set requires --end-to-end"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--end-to-end", "/nonexistent/run.json"}, d), 2,
                        {"/nonexistent/run.json"});
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--end-to-end", "/nonexistent/run.json", "--batch", "2"}, d),
                        2, {"--end-to-end takes the model", "--batch"});
}

// The flags change what runs, and the JSON line says so: crop, batch, precision, token counts and
// the memory figures (a tiny model, two steps).
TEST(BenchCli, ModelFlagsReachTheTimedModel) {
  const test::TempDir dir("mae3d_bench_cli");
  const auto r = test::run_binary(MAE_BENCH_BIN,
                                  {"--preset", "tiny", "--img", "32", "16", "32", "--batch", "3", "--precision", "bf16",
                                   "--warmup", "0", "--iters", "1", "--num-layers", "1", "--decoder-num-layers", "1"},
                                  dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* want :
       {"\"img\": [32, 16, 32]", "\"batch\": 3", "\"precision\": \"bf16\"", "\"encoder_tokens\": 9",
        "\"decoder_tokens\": 33", "\"state_floor_mb\": ", "\"overhead_mb\": ", "\"start_rss_mb\": ",
        "\"net_overhead_mb\": ", "\"anon_mb\": ", "\"anon_overhead_mb\": ", "\"attention_share\": "}) {
    EXPECT_NE(r.out.find(want), std::string::npos) << "'" << want << "' not in: " << r.out;
  }
  // bf16 on a CPU that would emulate it: the JSON line says so, and a warning says fp32 is faster.
  const auto native = mae::cpu_native_bf16();
  const std::string flag = native ? (*native ? "true" : "false") : "null";
  EXPECT_NE(r.out.find("\"cpu_native_bf16\": " + flag + ","), std::string::npos) << r.out;
  EXPECT_EQ(r.err.find("--precision bf16 on a CPU without native bf16 products") != std::string::npos,
            native.has_value() && !*native)
      << r.err;
}

// Which BLAS kernels ran: OpenBLAS picks them once as it loads, from the CPU or from
// OPENBLAS_CORETYPE, and its AVX2 and AVX-512 kernels ran fp32 products 2x apart on a Zen 5 EPYC, so
// timings name them. Haswell, which every x86-64 OpenBLAS carries, is reported as set.
TEST(BenchCli, NamesTheBlasKernelsItRanOn) {
  const test::TempDir dir("mae3d_bench_cli");
  const auto r =
      test::run_binary(MAE_BENCH_BIN, {"--preset", "tiny", "--warmup", "0", "--iters", "1"}, dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string key = "\"blas_core\": ";
  const auto at = r.out.find(key);
  ASSERT_NE(at, std::string::npos) << r.out;
  const auto start = at + key.size();
  const std::string value = r.out.substr(start, r.out.find(',', start) - start);
  EXPECT_EQ(value, blas_core_name().empty() ? "null" : "\"" + blas_core_name() + "\"") << r.out;
  // Where this process (linked like mae-bench) mapped OpenBLAS, the name must be there.
  std::ifstream maps("/proc/self/maps");
  const std::string mapped{std::istreambuf_iterator<char>(maps), {}};
  if (mapped.find("libopenblas") != std::string::npos) {
    EXPECT_NE(value, "null") << r.out;
  }
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  if (forced && ::strcasecmp(forced, "haswell") == 0 && value != "null") {
    EXPECT_EQ(value, "\"Haswell\"") << r.out;
  }
}

// Which library ran the float32 products (lib/model/linear.h): --fp32-matmul picks it, "auto" is
// oneDNN where the build has it, and asking for oneDNN of a build without it is a one-line exit 2.
TEST(BenchCli, SaysWhichLibraryRanTheFloat32Products) {
  const test::TempDir dir("mae3d_bench_cli");
  const std::string d = dir.path.string();
  auto value_of = [](const std::string& out) {
    const std::string key = "\"fp32_matmul\": ";
    const auto at = out.find(key);
    if (at == std::string::npos) return std::string("(absent)");
    const auto start = at + key.size();
    return out.substr(start, out.find(',', start) - start);
  };
  const std::vector<std::string> args{"--preset", "tiny", "--warmup", "0", "--iters", "1"};
  const auto automatic = test::run_binary(MAE_BENCH_BIN, args, d);
  ASSERT_EQ(automatic.status, 0) << automatic.err;
  auto with = [&](const std::string& engine) {
    auto a = args;
    a.insert(a.end(), {"--fp32-matmul", engine});
    return test::run_binary(MAE_BENCH_BIN, a, d);
  };
  const auto blas = with("blas");
  ASSERT_EQ(blas.status, 0) << blas.err;
  EXPECT_EQ(value_of(blas.out), "\"blas\"") << blas.out;
  const auto onednn = with("onednn");
  if (onednn.status == 0) {
    EXPECT_EQ(value_of(onednn.out), "\"onednn\"") << onednn.out;
    EXPECT_EQ(value_of(automatic.out), "\"onednn\"") << automatic.out;
  } else {
    expect_one_line_error(onednn, 2, {"--fp32-matmul = \"onednn\"", "built without oneDNN"});
    EXPECT_EQ(value_of(automatic.out), "\"blas\"") << automatic.out;
  }
  expect_one_line_error(with("mkl"), 2, {"--fp32-matmul"});
}

// Large CPU tensors live in the best-fit arena unless MAE3D_CPU_ALLOCATOR=system asks for
// LibTorch's own allocator; the JSON line says which, and another value is a one-line exit 2.
TEST(BenchCli, SaysWhichCpuAllocatorHeldTheTensors) {
  const test::TempDir dir("mae3d_bench_cli");
  const std::string d = dir.path.string();
  const std::vector<std::string> args{"--preset", "tiny", "--warmup", "0", "--iters", "1", "--hidden-size", "144"};
  const auto arena = test::run_binary(MAE_BENCH_BIN, args, d);
  ASSERT_EQ(arena.status, 0) << arena.err;
  EXPECT_NE(arena.out.find("\"cpu_allocator\": \"arena\""), std::string::npos) << arena.out;
  EXPECT_NE(arena.out.find("\"arena_peak_mb\": "), std::string::npos) << arena.out;
  EXPECT_NE(arena.out.find("\"arena_high_water_mb\": "), std::string::npos) << arena.out;
  EXPECT_EQ(arena.out.find("\"arena_peak_mb\": 0,"), std::string::npos) << "no tensor reached the arena: " << arena.out;
  const auto system = test::run_binary(MAE_BENCH_BIN, args, d, {{"MAE3D_CPU_ALLOCATOR", "system"}});
  ASSERT_EQ(system.status, 0) << system.err;
  EXPECT_NE(system.out.find("\"cpu_allocator\": \"system\""), std::string::npos) << system.out;
  EXPECT_EQ(system.out.find("arena_peak_mb"), std::string::npos) << system.out;
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, args, d, {{"MAE3D_CPU_ALLOCATOR", "tcmalloc"}}), 2,
                        {"MAE3D_CPU_ALLOCATOR=tcmalloc is not an allocator", "arena", "system"});
}

TEST(BenchCli, OptimizerTimesEveryVariantOfTheUpdate) {
  const test::TempDir dir("mae3d_bench_cli");
  const auto r = test::run_binary(MAE_BENCH_BIN, {"--preset", "tiny", "--optimizer", "--warmup", "0", "--iters", "2"},
                                  dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* want :
       {"\"preset\": \"tiny\"", "\"optimizer\": \"AdamW\"", "\"update_s\": ", "\"update_with_norm_s\": ",
        "\"clip_s\": ", "\"torch_norm_then_update_s\": ", "\"torch_clip_grad_norm_then_update_s\": ", "\"iters\": 2"}) {
    EXPECT_NE(r.out.find(want), std::string::npos) << "'" << want << "' not in: " << r.out;
  }
  expect_one_line_error(test::run_binary(MAE_BENCH_BIN, {"--optimizer", "--end-to-end", "x.json"}, dir.path.string()),
                        2, {"--optimizer", "--end-to-end"});
}
#endif

#ifdef MAE_BENCH_DATA_BIN
TEST(BenchDataCli, AMissingMriIsExit2NamingThePath) {
  const test::TempDir dir("mae3d_bench_data_cli");
  const auto r = test::run_binary(MAE_BENCH_DATA_BIN, {"--mri", "/nonexistent/ch2.nii.gz"}, dir.path.string(),
                                  {{"TMPDIR", dir / "tmp"}});
  expect_one_line_error(r, 2, {"--mri /nonexistent/ch2.nii.gz: no such file"});
  expect_one_line_error(test::run_binary(MAE_BENCH_DATA_BIN, {"--batches", "0"}, dir.path.string()), 2,
                        {"--batches: 0 is out of range"});
  std::ofstream(dir / "file") << "x";
  expect_one_line_error(test::run_binary(MAE_BENCH_DATA_BIN, {"--work-dir", dir / "file"}, dir.path.string()), 2,
                        {"--work-dir", "is a file, not a folder"});
}

TEST(BenchDataCli, RemovesItsScratchFolderWhenAMeasurementFails) {
  const test::TempDir dir("mae3d_bench_data_cli");
  fs::create_directories(dir / "tmp");
  std::ofstream(dir / "corrupt.nii.gz") << "not a volume";
  const auto r = test::run_binary(MAE_BENCH_DATA_BIN, {"--mri", dir / "corrupt.nii.gz"}, dir.path.string(),
                                  {{"TMPDIR", dir / "tmp"}});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("corrupt.nii.gz"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_empty(dir / "tmp")) << "the scratch folder was left behind";
}
#endif

#ifdef MAE_PRETRAIN_BIN
TEST(PretrainConfigCli, UnusableConfigsExit2NamingThePath) {
  const test::TempDir dir("mae3d_pretrain_cfg_cli");
  const std::string d = dir.path.string();
  expect_one_line_error(test::run_binary(MAE_PRETRAIN_BIN, {"--config", d}, d), 2,
                        {d + ": is a folder, not a config file"});
  std::ofstream(dir / "empty.json") << "";
  expect_one_line_error(test::run_binary(MAE_PRETRAIN_BIN, {"--config", dir / "empty.json"}, d), 2,
                        {"empty.json: the config file is empty"});
  std::ofstream(dir / "dup.json") << "{\"data\": {\"dataset\": \"x\"},\n \"train\": {\"lr\": 5.0,\n  \"lr\": 0.001}}";
  expect_one_line_error(test::run_binary(MAE_PRETRAIN_BIN, {"--config", dir / "dup.json"}, d), 2,
                        {"dup.json: \"train.lr\" appears twice (line 3"});
  std::ofstream(dir / "ok.json") << "{\"data\": {\"dataset\": \"x\"}}";
  expect_one_line_error(
      test::run_binary(MAE_PRETRAIN_BIN, {"--config", dir / "ok.json", "--set", "model.img_size=[16,16"}, d), 2,
      {"--set \"model.img_size=[16,16\": the value is not valid JSON", "column 7"});
  expect_one_line_error(test::run_binary(MAE_PRETRAIN_BIN, {"--config", dir / "ok.json", "--set", "seed=1e30"}, d), 2,
                        {"\"seed\" = 1e+30 is out of range"});
  expect_one_line_error(test::run_binary(MAE_PRETRAIN_BIN, {"--config", dir / "a\nb.json"}, d), 2,
                        {"a\\nb.json: cannot open the config file"});
}
#endif

}  // namespace
}  // namespace mae
