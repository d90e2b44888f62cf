// TensorBoard event files written by hand: CRC-32C against the published vectors, TFRecord framing
// and Event encoding parsed back, the PNG encoder checked with zlib, truncation on resume, the
// output.tensorboard key, and a tiny training run whose event file holds metrics.jsonl's scalars.
// (tests/train/test_tensorboard.py reads mae-pretrain's files with the real tensorboard package.)
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "../common/temp_dir.h"
#include "core/error.h"
#include "io/io.h"
#include "io/png.h"
#include "run/config.h"
#include "train/tensorboard.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
namespace tb = mae::tb;

namespace {

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

uint32_t be32(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) | (uint32_t(uint8_t(s[at + 2])) << 8) |
         uint32_t(uint8_t(s[at + 3]));
}

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | uint8_t(s[at + static_cast<size_t>(i)]);
  return v;
}

std::vector<fs::path> events_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<tb::Event> read_events(const fs::path& file) {
  const std::string bytes = read_all(file);
  size_t end = 0;
  std::vector<tb::Event> out;
  for (const auto& r : tb::parse_records(bytes, &end)) {
    auto e = tb::decode_event(r);
    EXPECT_TRUE(e.has_value()) << file;
    if (e) out.push_back(*e);
  }
  EXPECT_EQ(end, bytes.size()) << file << ": trailing bytes that are not a whole record";
  return out;
}

TEST(Crc32c, PublishedTestVectors) {
  // RFC 3720 appendix B.4, and the common check value of "123456789".
  const std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xFF);
  std::vector<uint8_t> up(32), down(32);
  for (int i = 0; i < 32; ++i) {
    up[i] = static_cast<uint8_t>(i);
    down[i] = static_cast<uint8_t>(31 - i);
  }
  EXPECT_EQ(tb::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(tb::crc32c(ones.data(), ones.size()), 0x62A8AB43u);
  EXPECT_EQ(tb::crc32c(up.data(), up.size()), 0x46DD794Eu);
  EXPECT_EQ(tb::crc32c(down.data(), down.size()), 0x113FDB5Cu);
  EXPECT_EQ(tb::crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(tb::crc32c("", 0), 0u);
  // Continuing a checksum equals one pass over the whole.
  EXPECT_EQ(tb::crc32c("56789", 5, tb::crc32c("1234", 4)), 0xE3069283u);
  // TFRecord's mask: rotate right by 15, add 0xa282ead8.
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(tb::masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TfRecord, FramingRoundTripAndDamage) {
  const std::vector<std::string> payloads = {"", "a", std::string(1000, '\x7f'), std::string("\0\1\2", 3)};
  std::string file;
  for (const auto& p : payloads) {
    const std::string r = tb::frame_record(p);
    ASSERT_EQ(r.size(), p.size() + 16);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(r[static_cast<size_t>(i)]);
    EXPECT_EQ(n, p.size());
    EXPECT_EQ(le32(r, 8), tb::masked_crc32c(r.data(), 8));
    EXPECT_EQ(r.substr(12, p.size()), p);
    EXPECT_EQ(le32(r, 12 + p.size()), tb::masked_crc32c(p.data(), p.size()));
    file += r;
  }
  size_t end = 0;
  EXPECT_EQ(tb::parse_records(file, &end), payloads);
  EXPECT_EQ(end, file.size());
  // A record cut short ends the list before it.
  const size_t first_two = 16 + 17;
  EXPECT_EQ(tb::parse_records(file.substr(0, file.size() - 1), &end).size(), 3u);
  EXPECT_EQ(tb::parse_records(file.substr(0, first_two + 5), &end).size(), 2u);
  EXPECT_EQ(end, first_two);
  // A changed data byte fails the data CRC; a changed length fails the length CRC.
  std::string bad = file;
  bad[first_two + 12] ^= 0x01;
  EXPECT_EQ(tb::parse_records(bad, &end).size(), 2u);
  bad = file;
  bad[16] ^= 0x01;  // the second record's length
  EXPECT_EQ(tb::parse_records(bad, &end).size(), 1u);
  EXPECT_EQ(end, 16u);
}

TEST(EventProto, HandEncodingMatchesTheWireFormat) {
  // file_version: field 3, length-delimited (0x1a); wall_time 1.5: field 1, fixed64 (0x09).
  tb::Event v;
  v.file_version = "brain.Event:2";
  EXPECT_EQ(tb::encode_event(v), std::string("\x1a\x0d") + "brain.Event:2");
  v.wall_time = 1.5;
  EXPECT_EQ(tb::encode_event(v), std::string("\x09\x00\x00\x00\x00\x00\x00\xf8\x3f\x1a\x0d", 11) + "brain.Event:2");
  // step 300: field 2, varint (0x10), 300 = 0xac 0x02; session_log START: field 7 (0x3a) { status = 1 }.
  tb::Event s;
  s.step = 300;
  s.session_status = 1;
  EXPECT_EQ(tb::encode_event(s), std::string("\x10\xac\x02\x3a\x02\x08\x01", 7));
  // summary (0x2a, 10 bytes) { value (0x0a, 8 bytes) { tag (0x0a) "a", simple_value (0x15) 1.0f } }
  tb::Event sc;
  sc.step = 1;
  sc.summary.push_back({"a", 1.0f, std::nullopt});
  EXPECT_EQ(tb::encode_event(sc), std::string("\x10\x01\x2a\x0a\x0a\x08\x0a\x01"
                                              "a"
                                              "\x15\x00\x00\x80\x3f",
                                              14));
}

TEST(EventProto, RoundTrip) {
  tb::Event e;
  e.wall_time = 1712345678.25;
  e.step = (int64_t{1} << 40) + 3;
  e.has_summary = true;
  e.summary.push_back({"train/loss", 0.125f, std::nullopt});
  e.summary.push_back({"val/loss", -3.5e-20f, std::nullopt});
  tb::ImageValue im;
  im.height = 7;
  im.width = 300;
  im.colorspace = 3;
  im.encoded = std::string("\x89PNG\0\xff", 6);
  e.summary.push_back({"val/reconstruction", std::nullopt, im});
  const auto d = tb::decode_event(tb::encode_event(e));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->wall_time, e.wall_time);
  EXPECT_EQ(d->step, e.step);
  EXPECT_TRUE(d->has_summary);
  EXPECT_FALSE(d->session_status);
  ASSERT_EQ(d->summary.size(), 3u);
  EXPECT_EQ(d->summary[0].tag, "train/loss");
  EXPECT_EQ(*d->summary[0].simple_value, 0.125f);
  EXPECT_EQ(*d->summary[1].simple_value, -3.5e-20f);
  ASSERT_TRUE(d->summary[2].image);
  EXPECT_FALSE(d->summary[2].simple_value);
  EXPECT_EQ(d->summary[2].image->height, 7);
  EXPECT_EQ(d->summary[2].image->width, 300);
  EXPECT_EQ(d->summary[2].image->colorspace, 3);
  EXPECT_EQ(d->summary[2].image->encoded, im.encoded);
  // Not a message: a truncated varint, a length past the end.
  EXPECT_FALSE(tb::decode_event(std::string("\x10\xac", 2)));
  EXPECT_FALSE(
      tb::decode_event(std::string("\x1a\x05"
                                   "ab",
                                   4)));
}

TEST(Png, ChunksCrcsAndPixelsAreValid) {
  const auto rgb = torch::randint(0, 256, {5, 7, 3}, torch::kLong).to(torch::kByte);
  for (const auto& image : {rgb, rgb.select(2, 1), rgb.narrow(2, 0, 1), rgb.transpose(0, 1)}) {
    const std::string png = mae::encode_png(image);
    const int64_t h = image.size(0), w = image.size(1), c = image.dim() == 3 ? image.size(2) : 1;
    ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    size_t at = 8;
    std::vector<std::string> types;
    std::string idat;
    while (at < png.size()) {
      ASSERT_LE(at + 12, png.size());
      const uint32_t n = be32(png, at);
      ASSERT_LE(at + 12 + n, png.size());
      const std::string type = png.substr(at + 4, 4);
      const std::string data = png.substr(at + 8, n);
      const uLong crc = crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(png.data() + at + 4), n + 4);
      EXPECT_EQ(be32(png, at + 8 + n), static_cast<uint32_t>(crc)) << type;
      if (type == "IHDR") {
        ASSERT_EQ(n, 13u);
        EXPECT_EQ(be32(data, 0), uint32_t(w));
        EXPECT_EQ(be32(data, 4), uint32_t(h));
        EXPECT_EQ(data[8], 8);               // bit depth
        EXPECT_EQ(data[9], c == 3 ? 2 : 0);  // RGB or grey
        EXPECT_EQ(data.substr(10), std::string(3, '\0'));
      }
      if (type == "IDAT") idat += data;
      types.push_back(type);
      at += 12 + n;
    }
    EXPECT_EQ(types, (std::vector<std::string>{"IHDR", "IDAT", "IEND"}));
    std::vector<uint8_t> raw(static_cast<size_t>(h * (w * c + 1)));
    uLongf raw_size = raw.size();
    ASSERT_EQ(uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()), idat.size()), Z_OK);
    ASSERT_EQ(raw_size, raw.size());
    const auto pixels = image.contiguous();
    for (int64_t y = 0; y < h; ++y) {
      const uint8_t* line = raw.data() + y * (w * c + 1);
      EXPECT_EQ(line[0], 0) << "filter type of line " << y;
      EXPECT_EQ(std::memcmp(line + 1, pixels.data_ptr<uint8_t>() + y * w * c, static_cast<size_t>(w * c)), 0)
          << "line " << y;
    }
  }
  EXPECT_THROW(mae::encode_png(torch::zeros({4, 4, 3})), mae::Error);                // float
  EXPECT_THROW(mae::encode_png(torch::zeros({4, 4, 2}, torch::kByte)), mae::Error);  // two channels
  EXPECT_THROW(mae::encode_png(torch::zeros({0, 4}, torch::kByte)), mae::Error);     // empty
}

TEST(ScalarTags, EveryFiniteNumberOfARecordButStep) {
  EXPECT_EQ(mae::scalar_tag("loss"), "train/loss");
  EXPECT_EQ(mae::scalar_tag("val_loss"), "val/loss");
  EXPECT_EQ(mae::scalar_tag("probe_knn_acc"), "probe/knn_acc");
  EXPECT_EQ(mae::scalar_tag("val_"), "train/val_");
  const nlohmann::json rec = {{"step", 10}, {"epoch", 2},   {"loss", 0.5}, {"val_loss", nullptr},
                              {"lr", 1e-3}, {"flag", true}, {"name", "x"}, {"probe_dice", 0.25}};
  const auto s = mae::record_scalars(rec);
  const std::vector<std::pair<std::string, float>> expected = {
      {"train/epoch", 2.0f}, {"train/loss", 0.5f}, {"train/lr", 1e-3f}, {"probe/dice", 0.25f}};
  EXPECT_EQ(s, expected);
}

TEST(OutputTensorboardKey, DefaultsOnIsReadStrictlyAndWrittenBack) {
  nlohmann::json tree = {{"data", {{"dataset", "x.json"}}}};
  EXPECT_TRUE(mae::config_from_json(tree).output.tensorboard);
  EXPECT_EQ(mae::config_to_json(mae::config_from_json(tree))["output"]["tensorboard"], true);
  tree["output"]["tensorboard"] = false;
  const auto off = mae::config_from_json(tree);
  EXPECT_FALSE(off.output.tensorboard);
  EXPECT_EQ(mae::config_to_json(off)["output"]["tensorboard"], false);
  EXPECT_FALSE(mae::config_from_json(mae::config_to_json(off)).output.tensorboard);
  for (const nlohmann::json& bad : {nlohmann::json(1), nlohmann::json("true"), nlohmann::json()}) {
    tree["output"]["tensorboard"] = bad;
    try {
      mae::config_from_json(tree);
      ADD_FAILURE() << bad.dump() << " was accepted";
    } catch (const mae::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("output.tensorboard"), std::string::npos) << e.what();
    }
  }
  nlohmann::json typo = {{"data", {{"dataset", "x.json"}}}, {"output", {{"tensorbord", true}}}};
  try {
    mae::config_from_json(typo);
    ADD_FAILURE() << "a misspelt key was accepted";
  } catch (const mae::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("output.tensorboard"), std::string::npos) << e.what();
  }
}

TEST(EventWriter, WritesVersionStartScalarsImagesAndIsCutBackOnResume) {
  mae::test::TempDir dir("mae3d_tb");
  const auto image = torch::full({4, 6, 3}, 200, torch::kByte);
  std::string first;
  {
    mae::EventWriter w(dir.path.string(), 1);
    first = w.path();
    EXPECT_EQ(fs::path(first).parent_path(), dir.path);
    for (int64_t s = 1; s <= 10; ++s) w.write_scalars(s, {{"train/loss", static_cast<float>(s) / 2}});
    w.write_image(5, "val/reconstruction", image);
    w.write_scalars(11, {});  // nothing
    w.sync();
  }
  const std::string name = fs::path(first).filename().string();
  EXPECT_EQ(name.rfind("events.out.tfevents.", 0), 0u) << name;
  auto events = read_events(first);
  ASSERT_EQ(events.size(), 13u);
  EXPECT_EQ(events[0].file_version, "brain.Event:2");
  EXPECT_GT(events[0].wall_time, 1.6e9);
  EXPECT_EQ(events[1].session_status, 1);
  EXPECT_EQ(events[1].step, 1);
  for (int64_t s = 1; s <= 10; ++s) {
    ASSERT_EQ(events[static_cast<size_t>(s) + 1].summary.size(), 1u);
    EXPECT_EQ(events[static_cast<size_t>(s) + 1].step, s);
    EXPECT_EQ(*events[static_cast<size_t>(s) + 1].summary[0].simple_value, static_cast<float>(s) / 2);
  }
  const auto& img = events[12].summary.at(0);
  EXPECT_EQ(events[12].step, 5);
  EXPECT_EQ(img.tag, "val/reconstruction");
  ASSERT_TRUE(img.image);
  EXPECT_EQ(img.image->height, 4);
  EXPECT_EQ(img.image->width, 6);
  EXPECT_EQ(img.image->colorspace, 3);
  EXPECT_EQ(img.image->encoded, mae::encode_png(image));

  // Resume at step 6 (the image at step 5 came after step 10 in the file, so it goes with it):
  // records after the first one past step 6 are cut, and a torn record at the end too.
  { std::ofstream(first, std::ios::app | std::ios::binary) << std::string("\x05\x00\x00", 3); }
  auto cut = mae::truncate_events(dir.path.string(), 6);
  EXPECT_EQ(cut.records_removed, 6);  // steps 7..10, the image, the torn record
  EXPECT_TRUE(cut.files_removed.empty());
  events = read_events(first);
  ASSERT_EQ(events.size(), 8u);
  EXPECT_EQ(events.back().step, 6);
  {
    mae::EventWriter w(dir.path.string(), 7);
    EXPECT_GT(fs::path(w.path()).filename().string(), name) << "a later start's file must sort after";
    w.write_scalars(7, {{"train/loss", 9.0f}});
  }
  auto files = events_files(dir.path);
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].string(), first);
  const auto second = read_events(files[1]);
  ASSERT_EQ(second.size(), 3u);
  EXPECT_EQ(second[1].session_status, 1);
  EXPECT_EQ(second[1].step, 7);
  // Nothing to cut: files stay as they are.
  const std::string before = read_all(first);
  cut = mae::truncate_events(dir.path.string(), 100);
  EXPECT_EQ(cut.records_removed, 0);
  EXPECT_EQ(read_all(first), before);
  // Back to step 3: the second file keeps no summary and is deleted; a fresh start removes all.
  cut = mae::truncate_events(dir.path.string(), 3);
  EXPECT_EQ(cut.files_removed, std::vector<std::string>{files[1].string()});
  EXPECT_EQ(read_events(first).back().step, 3);
  cut = mae::truncate_events(dir.path.string(), 0);
  EXPECT_EQ(cut.files_removed.size(), 1u);
  EXPECT_TRUE(events_files(dir.path).empty());
}

// A tiny real run: the event file holds every metrics.jsonl scalar at its step, and the picture
// of the callback at every validation; a resume from an earlier checkpoint leaves no step twice.
TEST(EventWriter, TrainingRunWritesTheMetricsScalarsAndValidationPictures) {
  mae::clear_stop_request();
  mae::test::TempDir dir("mae3d_tb_run");
  std::ofstream list(dir / "list.txt");
  for (int i = 0; i < 3; ++i) {
    mae::Volume v;
    v.data = (torch::rand({1, 18, 20, 14}) + 1.0).contiguous();  // W smaller than the crop: padded
    v.spacing = {1.0, 1.5, 2.0};
    mae::write_volume(v, dir / ("v" + std::to_string(i) + ".nii.gz"));
    list << "v" << i << ".nii.gz\n";
  }
  list.close();
  nlohmann::json tree = {
      {"seed", 5},
      {"device", "cpu"},
      {"threads", 1},
      {"data", {{"dataset", dir / "list.txt"}, {"cache_dir", dir / "cache"}, {"workers", 0}, {"val_fraction", 0.34}}},
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
      {"train", {{"batch_size", 2}, {"max_steps", 12}, {"log_every", 2}, {"checkpoint_every", 4}, {"keep_last", 5}}},
      {"output", {{"dir", dir / "run"}}}};
  std::vector<int64_t> picture_steps;
  mae::TrainOptions options;
  options.validation_image = [&](const mae::MaskedAutoencoder& model, const mae::Volume& window,
                                 const std::string& name, int64_t step) -> std::optional<at::Tensor> {
    EXPECT_FALSE(model->is_training());
    EXPECT_EQ(window.data.sizes(), (std::vector<int64_t>{1, 16, 16, 16}));
    EXPECT_EQ(window.spacing[0], 1.0);
    EXPECT_NE(name.find(".nii.gz"), std::string::npos) << name;
    picture_steps.push_back(step);
    return torch::full({3, 5}, static_cast<int>(step), torch::kByte);
  };
  auto check = [&](const std::string& what) {
    std::map<int64_t, std::map<std::string, float>> expected, seen;
    std::ifstream in(dir.path / "run" / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const auto rec = nlohmann::json::parse(line);
      for (const auto& [tag, v] : mae::record_scalars(rec)) expected[rec["step"].get<int64_t>()][tag] = v;
    }
    std::map<int64_t, int> pictures;
    for (const auto& f : events_files(dir.path / "run")) {
      int64_t last = 0;
      for (const auto& e : read_events(f)) {
        EXPECT_GE(e.step, last) << what << ": steps go back inside " << f;
        last = e.step;
        for (const auto& v : e.summary) {
          if (v.simple_value) {
            EXPECT_FALSE(seen[e.step].count(v.tag)) << what << ": " << v.tag << " twice at step " << e.step;
            seen[e.step][v.tag] = *v.simple_value;
          } else if (v.image) {
            EXPECT_EQ(v.tag, "val/reconstruction");
            EXPECT_EQ(v.image->encoded, mae::encode_png(torch::full({3, 5}, static_cast<int>(e.step), torch::kByte)));
            ++pictures[e.step];
          }
        }
      }
    }
    EXPECT_EQ(seen, expected) << what;
    EXPECT_EQ(pictures, (std::map<int64_t, int>{{4, 1}, {8, 1}, {12, 1}})) << what;
    EXPECT_TRUE(seen.at(12).count("val/loss") && seen.at(12).count("train/loss") && seen.at(12).count("train/lr"))
        << what;
  };
  mae::train(mae::config_from_json(tree), options);
  EXPECT_EQ(picture_steps, (std::vector<int64_t>{4, 8, 12}));
  ASSERT_EQ(events_files(dir.path / "run").size(), 1u);
  check("fresh run");
  // Resume from step 4: steps 5..12 are written again (samples_per_s differs), never twice.
  mae::TrainOptions resume = options;
  resume.resume = true;
  resume.resume_from = (dir.path / "run" / "checkpoints" / "step_00000004").string();
  mae::train(mae::config_from_json(tree), resume);
  EXPECT_EQ(events_files(dir.path / "run").size(), 2u);
  check("resumed at step 4");
  // With output.tensorboard off, no new file; the old ones are still cut back to the resumed step.
  tree["output"]["tensorboard"] = false;
  resume.resume_from = (dir.path / "run" / "checkpoints" / "step_00000008").string();
  tree["train"]["max_steps"] = 8;
  picture_steps.clear();
  mae::train(mae::config_from_json(tree), resume);
  EXPECT_TRUE(picture_steps.empty());
  EXPECT_EQ(events_files(dir.path / "run").size(), 2u);
  for (const auto& f : events_files(dir.path / "run"))
    for (const auto& e : read_events(f)) EXPECT_LE(e.step, 8) << f;
}

}  // namespace
