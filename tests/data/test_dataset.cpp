// Dataset lists: dataset.json (string and list images, relative paths, validation, series_uid),
// bad entries, text lists, folders, and the validation split.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "data/dataset.h"
#include "helpers.h"

namespace mae {
namespace {

using test::TempDir;
using test::write_text;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no InputError)";
}

struct DatasetFiles : ::testing::Test {
  TempDir dir;
  void SetUp() override {
    std::filesystem::create_directories(dir.path / "imgs");
    for (const char* n : {"imgs/a.nii.gz", "imgs/b_t1.nii.gz", "imgs/b_t2.nii.gz", "imgs/c.mha", "imgs/v.nrrd"}) {
      write_text(dir / n, "x");
    }
  }
};

TEST_F(DatasetFiles, JsonWithStringAndListImagesAndValidation) {
  write_text(dir / "dataset.json", R"({
    "name": "test", "training": [
      {"image": "imgs/a.nii.gz", "label": "ignored.nii.gz"},
      {"image": ["./imgs/b_t1.nii.gz", "imgs/b_t2.nii.gz"], "series_uid": "1.2.3"},
      "imgs/c.mha"],
    "validation": [{"image": "imgs/v.nrrd"}]})");
  const DatasetSplit s = read_dataset(dir / "dataset.json");
  ASSERT_EQ(s.training.size(), 3u);
  EXPECT_EQ(s.training[0].paths, std::vector<std::string>{dir / "imgs/a.nii.gz"});
  EXPECT_EQ(s.training[1].paths, (std::vector<std::string>{dir / "imgs/b_t1.nii.gz", dir / "imgs/b_t2.nii.gz"}));
  EXPECT_EQ(s.training[1].series_uid, "1.2.3");
  EXPECT_EQ(s.training[2].paths, std::vector<std::string>{dir / "imgs/c.mha"});
  ASSERT_EQ(s.validation.size(), 1u);
  EXPECT_EQ(s.validation[0].paths, std::vector<std::string>{dir / "imgs/v.nrrd"});
  // A given validation section is kept whatever val_fraction says.
  const DatasetSplit t = split_validation(s, 0.5, 1);
  EXPECT_EQ(t.training.size(), 3u);
  EXPECT_EQ(t.validation.size(), 1u);
}

TEST_F(DatasetFiles, JsonErrorsNameTheFileAndEntry) {
  write_text(dir / "no_training.json", R"({"validation": []})");
  EXPECT_NE(error_of([&] { read_dataset(dir / "no_training.json"); }).find("no_training.json: has no \"training\""),
            std::string::npos);
  write_text(dir / "bad_image.json", R"({"training": [{"image": "imgs/a.nii.gz"}, {"image": 5}]})");
  const std::string e1 = error_of([&] { read_dataset(dir / "bad_image.json"); });
  EXPECT_NE(e1.find("bad_image.json"), std::string::npos) << e1;
  EXPECT_NE(e1.find("\"training\"[1]"), std::string::npos) << e1;
  write_text(dir / "bad_list.json", R"({"training": [{"image": ["imgs/a.nii.gz", 3]}]})");
  EXPECT_NE(error_of([&] { read_dataset(dir / "bad_list.json"); }).find("not a path string"), std::string::npos);
  write_text(dir / "missing.json", R"({"training": [{"image": "imgs/nope.nii.gz"}]})");
  const std::string e2 = error_of([&] { read_dataset(dir / "missing.json"); });
  EXPECT_NE(e2.find(dir / "imgs/nope.nii.gz"), std::string::npos) << e2;
  EXPECT_NE(e2.find("not found"), std::string::npos) << e2;
  EXPECT_NO_THROW(read_dataset(dir / "missing.json", /*require_files=*/false));
  write_text(dir / "broken.json", R"({"training": [)");
  EXPECT_NE(error_of([&] { read_dataset(dir / "broken.json"); }).find("not valid JSON"), std::string::npos);
  write_text(dir / "empty.json", R"({"training": []})");
  EXPECT_NE(error_of([&] { read_dataset(dir / "empty.json"); }).find("no training volumes"), std::string::npos);
  EXPECT_NE(error_of([&] { read_dataset(dir / "absent.json"); }).find("absent.json"), std::string::npos);
}

TEST_F(DatasetFiles, TextListWithCommentsAndRelativePaths) {
  write_text(dir / "list.txt", "# training volumes\n\nimgs/a.nii.gz\n  imgs/c.mha  \r\n" + dir / "imgs/v.nrrd" + "\n");
  const DatasetSplit s = read_dataset(dir / "list.txt");
  ASSERT_EQ(s.training.size(), 3u);
  EXPECT_EQ(s.training[0].paths[0], dir / "imgs/a.nii.gz");
  EXPECT_EQ(s.training[1].paths[0], dir / "imgs/c.mha");
  EXPECT_EQ(s.training[2].paths[0], dir / "imgs/v.nrrd");
  EXPECT_TRUE(s.validation.empty());
  write_text(dir / "bad.txt", "imgs/a.nii.gz\nimgs/zzz.nii\n");
  EXPECT_NE(error_of([&] { read_dataset(dir / "bad.txt"); }).find("zzz.nii"), std::string::npos);
}

TEST_F(DatasetFiles, FolderScanIsSortedAndFindsDicomFolders) {
  write_text(dir / "imgs/notes.txt", "not a volume");
  write_text(dir / "imgs/c.raw", "data of c.mhd");
  std::filesystem::create_directories(dir.path / "imgs/dicom_b");
  write_text(dir / "imgs/dicom_b/IM0001.dcm", "x");
  std::filesystem::create_directories(dir.path / "imgs/other");
  write_text(dir / "imgs/other/readme", "x");
  std::string preamble(128, '\0');
  std::filesystem::create_directories(dir.path / "imgs/dicom_c");
  write_text(dir / "imgs/dicom_c/0001", preamble + "DICMxxxx");
  const DatasetSplit s = read_dataset((dir.path / "imgs").string());
  std::vector<std::string> names;
  for (const auto& e : s.training) names.push_back(std::filesystem::path(e.paths[0]).filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"a.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz", "c.mha", "dicom_b",
                                             "dicom_c", "v.nrrd"}));
}

TEST_F(DatasetFiles, SingleVolumeFile) {
  const DatasetSplit s = read_dataset(dir / "imgs/c.mha");
  ASSERT_EQ(s.training.size(), 1u);
  EXPECT_EQ(s.training[0].paths[0], dir / "imgs/c.mha");
}

TEST(Split, DeterministicAndBounded) {
  DatasetSplit s;
  for (int i = 0; i < 20; ++i) s.training.push_back({{"v" + std::to_string(i)}, ""});
  const DatasetSplit a = split_validation(s, 0.25, 7), b = split_validation(s, 0.25, 7), c = split_validation(s, 0.25, 8);
  EXPECT_EQ(a.validation.size(), 5u);
  EXPECT_EQ(a.training.size(), 15u);
  auto names = [](const std::vector<DatasetEntry>& v) {
    std::vector<std::string> n;
    for (const auto& e : v) n.push_back(e.paths[0]);
    return n;
  };
  EXPECT_EQ(names(a.validation), names(b.validation));
  EXPECT_NE(names(a.validation), names(c.validation));
  // Order within each part follows the list.
  auto tr = names(a.training);
  EXPECT_TRUE(std::is_sorted(tr.begin(), tr.end(), [](const std::string& x, const std::string& y) {
    return std::stoi(x.substr(1)) < std::stoi(y.substr(1));
  }));
  // At least one validation volume, never all of them, none when fraction is 0 or one volume.
  DatasetSplit two;
  two.training = {{{"x"}, ""}, {{"y"}, ""}};
  EXPECT_EQ(split_validation(two, 0.01, 1).validation.size(), 1u);
  EXPECT_EQ(split_validation(two, 0.9, 1).training.size(), 1u);
  EXPECT_EQ(split_validation(two, 0.0, 1).validation.size(), 0u);
  DatasetSplit one;
  one.training = {{{"x"}, ""}};
  EXPECT_EQ(split_validation(one, 0.5, 1).training.size(), 1u);
}

}  // namespace
}  // namespace mae
