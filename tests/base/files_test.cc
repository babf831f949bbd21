// Tests for base/files.h: atomic writes (contents, mode whatever the umask, replacing a file,
// no temporary left behind, a failure that leaves the target as it was) and small reads.
#include "base/files.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace splitq::base {
namespace {

namespace fs = std::filesystem;

class Files : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) / ("splitq_files_test_" + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  // The files in the test's folder other than `keep`: temporaries left behind.
  std::vector<std::string> Others(const std::vector<std::string>& keep) const {
    std::vector<std::string> others;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      const std::string name = entry.path().filename().string();
      if (std::find(keep.begin(), keep.end(), name) == keep.end()) others.push_back(name);
    }
    return others;
  }
  static std::string Slurp(const fs::path& path) {
    std::ifstream in(path);
    std::stringstream all;
    all << in.rdbuf();
    return all.str();
  }
  static mode_t ModeOf(const fs::path& path) {
    struct stat st {};
    EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
  }
  fs::path dir_;
};

TEST_F(Files, WritesReplacesAndSetsTheMode) {
  const mode_t old_umask = ::umask(077);
  ASSERT_TRUE(WriteFileAtomically(dir_ / "a", "first\n").ok());
  EXPECT_EQ(Slurp(dir_ / "a"), "first\n");
  EXPECT_EQ(ModeOf(dir_ / "a"), 0644u);  // the umask of 077 would have made it 0600
  ASSERT_TRUE(WriteFileAtomically(dir_ / "a", std::string(1 << 20, 'x'), 0600).ok());
  EXPECT_EQ(Slurp(dir_ / "a"), std::string(1 << 20, 'x'));
  EXPECT_EQ(ModeOf(dir_ / "a"), 0600u);
  EXPECT_TRUE(Others({"a"}).empty());
  ::umask(old_umask);
}

TEST_F(Files, AFailedWriteLeavesTheTargetAsItWas) {
  ASSERT_TRUE(WriteFileAtomically(dir_ / "a", "kept\n").ok());
  // The target is a non-empty folder: the rename fails, the temporary goes.
  fs::create_directories(dir_ / "folder");
  std::ofstream(dir_ / "folder" / "x") << "x";
  const absl::Status s = WriteFileAtomically(dir_ / "folder", "new\n");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_NE(s.message().find("folder: cannot replace it"), std::string::npos) << s;
  EXPECT_TRUE(Others({"a", "folder"}).empty());
  // A file planted where a fixed temporary name would be (a symlink to another file) is
  // neither written through nor renamed into place.
  std::ofstream(dir_ / "victim") << "victim\n";
  fs::permissions(dir_ / "victim", static_cast<fs::perms>(0644));
  fs::create_symlink(dir_ / "victim", dir_ / "a.tmp");
  ASSERT_TRUE(WriteFileAtomically(dir_ / "a", "kept\n", 0600).ok());
  EXPECT_EQ(Slurp(dir_ / "victim"), "victim\n");
  EXPECT_EQ(ModeOf(dir_ / "victim"), 0644u);
  EXPECT_FALSE(fs::is_symlink(dir_ / "a"));
  fs::remove(dir_ / "a.tmp");
  fs::remove(dir_ / "victim");
  // A missing folder: the temporary cannot be created.
  const absl::Status missing = WriteFileAtomically(dir_ / "nowhere" / "a", "x");
  EXPECT_EQ(missing.code(), absl::StatusCode::kInternal);
  EXPECT_NE(missing.message().find("cannot create it: No such file or directory"),
            std::string::npos)
      << missing;
  EXPECT_EQ(Slurp(dir_ / "a"), "kept\n");
}

TEST_F(Files, CommitFileReplacesTheTargetWithTheTemporary) {
  std::ofstream(dir_ / "a.tmp") << "from a writer of its own";
  ASSERT_TRUE(CommitFile(dir_ / "a.tmp", dir_ / "a").ok());
  EXPECT_EQ(Slurp(dir_ / "a"), "from a writer of its own");
  EXPECT_FALSE(fs::exists(dir_ / "a.tmp"));
  EXPECT_EQ(CommitFile(dir_ / "a.tmp", dir_ / "a").code(), absl::StatusCode::kInternal);
}

TEST_F(Files, ReadSmallFileNamesWhatIsWrong) {
  ASSERT_TRUE(WriteFileAtomically(dir_ / "a", "token\n").ok());
  EXPECT_EQ(*ReadSmallFile(dir_ / "a", "token file"), "token\n");
  EXPECT_EQ(ReadSmallFile(dir_ / "missing", "token file").status().code(),
            absl::StatusCode::kNotFound);
  auto folder = ReadSmallFile(dir_, "token file");
  EXPECT_EQ(folder.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(folder.status().message().find("a directory, not a token file"), std::string::npos);
  auto big = ReadSmallFile(dir_ / "a", "token file", 3);
  EXPECT_NE(big.status().message().find("more than the 3 bytes a token file may hold"),
            std::string::npos)
      << big.status();
}

// Secrets that the group or others may read or write are refused, naming the fix; private
// ones and pipes are read.
TEST_F(Files, ReadSecretFileRefusesSecretsOthersMayRead) {
  for (const mode_t mode : {0644u, 0640u, 0604u, 0622u, 0620u, 0602u}) {
    ASSERT_TRUE(WriteFileAtomically(dir_ / "key", "secret\n", mode).ok());
    auto open = ReadSecretFile(dir_ / "key", "private key");
    EXPECT_EQ(open.status().code(), absl::StatusCode::kFailedPrecondition) << mode;
    EXPECT_NE(open.status().message().find("chmod 600"), std::string::npos) << open.status();
  }
  // The message names who may read it.
  for (const auto& [mode, who] :
       std::vector<std::pair<mode_t, std::string>>{{0640u, "readable by its group ("},
                                                   {0604u, "readable by others ("},
                                                   {0666u, "readable by its group and others ("},
                                                   {0620u, "writable by its group ("}}) {
    ASSERT_TRUE(WriteFileAtomically(dir_ / "key", "secret\n", mode).ok());
    const absl::Status refused = ReadSecretFile(dir_ / "key", "private key").status();
    EXPECT_NE(refused.message().find(who), std::string::npos) << mode << ": " << refused;
  }
  ASSERT_TRUE(WriteFileAtomically(dir_ / "key", "secret\n", 0600).ok());
  EXPECT_EQ(*ReadSecretFile(dir_ / "key", "private key"), "secret\n");
  ASSERT_TRUE(WriteFileAtomically(dir_ / "key", "secret\n", 0400).ok());
  EXPECT_EQ(*ReadSecretFile(dir_ / "key", "private key"), "secret\n");
  EXPECT_EQ(ReadSecretFile(dir_ / "missing", "private key").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
// RemoveTree takes a folder with files and subfolders; a missing path is no error.
TEST(RemoveTree, RemovesAFolderWithItsFiles) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("splitq_tree_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir / "a" / "b");
  std::ofstream(dir / "a" / "b" / "f") << "x";
  std::ofstream(dir / "g") << "y";
  RemoveTree(dir.string());
  EXPECT_FALSE(std::filesystem::exists(dir));
  RemoveTree(dir.string());  // already gone
}

}  // namespace splitq::base
