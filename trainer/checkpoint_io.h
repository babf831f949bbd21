// splitq trainer, internal: checkpoint files. Every checkpoint the trainer writes (`splitq
// train`'s, a client's, a worker's) is a torch archive with a header (a version under its own
// key, the model's shape and state fields, counters, the driver's opaque state) and the
// parts' tensors: blocks as "block.<index in the whole model>", so any party's file can seed
// --init at any split point. Files are written through base::CommitFile (temporary file,
// fsync, rename, folder fsync).
//
// Not a public API: include it only from trainer/*.cc.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "trainer/config.h"
#include "trainer/models.h"
#include "trainer/step.h"

namespace splitq::trainer::internal {

// The index of lora.rank in StateFields (a checkpoint of a LoRA run cannot seed --init).
inline constexpr int kStateLoraRank = 2;

// The model's blocks in model order (client, server, head): the same list at any split point.
std::vector<std::shared_ptr<torch::nn::Module>> Blocks(const SplitModel& m);

// Checkpoint headers: what must agree between a checkpoint and the run that loads it.
using Fields = std::vector<std::pair<const char*, int64_t>>;
Fields ShapeFields(const RunConfig& c);  // the model's shape (for --init)
Fields StateFields(const RunConfig& c);  // the rest of the trainable state (for a resume)
at::Tensor FieldTensor(const Fields& fields);
absl::Status CheckFields(const std::string& path, const Fields& fields, const at::Tensor& stored);
// What every checkpoint kind holds besides its parts: a version under `version_key`, the shape
// and state fields, the counters and the driver's opaque state.
// `entropy`: absent from checkpoints written before it existed (read as zeros; the code
// entropy then averages the frames since the resume).
struct CheckpointCounters {
  int64_t step = 0, bytes_up = 0, bytes_down = 0, bytes_fp32 = 0;
  CodeEntropyTotals entropy;
};
void WriteHeader(torch::serialize::OutputArchive& archive, const char* version_key, int64_t version,
                 const RunConfig& c, const CheckpointCounters& counters,
                 const std::vector<double>& driver);
// FAILED_PRECONDITION for another version (naming `kind`) or a field that differs.
absl::Status ReadHeader(torch::serialize::InputArchive& archive, const std::string& path,
                        const char* version_key, int64_t version, const char* kind,
                        const RunConfig& c, CheckpointCounters* counters,
                        std::vector<double>* driver);
// Opens `path` onto `device` (NOT_FOUND when missing, FAILED_PRECONDITION when unreadable).
absl::Status OpenArchive(const std::string& path, const at::Device& device,
                         torch::serialize::InputArchive* archive);
// Writes through `path`.tmp, fsync and a rename (then syncs the folder), so neither a crash nor
// a power failure leaves half a checkpoint.
absl::Status SaveArchive(torch::serialize::OutputArchive& archive, const std::string& path);

// Writes the given blocks as "block.<first + i>" of `archive` (c10::Error on failure).
void SaveBlocks(torch::serialize::OutputArchive& archive,
                const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, size_t first = 0);
// Loads blocks "block.<i>" of `archive` into the given blocks (FAILED_PRECONDITION naming a
// missing block or a shape that does not match). `first` is the index of blocks[0] in the
// whole model.
absl::Status LoadBlocks(torch::serialize::InputArchive& archive, const std::string& path,
                        const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                        size_t first = 0);

// A whole checkpoint file: the header (WriteHeader), then `parts` writes the parts' tensors
// (it may throw c10::Error); written atomically (SaveArchive). INTERNAL naming `path` when torch
// fails.
absl::Status SaveCheckpointFile(const std::string& path, const char* version_key, int64_t version,
                                const RunConfig& c, const CheckpointCounters& counters,
                                const std::vector<double>& driver,
                                const std::function<void(torch::serialize::OutputArchive&)>& parts);
// Opens `path` onto `device`, checks its header (ReadHeader) and calls `parts` with the archive
// and the header's counters. NOT_FOUND for a missing file; FAILED_PRECONDITION for another
// kind, a field that differs, or a file torch cannot read.
absl::Status LoadCheckpointFile(
    const std::string& path, const at::Device& device, const char* version_key, int64_t version,
    const char* kind, const RunConfig& c, std::vector<double>* driver,
    const std::function<absl::Status(torch::serialize::InputArchive&, const CheckpointCounters&)>&
        parts);

}  // namespace splitq::trainer::internal
