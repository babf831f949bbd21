#include "trainer/batches.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/philox.h"

namespace splitq::trainer::internal {

absl::StatusOr<Data> Data::Load(const RunConfig& c, const Shard& shard) {
  if (shard.count < 1 || shard.index < 0 || shard.index >= shard.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", shard.index, "/", shard.count, ": need 0 <= index < count"));
  }
  Data d;
  d.config_ = c;
  d.shard_ = shard;
  if (c.task == Task::kFashionMnist) {
    SPLITQ_ASSIGN_OR_RETURN(d.train_, LoadFashionMnist(true));
    SPLITQ_ASSIGN_OR_RETURN(d.test_, LoadFashionMnist(false));
    d.samples_ = d.train_.labels.size(0);
    if (shard.count > 1 && d.samples_ >= shard.count) {  // keep this shard's samples only
      for (at::Tensor* t : {&d.train_.pixels, &d.train_.labels}) {
        *t = t->slice(0, shard.index, d.samples_, shard.count).contiguous();
      }
    }
  } else {
    SPLITQ_ASSIGN_OR_RETURN(std::string text, LoadTextCorpus(c.corpus));
    d.text_ = SplitText(std::move(text), c.validation_fraction);
    if (static_cast<int64_t>(d.text_.validation.size()) <= c.context + 1) {
      return absl::InvalidArgumentError("data.validation_fraction leaves too little text");
    }
    d.samples_ = ByteWindowCount(d.text_.train.size(), c.context + 1);
    if (d.samples_ < 1) {
      return absl::InvalidArgumentError(absl::StrCat("data.corpus: ", c.corpus,
                                                     " has less training text than one window of ",
                                                     c.context + 1, " bytes"));
    }
  }
  if (d.samples_ < shard.count) {
    return absl::InvalidArgumentError(absl::StrCat("shard count ", shard.count, " exceeds the ",
                                                   d.samples_, " training samples"));
  }
  return d;
}

Batch Data::Train(int64_t step) const {
  const RunConfig& c = config_;
  // Samples index, index + count, ...: the shard's share of the data set.
  const uint64_t in_shard =
      static_cast<uint64_t>((samples_ - shard_.index + shard_.count - 1) / shard_.count);
  at::Tensor ids = at::empty({c.batch_size}, at::kLong);
  at::Tensor local = at::empty({c.batch_size}, at::kLong);  // the shard's sample number
  for (int64_t b = 0; b < c.batch_size; ++b) {
    const kernels::Philox4 r = kernels::PhiloxBlock(c.seed, static_cast<uint64_t>(step), b);
    const uint64_t draw = (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
    local.data_ptr<int64_t>()[b] = static_cast<int64_t>(draw % in_shard);
    ids.data_ptr<int64_t>()[b] = local.data_ptr<int64_t>()[b] * shard_.count + shard_.index;
  }
  if (c.task == Task::kFashionMnist) {
    return Batch{ImagesFromPixels(train_.pixels.index_select(0, local)),
                 train_.labels.index_select(0, local), ids};
  }
  const at::Tensor w = ByteWindowsAt(text_.train, ids, c.context + 1);
  return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), ids};
}

// 100 examples: a client's validation forward at 500 had peaked 150 MiB above its training
// steps (the CNN's first blocks at full resolution); at 100 the passes cost no more memory than
// a training step, and the whole test set is still 100 even batches.
constexpr int64_t kImageValidationBatch = 100;

int64_t Data::ValidationBatches() const {
  if (config_.task != Task::kFashionMnist) return 16;
  return (test_.labels.size(0) + kImageValidationBatch - 1) / kImageValidationBatch;
}

Batch Data::ValidationBatch(int64_t i) const {
  const RunConfig& c = config_;
  if (c.task == Task::kFashionMnist) {
    const int64_t a = i * kImageValidationBatch;
    const int64_t b = std::min(test_.labels.size(0), a + kImageValidationBatch);
    return Batch{ImagesFromPixels(test_.pixels.slice(0, a, b)), test_.labels.slice(0, a, b), {}};
  }
  const at::Tensor w = SampleByteWindows(text_.validation, c.batch_size, c.context + 1,
                                         c.seed ^ 0x5eed, static_cast<uint64_t>(i));
  return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), {}};
}

}  // namespace splitq::trainer::internal
