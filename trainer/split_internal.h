// splitq trainer, internal: the pieces SplitTrainer (both parties in one process) and the
// networked parts (split_parts.h: a client part and a server part in different processes)
// share, so that the two compute exactly the same step.
//
// Not a public API: include it only from trainer/*.cc.
//
// A boundary is split into its two halves, which talk only in serialized bytes:
//   BoundarySender    the party that sends the activation (boundary 1: the client): the AMAQ
//                     module (learned bits and ranges), the activation encoders, the AQ-SGD
//                     sender cache, and the decoder of the gradient that comes back.
//   BoundaryReceiver  the other party: the activation decoders, the AQ-SGD receiver cache,
//                     and the gradient encoder.
// A fp32 boundary sends raw frames (EncodeRawTensor): a small header with the shape, then the
// float32 values.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/amaq_boundary.h"
#include "quant/wire_codec.h"
#include "trainer/config.h"
#include "trainer/datasets.h"
#include "trainer/models.h"
#include "trainer/split_link.h"
#include "trainer/split_trainer.h"

namespace splitq::trainer::internal {

// The largest integer width within the schedule's budget at `step`, clamped to `range`.
int ScheduleBits(const quant::BitSchedule& s, const BitsRange& range, int64_t step);

// Raw float32 frames (fp32 boundaries): "SQR1", u32 rank, rank x i64 dims, then numel x f32,
// all little-endian. DecodeRawTensor checks the rank (<= 8), the element count against
// `limits.max_elements` and the byte count against the shape before it allocates
// (INVALID_ARGUMENT / RESOURCE_EXHAUSTED). With `require_finite` (a worker's input from the
// network) it also refuses NaN or infinite values (INVALID_ARGUMENT), as quantized frames
// refuse non-finite scales; in one process a diverging run is caught by its loss instead, with
// a hint about the learning rate.
std::string EncodeRawTensor(const at::Tensor& x);
absl::StatusOr<at::Tensor> DecodeRawTensor(const std::string& bytes,
                                           const quant::FrameLimits& limits = {},
                                           bool require_finite = false);

// AQ-SGD's per-sample cache m_i on one side of the wire (float16, on the tensors' device).
class DeltaCache {
 public:
  // m for `ids` as float32 [B, sample...]: zeros for samples not seen yet.
  at::Tensor Gather(const at::Tensor& ids, const at::Tensor& like) const;
  void Update(const at::Tensor& ids, const at::Tensor& values);
  int64_t bytes() const;
  void Save(torch::serialize::OutputArchive& archive, const std::string& key) const;
  void Load(torch::serialize::InputArchive& archive, const std::string& key,
            const at::Device& device);

 private:
  std::unordered_map<int64_t, at::Tensor> m_;
};

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

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets);

// bf16 autocast on CUDA for the forward passes of one step (the backward runs outside, as
// autocast requires).
class AutocastScope {
 public:
  explicit AutocastScope(bool on);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool on_;
};

// The sending half of a boundary (see the top of this file).
class BoundarySender {
 public:
  struct Sent {
    at::Tensor sender_side;        // what the sender backpropagates through
    std::string bytes;             // the serialized frame
    double bits = 32;              // mean bits per element of the frame
    std::vector<uint8_t> bit_map;  // the frame's bits per channel (empty: fp32)
  };

  // `index`: 0 for boundary 1, 1 for boundary 2 (seeds differ).
  BoundarySender(const RunConfig& c, int index, int axis, int64_t channels);

  // Quantizes and serializes h. `ids` (AQ-SGD) names the batch's samples; `train` false:
  // validation (its own encoder, no caches, no gradient through the AMAQ module; every validation
  // frame carries its bit map).
  // INTERNAL for a frame over the schedule's budget (a bug, never expected).
  absl::StatusOr<Sent> Send(const at::Tensor& h, int64_t step, const at::Tensor& ids, bool train);
  // What the sender backpropagates through for h (as Send's sender_side, without sending):
  // the AMAQ module's output for an AMAQ boundary, h itself otherwise. For recomputing a
  // slice of the batch (ClientPart's micro-batches).
  at::Tensor SenderSide(const at::Tensor& h, int64_t step);
  // Decodes the gradient frame that came back (the receiver's SendGradient).
  absl::StatusOr<at::Tensor> ReceiveGradient(const std::string& bytes, const at::Device& device,
                                             at::ScalarType dtype);
  // A sent frame (bytes of Send) with its bit map included, resealed: for a receiver that
  // never got the map (a new session).
  static absl::StatusOr<std::string> WithBitMap(const std::string& bytes,
                                                const std::vector<uint8_t>& bit_map);
  // The next frames carry the bit map again (the receiver lost it: a new session, or a
  // FAILED_PRECONDITION from its decoder).
  void ResendBitMap();
  // The bit regulariser of this boundary (AMAQ), or an undefined tensor.
  at::Tensor Regularizer(int64_t step);

  quant::AmaqBoundary& amaq() { return amaq_; }
  const quant::AmaqBoundary& amaq() const { return amaq_; }
  DeltaCache& cache() { return cache_; }
  const DeltaCache& cache() const { return cache_; }
  double max_budget_excess() const { return max_excess_; }
  void set_max_budget_excess(double v) { max_excess_ = v; }

 private:
  void Calibrate(const at::Tensor& h);

  const RunConfig& c_;
  int axis_;
  quant::AmaqBoundary amaq_;
  quant::WireEncoder act_, eval_;
  quant::WireDecoder self_decoder_, grad_decoder_;
  DeltaCache cache_;
  double max_excess_ = -1e9;
};

// The receiving half of a boundary.
class BoundaryReceiver {
 public:
  // `require_finite`: fp32 frames with NaN or infinite values are INVALID_ARGUMENT (a worker's
  // input from the network; in one process a diverging run reaches the loss check instead).
  BoundaryReceiver(const RunConfig& c, int index, int axis, const quant::FrameLimits& limits = {},
                   bool require_finite = false);

  // Parses, validates and decodes an activation frame to `dtype` on `device`. AQ-SGD
  // (`train`): adds the receiver's cache entries for `ids` and updates them. Errors as
  // quant::ParseFrame / WireDecoder::Decode (INVALID_ARGUMENT, FAILED_PRECONDITION for a bit
  // map it never got, RESOURCE_EXHAUSTED), and INVALID_ARGUMENT for a frame of the wrong
  // kind, or of another step than `step`.
  absl::StatusOr<at::Tensor> Receive(const std::string& bytes, int64_t step, const at::Tensor& ids,
                                     bool train, const at::Device& device, at::ScalarType dtype);
  // The gradient of the received tensor, quantized for the way back. Returns the frame and
  // its mean bits per element.
  absl::StatusOr<std::pair<std::string, double>> SendGradient(const at::Tensor& grad, int64_t step);

  DeltaCache& cache() { return cache_; }
  const DeltaCache& cache() const { return cache_; }

 private:
  const RunConfig& c_;
  int axis_;
  quant::FrameLimits limits_;
  bool require_finite_;
  quant::WireDecoder act_, eval_;
  quant::WireEncoder grad_;
  DeltaCache cache_;
};

// Reads the loss (a device sync) into *loss and refuses a non-finite one (INTERNAL naming the
// step and a remedy), before anything backpropagates or steps.
absl::Status CheckLoss(const at::Tensor& loss, int64_t step, double* value);

// Backpropagates `output` with `grad`, adding `reg` (when defined) with gradient 1.
void BackwardWithRegularizer(at::Tensor output, at::Tensor grad, const at::Tensor& reg);

// AdamW over the trainable `model_params` (group 0) and, for the sender of an AMAQ boundary,
// its gates and ranges (group 1, quant.activations.gate.lr, no weight decay).
std::unique_ptr<torch::optim::AdamW> MakeOptimizer(const RunConfig& c,
                                                   const std::vector<at::Tensor>& model_params,
                                                   const std::vector<at::Tensor>& gate_params);
// The learning rates of step `step` on both groups; clears the gradients.
void PrepareOptimizer(const RunConfig& c, torch::optim::AdamW& opt, int64_t step);

// The model's blocks in model order (client, server, head): the same list at any split point.
std::vector<std::shared_ptr<torch::nn::Module>> Blocks(const SplitModel& m);

// The whole split model of `c` on `device`, initialised from the seed, then (`init`) the base
// weights of a checkpoint, then LoRA. Every party builds it the same way and keeps its parts.
// Errors: as SplitTrainer::Create.
absl::StatusOr<SplitModel> BuildModel(const RunConfig& c, const std::string& init, bool for_resume,
                                      const at::Device& device);
// The device `c.device` names on this machine (FAILED_PRECONDITION for cuda without a GPU;
// INVALID_ARGUMENT for bf16 autocast on the CPU).
absl::StatusOr<at::Device> ResolveDevice(const RunConfig& c);
// Adds a module's parameters, buffers and AdamW moments (of its trainable parameters) to *m.
void AddModuleMemory(const torch::nn::Module& module, ClientMemory* m);
// The boundary channel counts of `c` (boundary 1, and 2 when U-shaped).
int64_t BoundaryChannels(const RunConfig& c, int index);

// Checkpoint headers: what must agree between a checkpoint and the run that loads it.
using Fields = std::vector<std::pair<const char*, int64_t>>;
Fields ShapeFields(const RunConfig& c);  // the model's shape (for --init)
Fields StateFields(const RunConfig& c);  // the rest of the trainable state (for a resume)
at::Tensor FieldTensor(const Fields& fields);
absl::Status CheckFields(const std::string& path, const Fields& fields, const at::Tensor& stored);
// What every checkpoint kind holds besides its parts: a version under `version_key`, the shape
// and state fields, the counters and the driver's opaque state.
struct CheckpointCounters {
  int64_t step = 0, bytes_up = 0, bytes_down = 0, bytes_fp32 = 0;
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

}  // namespace splitq::trainer::internal
