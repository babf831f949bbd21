// splitq trainer, internal: the batches of a run. Training batches are drawn from Philox keyed
// by (seed, step), so a run is a pure function of its config and a resumed run sees the same
// batches; a client draws only from its shard of the training set (DataShard, split_link.h).
//
// Not a public API: include it only from trainer/*.cc.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/datasets.h"
#include "trainer/split_link.h"

namespace splitq::trainer::internal {

struct Batch {
  at::Tensor inputs, targets, ids;
};

using Shard = DataShard;

// Training and validation batches, drawn deterministically from (seed, step).
class Data {
 public:
  static absl::StatusOr<Data> Load(const RunConfig& c, const Shard& shard = {});
  Batch Train(int64_t step) const;
  // Validation batches: the whole test set in batches of 500 (fmnist) or 16 fixed batches of
  // windows (lm). ValidationBatch(i) makes batch i when asked (nothing is kept).
  int64_t ValidationBatches() const;
  Batch ValidationBatch(int64_t i) const;

 private:
  RunConfig config_;
  Shard shard_;
  int64_t samples_ = 0;
  ImageDataset train_, test_;  // train_: only this shard's samples (index, index + count, ...)
  TextSplit text_;
};

}  // namespace splitq::trainer::internal
