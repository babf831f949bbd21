#include "trainer/datasets.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/philox.h"

namespace splitq::trainer {
namespace {

bool FileExists(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  std::fclose(f);
  return true;
}

// The size a file will have once read: a gzip file's trailer holds its inflated size (mod
// 2^32), capped below; a plain file its own size. A hint only, so that reading 55 MB of text
// holds 55 MB, not a doubling string's 64 + 32.
size_t InflatedSizeHint(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), std::fclose);
  if (!f || std::fseek(f.get(), 0, SEEK_END) != 0) return 0;
  const long size = std::ftell(f.get());
  unsigned char magic[2] = {0, 0}, trailer[4] = {0, 0, 0, 0};
  if (size < 18 || std::fseek(f.get(), 0, SEEK_SET) != 0 || std::fread(magic, 1, 2, f.get()) != 2) {
    return size > 0 ? static_cast<size_t>(size) : 0;
  }
  if (magic[0] != 0x1f || magic[1] != 0x8b) return static_cast<size_t>(size);
  if (std::fseek(f.get(), size - 4, SEEK_SET) != 0 || std::fread(trailer, 1, 4, f.get()) != 4) {
    return 0;
  }
  const uint64_t inflated = trailer[0] | (trailer[1] << 8) | (trailer[2] << 16) |
                            (static_cast<uint64_t>(trailer[3]) << 24);
  // A truncated file's last bytes are not a trailer: keep the hint modest (text inflates 3-5x)
  // so that a wrong one costs little; the string still grows past it when it must.
  return static_cast<size_t>(
      std::min<uint64_t>({inflated, static_cast<uint64_t>(size) * 16, uint64_t{1} << 30}));
}

// Whole file through zlib, which reads plain files unchanged and gzip files inflated.
absl::StatusOr<std::string> ReadMaybeGzip(const std::string& path) {
  if (!FileExists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  std::unique_ptr<gzFile_s, int (*)(gzFile)> file(gzopen(path.c_str(), "rb"), gzclose);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string out;
  try {
    out.reserve(InflatedSizeHint(path));
  } catch (const std::bad_alloc&) {  // only a hint: grow as the bytes come
  }
  std::vector<char> buffer(1 << 20);
  while (true) {
    const int n = gzread(file.get(), buffer.data(), static_cast<unsigned>(buffer.size()));
    if (n < 0) {
      int errnum = 0;
      return absl::DataLossError(absl::StrCat(path, ": ", gzerror(file.get(), &errnum)));
    }
    if (n == 0) break;
    out.append(buffer.data(), static_cast<size_t>(n));
  }
  return out;
}

uint32_t BigEndian32(const std::string& bytes, size_t at) {
  return (static_cast<uint32_t>(static_cast<uint8_t>(bytes[at])) << 24) |
         (static_cast<uint32_t>(static_cast<uint8_t>(bytes[at + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<uint8_t>(bytes[at + 2])) << 8) |
         static_cast<uint32_t>(static_cast<uint8_t>(bytes[at + 3]));
}

absl::StatusOr<std::string> RunBible() {
  // The whole book, one verse a line, each line "Ge1:1 In the beginning ...".
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> pipe(
      popen("bible -f 'Gen1:1-Rev22:21' 2>/dev/null", "r"), pclose);
  if (!pipe) return absl::NotFoundError("cannot run `bible`: install the Debian package bible-kjv");
  std::string raw;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe.get())) > 0) raw.append(buffer, n);
  const int rc = pclose(pipe.release());
  if (rc != 0 || raw.empty()) {
    return absl::NotFoundError("`bible -f` printed nothing (exit status " + std::to_string(rc) +
                               "): install the Debian package bible-kjv");
  }
  std::string text;
  text.reserve(raw.size());
  size_t start = 0;
  while (start < raw.size()) {
    size_t end = raw.find('\n', start);
    if (end == std::string::npos) end = raw.size();
    std::string line = raw.substr(start, end - start);
    // Drop the verse reference: the first word, when it looks like "Ge1:1" or "1Co13:4".
    const size_t space = line.find(' ');
    if (space != std::string::npos && space > 0 && line.find(':') < space &&
        std::isdigit(static_cast<unsigned char>(line[space - 1]))) {
      line.erase(0, space + 1);
    }
    if (!line.empty()) {
      text += line;
      text += '\n';
    }
    start = end + 1;
  }
  return text;
}

// SPLITQ_DATA_DIR, or empty.
std::string DataDir() {
  const char* dir = std::getenv("SPLITQ_DATA_DIR");
  return dir == nullptr ? std::string() : std::string(dir);
}

}  // namespace

absl::StatusOr<IdxArray> ReadIdxU8(const std::string& path) {
  // Streamed: the header first, then the data straight into a buffer of its exact size, so
  // that reading 47 MB of images holds 47 MB (a whole-file string and a copy held three times
  // that for a moment, which a client's peak memory kept).
  if (!FileExists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  std::unique_ptr<gzFile_s, int (*)(gzFile)> file(gzopen(path.c_str(), "rb"), gzclose);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  // Reads exactly `size` bytes; the count read (short at the end of the file), or -1.
  auto read = [&](void* into, size_t size) -> int64_t {
    size_t done = 0;
    while (done < size) {
      const unsigned ask = static_cast<unsigned>(std::min<size_t>(size - done, 1u << 30));
      const int n = gzread(file.get(), static_cast<char*>(into) + done, ask);
      if (n < 0) return -1;
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    return static_cast<int64_t>(done);
  };
  auto read_error = [&] {
    int errnum = 0;
    return absl::DataLossError(absl::StrCat(path, ": ", gzerror(file.get(), &errnum)));
  };
  std::string head(4, '\0');
  const int64_t got = read(head.data(), 4);
  if (got < 0) return read_error();
  if (got < 4) return absl::InvalidArgumentError(path + ": too short for an IDX header");
  const uint32_t magic = BigEndian32(head, 0);
  if ((magic >> 16) != 0) return absl::InvalidArgumentError(path + ": not an IDX file (bad magic)");
  if (((magic >> 8) & 0xff) != 0x08) {
    return absl::InvalidArgumentError(path + ": IDX element type is not unsigned byte");
  }
  const size_t rank = magic & 0xff;
  if (rank == 0 || rank > 4) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": bad IDX rank ", rank));
  }
  std::string dims(4 * rank, '\0');
  const int64_t got_dims = read(dims.data(), dims.size());
  if (got_dims < 0) return read_error();
  if (got_dims < static_cast<int64_t>(dims.size())) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": bad IDX rank ", rank));
  }
  IdxArray out;
  int64_t count = 1;
  constexpr int64_t kMaxBytes = int64_t{1} << 40;
  for (size_t d = 0; d < rank; ++d) {
    const int64_t dim = BigEndian32(dims, 4 * d);
    out.dims.push_back(dim);
    if (dim != 0 && count > kMaxBytes / dim) {  // checked before it could overflow
      return absl::InvalidArgumentError(absl::StrCat(path, ": header claims over 2^40 bytes"));
    }
    count *= dim;
  }
  // Read in steps of at most 64 MiB, so a header that claims more than the file holds
  // allocates no more than the file has (plus one step).
  constexpr int64_t kStep = int64_t{64} << 20;
  int64_t have = 0;
  while (have < count) {
    const int64_t want = std::min(kStep, count - have);
    out.data.resize(static_cast<size_t>(have + want));
    const int64_t n = read(out.data.data() + have, static_cast<size_t>(want));
    if (n < 0) return read_error();
    have += n;
    if (n < want) break;
  }
  char extra = 0;
  const int64_t more = have == count ? read(&extra, 1) : 0;
  if (more < 0) return read_error();
  if (have != count || more > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header claims ", count, " bytes of data, file has ",
                     more > 0 ? absl::StrCat("more than ", count) : absl::StrCat(have)));
  }
  return out;
}

at::Tensor ImagesFromPixels(const at::Tensor& pixels) { return pixels.to(at::kFloat) / 255.0; }

absl::StatusOr<ImageDataset> LoadFashionMnist(bool train, const std::string& default_dir) {
  const std::string dir = default_dir == kFashionMnistDir && !DataDir().empty()
                              ? DataDir() + "/fashion-mnist"
                              : default_dir;
  const std::string prefix = dir + "/" + (train ? "train" : "t10k");
  const std::string images_path = prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = prefix + "-labels-idx1-ubyte.gz";
  if (!FileExists(images_path) || !FileExists(labels_path)) {
    return absl::NotFoundError(absl::StrCat(
        "Fashion-MNIST not found in ", dir,
        ": install the Debian package dataset-fashion-mnist (or point SPLITQ_DATA_DIR at a "
        "folder made by `splitq data export`)"));
  }
  auto images = ReadIdxU8(images_path);
  if (!images.ok()) return images.status();
  auto labels = ReadIdxU8(labels_path);
  if (!labels.ok()) return labels.status();
  if (images->dims.size() != 3 || images->dims[1] != 28 || images->dims[2] != 28 ||
      labels->dims.size() != 1 || labels->dims[0] != images->dims[0]) {
    return absl::InvalidArgumentError(dir + ": image and label files do not match");
  }
  const int64_t n = images->dims[0];
  ImageDataset out;
  // The tensor takes the bytes over (no copy).
  auto owned = std::make_unique<std::vector<uint8_t>>(std::move(images->data));
  std::vector<uint8_t>* bytes = owned.get();
  out.pixels = at::from_blob(
      bytes->data(), {n, 1, 28, 28}, [bytes](void*) { delete bytes; }, at::kByte);
  owned.release();  // the tensor's deleter owns it now
  out.labels = at::from_blob(labels->data.data(), {n}, at::kByte).to(at::kLong);
  if (out.labels.max().item<int64_t>() > 9) {
    return absl::InvalidArgumentError(labels_path + ": a label is above 9");
  }
  return out;
}

absl::StatusOr<std::string> LoadTextCorpus(const std::string& source) {
  const std::string exported = DataDir();
  if (!exported.empty() && (source == "bible-kjv" || source == "gcide")) {
    const std::string path =
        exported + (source == "gcide" ? "/gcide.dict.dz" : "/bible-kjv.txt.gz");
    if (!FileExists(path)) {
      return absl::NotFoundError(absl::StrCat(
          path, " is missing (SPLITQ_DATA_DIR is set; make it with `splitq data export`)"));
    }
    return ReadMaybeGzip(path);
  }
  if (source == "bible-kjv") return RunBible();
  if (source == "gcide") {
    if (!FileExists(kGcidePath)) {
      return absl::NotFoundError(
          absl::StrCat(kGcidePath, " is missing: install the Debian package dict-gcide"));
    }
    return ReadMaybeGzip(kGcidePath);
  }
  auto text = ReadMaybeGzip(source);
  if (!text.ok()) return text.status();
  if (text->empty()) return absl::InvalidArgumentError(source + ": the corpus is empty");
  return text;
}

namespace {
size_t ValidationCut(const std::string& text, double validation_fraction) {
  const double f = std::min(0.99, std::max(0.01, validation_fraction));
  size_t cut = static_cast<size_t>(static_cast<double>(text.size()) * (1.0 - f));
  const size_t newline = text.find('\n', cut);
  if (newline != std::string::npos && newline - cut < 1024) cut = newline + 1;
  return cut;
}
}  // namespace

TextSplit SplitText(const std::string& text, double validation_fraction) {
  const size_t cut = ValidationCut(text, validation_fraction);
  return TextSplit{text.substr(0, cut), text.substr(cut)};
}

TextSplit SplitText(std::string&& text, double validation_fraction) {
  const size_t cut = ValidationCut(text, validation_fraction);
  TextSplit out;
  out.validation = text.substr(cut);
  text.resize(cut);
  out.train = std::move(text);
  return out;
}

at::Tensor SampleByteWindows(const std::string& text, int64_t batch, int64_t length, uint64_t seed,
                             uint64_t step) {
  TORCH_CHECK(length >= 1 && static_cast<int64_t>(text.size()) >= length, "text of ", text.size(),
              " bytes is shorter than a window of ", length);
  const uint64_t starts = text.size() - static_cast<uint64_t>(length) + 1;
  at::Tensor out = at::empty({batch, length}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const kernels::Philox4 draw = kernels::PhiloxBlock(seed, step, static_cast<uint64_t>(b));
    const uint64_t r = (static_cast<uint64_t>(draw.v[0]) << 32) | draw.v[1];
    const uint64_t start = r % starts;
    for (int64_t t = 0; t < length; ++t) p[b * length + t] = static_cast<uint8_t>(text[start + t]);
  }
  return out;
}

int64_t ByteWindowCount(size_t text_size, int64_t length) {
  TORCH_CHECK(length >= 2, "a window needs at least 2 bytes, got ", length);
  if (static_cast<int64_t>(text_size) < length) return 0;
  return (static_cast<int64_t>(text_size) - length) / (length - 1) + 1;
}

at::Tensor ByteWindowsAt(const std::string& text, const at::Tensor& ids, int64_t length) {
  const int64_t count = ByteWindowCount(text.size(), length);
  const at::Tensor id = ids.to(at::kLong).contiguous();
  at::Tensor out = at::empty({id.numel(), length}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < id.numel(); ++b) {
    const int64_t i = id.data_ptr<int64_t>()[b];
    TORCH_CHECK(i >= 0 && i < count, "window ", i, " is outside 0..", count - 1);
    const char* src = text.data() + i * (length - 1);
    for (int64_t t = 0; t < length; ++t) p[b * length + t] = static_cast<uint8_t>(src[t]);
  }
  return out;
}

absl::Status ExportDataSets(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(dir) / "fashion-mnist", ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(dir, ": ", ec.message()));
  for (const char* name : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}) {
    const std::filesystem::path from = std::filesystem::path(kFashionMnistDir) / name;
    if (!FileExists(from.string())) {
      return absl::NotFoundError(
          absl::StrCat(from.string(), " is missing: install dataset-fashion-mnist"));
    }
    std::filesystem::copy_file(from, std::filesystem::path(dir) / "fashion-mnist" / name,
                               std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat(from.string(), ": ", ec.message()));
  }
  if (!FileExists(kGcidePath)) {
    return absl::NotFoundError(absl::StrCat(kGcidePath, " is missing: install dict-gcide"));
  }
  std::filesystem::copy_file(kGcidePath, std::filesystem::path(dir) / "gcide.dict.dz",
                             std::filesystem::copy_options::overwrite_existing, ec);
  if (ec) return absl::InternalError(absl::StrCat(kGcidePath, ": ", ec.message()));
  SPLITQ_ASSIGN_OR_RETURN(std::string bible, RunBible());
  const std::string path = (std::filesystem::path(dir) / "bible-kjv.txt.gz").string();
  gzFile out = gzopen(path.c_str(), "wb9");
  if (out == nullptr) return absl::InternalError(absl::StrCat(path, ": cannot write"));
  const int written = gzwrite(out, bible.data(), static_cast<unsigned>(bible.size()));
  if (gzclose(out) != Z_OK || written != static_cast<int>(bible.size())) {
    return absl::InternalError(absl::StrCat(path, ": write failed"));
  }
  return absl::OkStatus();
}

}  // namespace splitq::trainer
