// splitq trainer: the real data sets a run trains on, read from Debian packages.
//
//   Fashion-MNIST   IDX files of `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist):
//                   60000 train and 10000 test images, 28x28 grey, 10 classes.
//   bible-kjv       the King James Bible, as `bible -f "Gen1:1-Rev22:21"` prints it (package
//                   `bible-kjv`), verse references removed: ~4.3 MB of English text.
//   gcide           the GCIDE dictionary (/usr/share/dictd/gcide.dict.dz, package `dict-gcide`),
//                   read as gzip: ~55 MB of text.
//   any file        a user's own plain-text or gzip file, named by path.
// A missing data set is a NOT_FOUND error that names the Debian package to install.
// Hosts without the packages (an air-gapped GPU host): `splitq data export DIR` on a Debian
// machine writes DIR/{fashion-mnist/*.gz, gcide.dict.dz, bible-kjv.txt.gz}; with the
// environment variable SPLITQ_DATA_DIR=DIR the loaders below read from there instead.
// Train/validation splits are deterministic: Fashion-MNIST has its own test set; a text
// corpus keeps its last `validation_fraction` of bytes for validation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::trainer {

inline constexpr char kFashionMnistDir[] = "/usr/share/datasets/fashion-mnist";
inline constexpr char kGcidePath[] = "/usr/share/dictd/gcide.dict.dz";

// An IDX array (LeCun's format): unsigned bytes with their dimensions.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

// Reads an IDX file of unsigned bytes (type 0x08), plain or gzip. INVALID_ARGUMENT for a bad
// magic, an element type other than u8, or a size that does not match the dimensions;
// NOT_FOUND when the file is missing.
absl::StatusOr<IdxArray> ReadIdxU8(const std::string& path);

struct ImageDataset {
  at::Tensor pixels;  // uint8 [N, 1, 28, 28] as stored (a quarter of the floats' memory)
  at::Tensor labels;  // int64 [N], classes 0..9
};

// The model's input for some of `pixels`: float32, values in [0, 1] (pixel / 255).
at::Tensor ImagesFromPixels(const at::Tensor& pixels);

// Fashion-MNIST's train (60000) or test (10000) split from `dir`.
absl::StatusOr<ImageDataset> LoadFashionMnist(bool train,
                                              const std::string& dir = kFashionMnistDir);

// The bytes of a text corpus: "bible-kjv", "gcide", or a file path (plain or gzip).
absl::StatusOr<std::string> LoadTextCorpus(const std::string& source);

struct TextSplit {
  std::string train;
  std::string validation;
};
// The last `validation_fraction` (0 < f < 1) of the bytes, cut at a newline when one lies
// within 1 KiB, is the validation text.
TextSplit SplitText(const std::string& text, double validation_fraction);
// The same, taking the text over: its train part is not copied (55 MB for GCIDE).
TextSplit SplitText(std::string&& text, double validation_fraction);

// `batch` windows of `length` consecutive bytes of `text` as int64 [batch, length], the
// window starts drawn from a generator keyed by (seed, step): the same arguments give the
// same batch, on any machine. Requires text.size() >= length.
at::Tensor SampleByteWindows(const std::string& text, int64_t batch, int64_t length, uint64_t seed,
                             uint64_t step);

// Writes the three data sets, from their Debian packages, into `dir` (see above).
absl::Status ExportDataSets(const std::string& dir);

// A text seen as a fixed set of samples (what AQ-SGD's per-sample cache needs): window i holds
// bytes [i * (length - 1), i * (length - 1) + length), so consecutive windows share one byte
// and every byte after the first is a prediction target exactly once.
// ByteWindowCount: how many whole windows fit (0 when text.size() < length; length >= 2).
int64_t ByteWindowCount(size_t text_size, int64_t length);
// The windows `ids` (int64 [batch], each in [0, ByteWindowCount)) as int64 [batch, length].
at::Tensor ByteWindowsAt(const std::string& text, const at::Tensor& ids, int64_t length);

}  // namespace splitq::trainer
