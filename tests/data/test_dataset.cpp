// Dataset lists: dataset.json (string and list images, relative paths, validation, series_uid),
// bad entries, text lists, folders, and the validation split.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include <unistd.h>

#include "core/error.h"
#include "data/dataset.h"
#include "helpers.h"
#include "io/io.h"

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
  EXPECT_EQ(names, (std::vector<std::string>{"a.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz", "c.mha", "dicom_b", "dicom_c",
                                             "v.nrrd"}));
}

TEST_F(DatasetFiles, SingleVolumeFile) {
  const DatasetSplit s = read_dataset(dir / "imgs/c.mha");
  ASSERT_EQ(s.training.size(), 1u);
  EXPECT_EQ(s.training[0].paths[0], dir / "imgs/c.mha");
}

std::string cause_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.cause();
  }
  return "(no InputError)";
}

TEST_F(DatasetFiles, TheSameVolumeListedTwiceIsRefusedNamingBothPositions) {
  namespace fs = std::filesystem;
  // Across training and validation, spelt differently.
  write_text(dir / "cross.json", R"({"training": ["imgs/a.nii.gz", "imgs/c.mha"],
                                     "validation": ["./imgs/../imgs/a.nii.gz"]})");
  const std::string e1 = error_of([&] { read_dataset(dir / "cross.json"); });
  EXPECT_NE(e1.find("\"validation\"[0]"), std::string::npos) << e1;
  EXPECT_NE(e1.find("\"training\"[0]"), std::string::npos) << e1;
  EXPECT_NE(e1.find(dir / "imgs/a.nii.gz"), std::string::npos) << e1;
  EXPECT_NE(e1.find("leaks validation data"), std::string::npos) << e1;
  EXPECT_EQ(cause_of([&] { read_dataset(dir / "cross.json"); }), "duplicate volume");
  // Through a symbolic link and a hard link, within one list, also without require_files.
  fs::create_symlink("a.nii.gz", dir.path / "imgs/link.nii.gz");
  fs::create_hard_link(dir.path / "imgs/c.mha", dir.path / "imgs/hard.mha");
  write_text(dir / "sym.json", R"({"training": ["imgs/a.nii.gz", "imgs/v.nrrd", "imgs/link.nii.gz"]})");
  const std::string e2 = error_of([&] { read_dataset(dir / "sym.json", /*require_files=*/false); });
  EXPECT_NE(e2.find("\"training\"[2]"), std::string::npos) << e2;
  EXPECT_NE(e2.find("link.nii.gz"), std::string::npos) << e2;
  EXPECT_NE(e2.find("\"training\"[0]"), std::string::npos) << e2;
  write_text(dir / "hard.txt", "imgs/c.mha\nimgs/v.nrrd\n# comment\nimgs/hard.mha\n");
  const std::string e3 = error_of([&] { read_dataset(dir / "hard.txt"); });
  EXPECT_NE(e3.find("line 4"), std::string::npos) << e3;
  EXPECT_NE(e3.find("line 1"), std::string::npos) << e3;
  // A missing file listed twice is still caught (the check-data program does not require files).
  write_text(dir / "missing_twice.txt", "imgs/gone.nii.gz\nimgs/./gone.nii.gz\n");
  EXPECT_NE(error_of([&] { read_dataset(dir / "missing_twice.txt", false); }).find("line 2"), std::string::npos);
  // The same channel twice in one entry.
  write_text(dir / "channels.json", R"({"training": [{"image": ["imgs/b_t1.nii.gz", "imgs/b_t1.nii.gz"]}]})");
  EXPECT_NE(error_of([&] { read_dataset(dir / "channels.json"); }).find("twice"), std::string::npos);
  // A folder scan where one name is a link to another file of the folder.
  const std::string e4 = error_of([&] { read_dataset((dir.path / "imgs").string()); });
  EXPECT_NE(e4.find(dir / "imgs/hard.mha" + " is the same file as " + dir / "imgs/c.mha"), std::string::npos) << e4;
  fs::remove(dir.path / "imgs/hard.mha");
  const std::string e5 = error_of([&] { read_dataset((dir.path / "imgs").string()); });
  EXPECT_NE(e5.find(dir / "imgs/link.nii.gz" + " is the same file as " + dir / "imgs/a.nii.gz"), std::string::npos)
      << e5;
  // DICOM: one folder, the same series (or one entry naming none); different series are fine.
  fs::create_directories(dir.path / "dcm");
  write_text(dir / "dcm/IM1.dcm", "x");
  write_text(dir / "dicom_same.json", R"({"training": [{"image": "dcm", "series_uid": "1.2.3"}],
                                          "validation": [{"image": "dcm/"}]})");
  const std::string e6 = error_of([&] { read_dataset(dir / "dicom_same.json"); });
  EXPECT_NE(e6.find("same DICOM series"), std::string::npos) << e6;
  write_text(dir / "dicom_two.json", R"({"training": [{"image": "dcm", "series_uid": "1.2.3"},
                                                      {"image": "dcm", "series_uid": "1.2.4"}]})");
  EXPECT_EQ(read_dataset(dir / "dicom_two.json").training.size(), 2u);
  write_text(dir / "dicom_dup.json", R"({"training": [{"image": "dcm", "series_uid": "1.2.3"},
                                                      {"image": "./dcm", "series_uid": "1.2.3"}]})");
  EXPECT_NE(error_of([&] { read_dataset(dir / "dicom_dup.json"); }).find("\"training\"[1]"), std::string::npos);
}

TEST_F(DatasetFiles, FolderScanListsLinkLoopsAndBrokenLinksForTheCheckToRefuse) {
  namespace fs = std::filesystem;
  const fs::path imgs = dir.path / "imgs";
  fs::create_symlink("loop.nii.gz", imgs / "loop.nii.gz");  // points at itself
  fs::create_symlink("cyc_b", imgs / "cyc_a");              // a two-link cycle, no extension: maybe DICOM
  fs::create_symlink("cyc_a", imgs / "cyc_b");
  fs::create_symlink("nowhere.nii.gz", imgs / "broken.nii.gz");
  fs::create_symlink("notes.txt", imgs / "notes.txt");  // a loop that cannot be a volume: ignored
  fs::create_directories(imgs / "lost+found");
  DatasetSplit s;
  ASSERT_NO_THROW(s = read_dataset(imgs.string()));
  std::vector<std::string> names;
  for (const auto& e : s.training) names.push_back(fs::path(e.paths[0]).filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"a.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz", "broken.nii.gz", "c.mha",
                                             "cyc_a", "cyc_b", "loop.nii.gz", "v.nrrd"}));
  std::string cause;
  const std::string loop = path_problem((imgs / "loop.nii.gz").string(), &cause);
  EXPECT_NE(loop.find("symbolic link loop"), std::string::npos) << loop;
  EXPECT_EQ(cause, "symlink loop");
  const std::string broken = path_problem((imgs / "broken.nii.gz").string(), &cause);
  EXPECT_NE(broken.find("broken symbolic link"), std::string::npos) << broken;
  EXPECT_NE(broken.find("nowhere.nii.gz"), std::string::npos) << broken;
  EXPECT_EQ(cause, "missing file");
  EXPECT_EQ(path_problem((imgs / "a.nii.gz").string()), "");
  // A list naming a loop says so (not "not found"), and so does a looping dataset path.
  write_text(dir / "loop.txt", "imgs/a.nii.gz\nimgs/loop.nii.gz\n");
  const std::string e1 = error_of([&] { read_dataset(dir / "loop.txt"); });
  EXPECT_NE(e1.find("loop.nii.gz: symbolic link loop"), std::string::npos) << e1;
  EXPECT_EQ(cause_of([&] { read_dataset(dir / "loop.txt"); }), "symlink loop");
  fs::create_symlink("self.json", dir.path / "self.json");
  const std::string e2 = error_of([&] { read_dataset(dir / "self.json"); });
  EXPECT_NE(e2.find("symbolic link loop"), std::string::npos) << e2;
  EXPECT_NE(e2.find("data.dataset"), std::string::npos) << e2;
}

TEST_F(DatasetFiles, UnreadableSubfolderIsListedNotDropped) {
  namespace fs = std::filesystem;
  if (::geteuid() == 0) GTEST_SKIP() << "root reads every folder";
  fs::create_directories(dir.path / "imgs/locked");
  fs::permissions(dir.path / "imgs/locked", fs::perms::none);
  DatasetSplit s;
  ASSERT_NO_THROW(s = read_dataset((dir.path / "imgs").string()));
  std::string cause;
  EXPECT_NE(path_problem(dir / "imgs/locked", &cause).find("cannot read the folder"), std::string::npos);
  EXPECT_EQ(cause, "permission denied");
  fs::permissions(dir.path / "imgs/locked", fs::perms::owner_all);
  EXPECT_EQ(s.training.size(), 6u);
}

// pydicom's test files: CT_small.dcm and MR_small.dcm are one slice each of two series.
const char* kPydicomFiles = "/usr/lib/python3/dist-packages/pydicom/data/test_files";

TEST_F(DatasetFiles, DicomFolderGivenAsTheDatasetIsItsSeries) {
  namespace fs = std::filesystem;
  const fs::path ct = fs::path(kPydicomFiles) / "CT_small.dcm", mr = fs::path(kPydicomFiles) / "MR_small.dcm";
  if (!fs::exists(ct) || !fs::exists(mr)) GTEST_SKIP() << "python3-pydicom's test files not installed";
  fs::create_directories(dir.path / "series");
  fs::copy_file(ct, dir.path / "series/IM0001");
  const DatasetSplit s = read_dataset(dir / "series");
  ASSERT_EQ(s.training.size(), 1u);
  EXPECT_EQ(s.training[0].paths, std::vector<std::string>{dir / "series"});
  EXPECT_EQ(s.training[0].series_uid, "");
  // Two series: say so, name both UIDs and how to pick one.
  fs::copy_file(mr, dir.path / "series/IM0002");
  const std::string e = error_of([&] { read_dataset(dir / "series"); });
  EXPECT_NE(e.find("2 DICOM series"), std::string::npos) << e;
  EXPECT_NE(e.find("\"series_uid\""), std::string::npos) << e;
  const auto series = list_dicom_series(dir / "series");
  ASSERT_EQ(series.size(), 2u);
  for (const auto& one : series) EXPECT_NE(e.find(one.uid), std::string::npos) << one.uid << " not in " << e;
  EXPECT_EQ(e.find("no training volumes"), std::string::npos) << e;
  EXPECT_EQ(cause_of([&] { read_dataset(dir / "series"); }), "ambiguous DICOM series");
}

TEST(Split, DeterministicAndBounded) {
  DatasetSplit s;
  for (int i = 0; i < 20; ++i) s.training.push_back({{"v" + std::to_string(i)}, ""});
  const DatasetSplit a = split_validation(s, 0.25, 7), b = split_validation(s, 0.25, 7),
                     c = split_validation(s, 0.25, 8);
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
