// Tests for trainer/datasets.h on the real Debian data sets (installed by
// scripts/install-deps.sh) and on small files the test writes itself.
#include "trainer/datasets.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <fstream>

namespace splitq::trainer {
namespace {

std::string TempPath(const std::string& name) {
  return (::testing::TempDir().empty() ? std::string("/tmp/") : ::testing::TempDir()) + name;
}

// The data packages are installed by scripts/install-deps.sh on developer machines and CI;
// an offline GPU host may not have them.
#define SKIP_UNLESS_EXISTS(path, package)                                              \
  do {                                                                                 \
    if (access(path, R_OK) != 0) GTEST_SKIP() << path << " missing: install " package; \
  } while (false)

TEST(FashionMnist, LoadsBothSplitsWithTheRightShapes) {
  SKIP_UNLESS_EXISTS(kFashionMnistDir, "dataset-fashion-mnist");
  auto train = LoadFashionMnist(true);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->pixels.sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  EXPECT_EQ(train->pixels.scalar_type(), at::kByte);
  EXPECT_EQ(train->labels.numel(), 60000);
  const at::Tensor images = ImagesFromPixels(train->pixels.slice(0, 0, 100));
  EXPECT_EQ(images.scalar_type(), at::kFloat);
  EXPECT_GE(images.min().item<float>(), 0.0f);
  EXPECT_LE(images.max().item<float>(), 1.0f);
  EXPECT_GT(images.max().item<float>(), 0.9f);  // scaled by 1/255, not by some other factor
  // Fashion-MNIST is balanced: 6000 of each class in train.
  const at::Tensor counts = at::bincount(train->labels);
  EXPECT_TRUE((counts == 6000).all().item<bool>()) << counts;
  auto test = LoadFashionMnist(false);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->labels.numel(), 10000);
}

TEST(FashionMnist, MissingDirectoryNamesThePackage) {
  auto missing = LoadFashionMnist(true, "/nonexistent");
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("dataset-fashion-mnist"), std::string::npos);
}

TEST(Idx, RejectsTruncatedAndWrongTypeFiles) {
  const std::string path = TempPath("splitq_bad.idx");
  {
    std::ofstream f(path, std::ios::binary);
    const unsigned char header[] = {0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3};  // claims 10, has 3
    f.write(reinterpret_cast<const char*>(header), sizeof(header));
  }
  EXPECT_EQ(ReadIdxU8(path).status().code(), absl::StatusCode::kInvalidArgument);
  {
    std::ofstream f(path, std::ios::binary);
    const unsigned char header[] = {0, 0, 0x0D, 1, 0, 0, 0, 1, 1, 2, 3, 4};  // float32 type
    f.write(reinterpret_cast<const char*>(header), sizeof(header));
  }
  EXPECT_EQ(ReadIdxU8(path).status().code(), absl::StatusCode::kInvalidArgument);
  {
    std::ofstream f(path, std::ios::binary);
    const unsigned char header[] = {0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3, 4};  // claims 3, has 4
    f.write(reinterpret_cast<const char*>(header), sizeof(header));
  }
  auto longer = ReadIdxU8(path);
  EXPECT_EQ(longer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(longer.status().message().find("claims 3 bytes of data, file has more than 3"),
            std::string::npos)
      << longer.status();
  std::remove(path.c_str());
}

TEST(Idx, ReadsTheDimensionsAndTheBytes) {
  const std::string path = TempPath("splitq_good.idx");
  {
    std::ofstream f(path, std::ios::binary);
    const unsigned char file[] = {0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6};
    f.write(reinterpret_cast<const char*>(file), sizeof(file));
  }
  auto idx = ReadIdxU8(path);
  ASSERT_TRUE(idx.ok()) << idx.status();
  EXPECT_EQ(idx->dims, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(idx->data, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));
  std::remove(path.c_str());
}

TEST(TextCorpus, BibleHasNoVerseReferences) {
  SKIP_UNLESS_EXISTS("/usr/bin/bible", "bible-kjv");
  auto text = LoadTextCorpus("bible-kjv");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_GT(text->size(), 4'000'000u);
  EXPECT_EQ(text->rfind("In the beginning God created the heaven and the earth.\n", 0), 0u);
  EXPECT_EQ(text->find("Ge1:1"), std::string::npos);
}

TEST(TextCorpus, GcideReadsAsText) {
  SKIP_UNLESS_EXISTS(kGcidePath, "dict-gcide");
  auto text = LoadTextCorpus("gcide");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_GT(text->size(), 10'000'000u);
  EXPECT_NE(text->find("Collaborative International Dictionary of English"), std::string::npos);
}

TEST(TextCorpus, UserFilesPlainAndGzip) {
  const std::string plain = TempPath("splitq_corpus.txt"), gz = TempPath("splitq_corpus.txt.gz");
  {
    std::ofstream f(plain);
    f << "hello world\n";
  }
  gzFile g = gzopen(gz.c_str(), "wb");
  gzputs(g, "hello gzip\n");
  gzclose(g);
  EXPECT_EQ(*LoadTextCorpus(plain), "hello world\n");
  EXPECT_EQ(*LoadTextCorpus(gz), "hello gzip\n");
  EXPECT_EQ(LoadTextCorpus(TempPath("no_such_corpus")).status().code(),
            absl::StatusCode::kNotFound);
  std::remove(plain.c_str());
  std::remove(gz.c_str());
}

TEST(TextCorpus, SplitIsDeterministicAndCutsAtANewline) {
  std::string text;
  for (int i = 0; i < 1000; ++i) text += "line " + std::to_string(i) + "\n";
  const TextSplit a = SplitText(text, 0.1), b = SplitText(text, 0.1);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.train + a.validation, text);
  EXPECT_EQ(a.train.back(), '\n');
  EXPECT_NEAR(static_cast<double>(a.validation.size()) / text.size(), 0.1, 0.01);
  std::string taken = text;
  const TextSplit c = SplitText(std::move(taken), 0.1);  // takes the text over: the same split
  EXPECT_EQ(c.train, a.train);
  EXPECT_EQ(c.validation, a.validation);
}

TEST(TextCorpus, ByteWindowsAreReproducibleAndInRange) {
  const std::string text = "abcdefghijklmnopqrstuvwxyz";
  const at::Tensor a = SampleByteWindows(text, 8, 5, 1, 2);
  const at::Tensor b = SampleByteWindows(text, 8, 5, 1, 2);
  const at::Tensor c = SampleByteWindows(text, 8, 5, 1, 3);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, c));
  // Each window is 5 consecutive letters.
  EXPECT_TRUE((a.slice(1, 1) - a.slice(1, 0, 4) == 1).all().item<bool>());
  EXPECT_THROW(SampleByteWindows("ab", 1, 5, 0, 0), c10::Error);
}

}  // namespace
}  // namespace splitq::trainer
