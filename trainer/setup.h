// splitq trainer, internal: what both parties set up the same way (device, model, optimizer)
// and the small pieces of a step they share (loss, autocast, the loss check, backward with the
// bit regulariser), so that a client part and a server part compute exactly what one process
// would.
//
// Not a public API: include it only from trainer/*.cc.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "quant/torch_status.h"
#include "trainer/config.h"
#include "trainer/models.h"
#include "trainer/step.h"

namespace splitq::trainer::internal {

using quant::TorchCall;  // quant/torch_status.h: the one place torch's exceptions are caught

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets);
// The cross-entropy of every target, flattened (float32): TaskLoss is their mean.
at::Tensor TaskLosses(const at::Tensor& logits, const at::Tensor& targets);
// A validation batch's summed loss, correct predictions and count (no autograd needed).
EvalPiece ScoreBatch(const at::Tensor& logits, const at::Tensor& targets);

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

}  // namespace splitq::trainer::internal
