#include "trainer/setup.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/serialize/input-archive.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "trainer/checkpoint_io.h"

namespace splitq::trainer::internal {
namespace {

std::vector<at::Tensor> Trainable(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : params) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

void SetLr(torch::optim::AdamW& opt, size_t group, double lr) {
  if (group >= opt.param_groups().size()) return;
  static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[group].options()).lr(lr);
}

}  // namespace

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
                                targets.reshape({-1}));
}

at::Tensor TaskLosses(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
                                targets.reshape({-1}), {}, at::Reduction::None);
}

EvalPiece ScoreBatch(const at::Tensor& logits, const at::Tensor& targets) {
  EvalPiece out;
  const double n = static_cast<double>(targets.numel());
  out.loss_sum = TaskLoss(logits, targets).item<double>() * n;
  out.correct = (logits.argmax(-1).reshape({-1}) == targets.reshape({-1})).sum().item<int64_t>();
  out.count = targets.numel();
  return out;
}

AutocastScope::AutocastScope(bool on) : on_(on) {
  if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
  at::autocast::set_enabled(true);
#endif
}

AutocastScope::~AutocastScope() {
  if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
  at::autocast::set_autocast_enabled(at::kCUDA, false);
#else
  at::autocast::set_enabled(false);
#endif
  at::autocast::clear_cache();
}

absl::Status CheckLoss(const at::Tensor& loss, int64_t step, double* value) {
  *value = loss.item<double>();
  if (std::isfinite(*value)) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("step ", step, ": the loss is ", *value,
                   " (diverged; try a lower optim.lr or a higher quant.activations.bits.min)"));
}

void BackwardWithRegularizer(at::Tensor output, at::Tensor grad, const at::Tensor& reg) {
  std::vector<at::Tensor> outputs{std::move(output)}, grads{std::move(grad)};
  if (reg.defined()) {
    outputs.push_back(reg);
    grads.push_back(at::ones({}, reg.options()));
  }
  torch::autograd::backward(outputs, grads);
}

std::unique_ptr<torch::optim::AdamW> MakeOptimizer(const RunConfig& c,
                                                   const std::vector<at::Tensor>& model_params,
                                                   const std::vector<at::Tensor>& gate_params) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(Trainable(model_params));
  if (!gate_params.empty()) {  // the sender of an AMAQ boundary: gates and ranges
    auto gate_options = std::make_unique<torch::optim::AdamWOptions>(c.activations.gate_lr);
    gate_options->weight_decay(0);
    groups.emplace_back(gate_params, std::move(gate_options));
  }
  return std::make_unique<torch::optim::AdamW>(
      std::move(groups), torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
}

void PrepareOptimizer(const RunConfig& c, torch::optim::AdamW& opt, int64_t step) {
  SetLr(opt, 0, LearningRateAt(c, step, c.lr));
  SetLr(opt, 1, LearningRateAt(c, step, c.activations.gate_lr));
  opt.zero_grad();
}

absl::StatusOr<at::Device> ResolveDevice(const RunConfig& c) {
  const bool cuda = torch::cuda::is_available();
  if (c.device == "cuda" && !cuda) {
    return absl::FailedPreconditionError(
        "device: cuda, but this build or machine has no usable GPU (use device=cpu or auto)");
  }
  const at::Device device = (c.device == "cuda" || (c.device == "auto" && cuda))
                                ? at::Device(at::kCUDA)
                                : at::Device(at::kCPU);
  if (c.bf16_autocast && !device.is_cuda()) {
    return absl::InvalidArgumentError(
        "optim.bf16_autocast: autocast is for CUDA; this run is on the CPU");
  }
  return device;
}

void AddModuleMemory(const torch::nn::Module& module, ClientMemory* m) {
  for (const at::Tensor& p : module.parameters()) {
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    m->parameters += bytes;
    if (p.requires_grad()) {
      m->trainable += bytes;
      m->optimizer_state += 2 * bytes;
    }
  }
  for (const at::Tensor& b : module.buffers()) {
    m->parameters += b.numel() * static_cast<int64_t>(b.element_size());
  }
}

int64_t BoundaryChannels(const RunConfig& c, int index) {
  if (c.task == Task::kLanguageModel) return c.width;
  return index == 0 ? std::array<int64_t, 3>{32, 64, 128}[c.split_after - 1] : 128;
}

absl::StatusOr<SplitModel> BuildModel(const RunConfig& c, const std::string& init, bool for_resume,
                                      const at::Device& device) {
  if (c.lora_rank > 0 && init.empty() && !for_resume) {
    return absl::InvalidArgumentError(
        "lora.rank: a LoRA run fine-tunes a pretrained base; name its checkpoint with --init");
  }
  at::manual_seed(c.seed);
  const QuantLayerOptions quant_layers{c.weight_bits, c.input_bits, true};
  SplitModel model;
  SPLITQ_RETURN_IF_ERROR(TorchCall(
      "",
      [&]() -> absl::Status {
        if (c.task == Task::kFashionMnist) {
          model = FashionMnistCnn(CnnOptions{c.split_after, c.u_shaped, quant_layers});
        } else {
          TransformerOptions t;
          t.layers = c.layers;
          t.width = c.width;
          t.heads = c.heads;
          t.context = c.context;
          t.split_after = c.split_after;
          t.u_shaped = c.u_shaped;
          t.quant = quant_layers;
          model = ByteTransformer(t);
        }
        if (!init.empty()) {
          torch::serialize::InputArchive archive;
          SPLITQ_RETURN_IF_ERROR(TorchCall(
              absl::StrCat("--init ", init, ": cannot read a checkpoint"),
              [&] {
                archive.load_from(init, at::kCPU);  // the model moves to its device below
                return absl::OkStatus();
              },
              absl::StatusCode::kNotFound));
          at::Tensor shape;
          if (!archive.try_read("shape", shape)) {
            return absl::FailedPreconditionError(absl::StrCat(init, ": not a splitq checkpoint"));
          }
          SPLITQ_RETURN_IF_ERROR(CheckFields(init, ShapeFields(c), shape));
          at::Tensor state;
          if (archive.try_read("state", state) && state.numel() > kStateLoraRank &&
              state.data_ptr<int64_t>()[kStateLoraRank] > 0) {
            return absl::FailedPreconditionError(
                absl::StrCat(init,
                             ": a LoRA run's checkpoint; --init takes a base model (its adapters "
                             "would be lost)"));
          }
          SPLITQ_RETURN_IF_ERROR(LoadBlocks(archive, init, Blocks(model)));
        }
        if (c.lora_rank > 0) {
          ApplyLora(model, c.lora_targets, LoraOptions{c.lora_rank, c.lora_alpha});
        }
        for (auto* part : {&model.client, &model.server, &model.head}) (*part)->to(device);
        return absl::OkStatus();
      },
      absl::StatusCode::kInvalidArgument));
  return model;
}

}  // namespace splitq::trainer::internal
