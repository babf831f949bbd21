#include "trainer/train_loop.h"

// clang-format off
// clip_grad.h uses torch::Tensor without including its definition: types.h goes first.
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
// clang-format on
#include <torch/csrc/autograd/autograd.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/philox.h"
#include "quant/amaq_boundary.h"
#include "quant/wire_codec.h"
#include "trainer/datasets.h"
#include "trainer/models.h"

namespace splitq::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double LrAt(const RunConfig& c, int64_t step, double base) {
  if (step < c.warmup_steps) return base * static_cast<double>(step + 1) / c.warmup_steps;
  const double span = std::max<int64_t>(1, c.steps - c.warmup_steps);
  const double t = static_cast<double>(step - c.warmup_steps) / span;
  return base * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, t)));
}

void SetLr(torch::optim::AdamW& opt, double lr, size_t group) {
  static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[group].options()).lr(lr);
}

int ScheduleBits(const quant::BitSchedule& s, const BitsRange& range, int64_t step) {
  // The largest integer width within the budget (a uniform frame never exceeds it either).
  const int bits = static_cast<int>(std::floor(s.TargetAt(step) + 1e-9));
  return std::clamp(bits, range.min, range.max);
}

// One direction of the wire: a frame encoder on the sending side and a decoder on the
// receiving side, with the bytes in between. fp32 mode copies raw floats through bytes.
class WireLink {
 public:
  WireLink(quant::FrameKind kind, int32_t axis, kernels::Rounding rounding, uint64_t seed)
      : encoder_(1, kind, quant::WireEncoderOptions{axis, rounding, seed}) {}

  // Sends x with per-channel bits/scales/offsets; returns the tensor the receiver decodes.
  absl::StatusOr<at::Tensor> Send(const at::Tensor& x, uint64_t step,
                                  const std::vector<uint8_t>& bits, const at::Tensor& scales,
                                  const at::Tensor& offsets) {
    SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, encoder_.Encode(x, step, bits, scales, offsets));
    const std::string bytes = quant::SerializeFrame(frame);
    bytes_ += static_cast<int64_t>(bytes.size());
    SPLITQ_ASSIGN_OR_RETURN(quant::Frame received,
                            quant::ParseFrame(absl::MakeConstSpan(
                                reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())));
    auto decoded = decoder_.Decode(received, x.device());
    if (decoded.status().code() == absl::StatusCode::kFailedPrecondition) encoder_.ResendBitMap();
    return decoded;
  }

  // fp32: the raw bytes of x, copied out and back in.
  at::Tensor SendRaw(const at::Tensor& x) {
    const at::Tensor c = x.detach().to(at::kFloat).contiguous().cpu();
    std::string bytes(static_cast<size_t>(c.numel()) * 4, '\0');
    std::memcpy(bytes.data(), c.data_ptr<float>(), bytes.size());
    bytes_ += static_cast<int64_t>(bytes.size());
    at::Tensor out = at::empty(c.sizes(), at::kFloat);
    std::memcpy(out.data_ptr<float>(), bytes.data(), bytes.size());
    return out.to(x.device());
  }

  int64_t bytes() const { return bytes_; }

 private:
  quant::WireEncoder encoder_;
  quant::WireDecoder decoder_;
  int64_t bytes_ = 0;
};

struct Batch {
  at::Tensor inputs, targets;
};

// Training and validation batches, drawn deterministically from (seed, step).
class Data {
 public:
  static absl::StatusOr<Data> Load(const RunConfig& c) {
    Data d;
    d.config_ = &c;
    if (c.task == Task::kFashionMnist) {
      SPLITQ_ASSIGN_OR_RETURN(d.train_, LoadFashionMnist(true));
      SPLITQ_ASSIGN_OR_RETURN(d.test_, LoadFashionMnist(false));
    } else {
      SPLITQ_ASSIGN_OR_RETURN(std::string text, LoadTextCorpus(c.corpus));
      d.text_ = SplitText(text, c.validation_fraction);
      if (static_cast<int64_t>(d.text_.validation.size()) <= c.context + 1) {
        return absl::InvalidArgumentError("data.validation_fraction leaves too little text");
      }
    }
    return d;
  }

  Batch Train(int64_t step) const {
    const RunConfig& c = *config_;
    if (c.task == Task::kFashionMnist) {
      const int64_t n = train_.labels.size(0);
      at::Tensor index = at::empty({c.batch_size}, at::kLong);
      for (int64_t b = 0; b < c.batch_size; ++b) {
        const kernels::Philox4 r = kernels::PhiloxBlock(c.seed, static_cast<uint64_t>(step), b);
        index.data_ptr<int64_t>()[b] = static_cast<int64_t>(r.v[0] % static_cast<uint32_t>(n));
      }
      return Batch{train_.images.index_select(0, index), train_.labels.index_select(0, index)};
    }
    const at::Tensor w = SampleByteWindows(text_.train, c.batch_size, c.context + 1, c.seed, step);
    return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1)};
  }

  // Validation batches: the whole test set (fmnist) or 16 fixed windows batches (lm).
  std::vector<Batch> Validation() const {
    const RunConfig& c = *config_;
    std::vector<Batch> out;
    if (c.task == Task::kFashionMnist) {
      const int64_t n = test_.labels.size(0);
      for (int64_t i = 0; i < n; i += 500) {
        const int64_t j = std::min(n, i + 500);
        out.push_back(Batch{test_.images.slice(0, i, j), test_.labels.slice(0, i, j)});
      }
      return out;
    }
    for (int64_t i = 0; i < 16; ++i) {
      const at::Tensor w = SampleByteWindows(text_.validation, c.batch_size, c.context + 1,
                                             c.seed ^ 0x5eed, static_cast<uint64_t>(i));
      out.push_back(Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1)});
    }
    return out;
  }

 private:
  const RunConfig* config_ = nullptr;
  ImageDataset train_, test_;
  TextSplit text_;
};

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}));
}

int64_t BoundaryChannels(const RunConfig& c) {
  if (c.task == Task::kLanguageModel) return c.width;
  const int64_t channels[] = {32, 64, 128};
  return channels[c.split_after - 1];
}

}  // namespace

absl::StatusOr<TrainSummary> Train(const RunConfig& c, const TrainOptions& options) {
  if (c.u_shaped)
    return absl::UnimplementedError("model.u_shaped: not supported by splitq train yet");
  if (c.activations.mode == WireMode::kAqSgd) {
    return absl::UnimplementedError(
        "quant.activations.mode: aqsgd is not supported by splitq train yet");
  }
  if (c.lora_rank > 0)
    return absl::UnimplementedError("lora.rank: LoRA runs need --init, not supported yet");
  if (c.bf16_autocast) return absl::UnimplementedError("optim.bf16_autocast: not supported yet");
  if (c.activations.granularity != kernels::Granularity::kChannel &&
      c.activations.mode != WireMode::kFloat32) {
    return absl::UnimplementedError(
        "quant.activations.granularity: only channel is supported by splitq train yet");
  }
  const auto start = Clock::now();
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(options.out_dir, ": ", ec.message()));
  std::ofstream metrics(std::filesystem::path(options.out_dir) / "metrics.jsonl");
  if (!metrics)
    return absl::InvalidArgumentError(
        absl::StrCat(options.out_dir, ": cannot write metrics.jsonl"));

  SPLITQ_ASSIGN_OR_RETURN(Data data, Data::Load(c));
  at::manual_seed(static_cast<uint64_t>(c.seed));
  const QuantLayerOptions quant_layers{c.weight_bits, c.input_bits, true};
  SplitModel model;
  try {
    if (c.task == Task::kFashionMnist) {
      model = FashionMnistCnn(CnnOptions{c.split_after, false, quant_layers});
    } else {
      TransformerOptions t;
      t.layers = c.layers;
      t.width = c.width;
      t.heads = c.heads;
      t.context = c.context;
      t.split_after = c.split_after;
      t.quant = quant_layers;
      model = ByteTransformer(t);
    }
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  }
  const int axis = model.boundary_channel_axis;
  quant::AmaqOptions amaq_options;
  amaq_options.bmin = c.activations.bits.min;
  amaq_options.bmax = c.activations.bits.max;
  amaq_options.alpha = c.activations.gate_alpha;
  amaq_options.channel_axis = axis;
  quant::AmaqBoundary boundary(amaq_options, BoundaryChannels(c));

  torch::optim::AdamW client_opt(
      {torch::optim::OptimizerParamGroup(model.client->parameters()),
       torch::optim::OptimizerParamGroup(
           boundary->parameters(),
           std::make_unique<torch::optim::AdamWOptions>(c.activations.gate_lr))},
      torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
  static_cast<torch::optim::AdamWOptions&>(client_opt.param_groups()[1].options()).weight_decay(0);
  torch::optim::AdamW server_opt(model.server->parameters(),
                                 torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));

  WireLink up(quant::FrameKind::kActivation, axis, kernels::Rounding::kNearest, c.seed);
  WireLink down(quant::FrameKind::kGradient, axis, c.gradients.rounding,
                c.seed ^ 0x9e3779b97f4a7c15ull);
  TrainSummary summary;
  summary.task = c.task == Task::kFashionMnist ? "fmnist" : "lm";
  summary.steps = c.steps;
  summary.max_budget_excess = -1e9;
  double window_loss = 0, window_act = 0, window_grad = 0;
  int64_t window_n = 0;
  bool first_window = true;

  // The activation across the wire: returns (what the client backpropagates through, what
  // the server receives, mean bits sent).
  auto cross_up = [&](const at::Tensor& h, int64_t step,
                      bool train) -> absl::StatusOr<std::tuple<at::Tensor, at::Tensor, double>> {
    const double budget = c.activations.target.TargetAt(step);
    if (c.activations.mode == WireMode::kFloat32) return std::make_tuple(h, up.SendRaw(h), 32.0);
    std::vector<uint8_t> bits;
    at::Tensor client_side, scales, offsets;
    if (c.activations.mode == WireMode::kAmaq) {
      client_side = train ? boundary->forward(h, budget) : boundary->forward(h.detach(), budget);
      bits = boundary->last_bits();
      scales = boundary->wire_scales();
      offsets = boundary->wire_offsets();
    } else {
      bits.assign(
          static_cast<size_t>(h.size(axis)),
          static_cast<uint8_t>(ScheduleBits(c.activations.target, c.activations.bits, step)));
      const quant::WireRange range = quant::MinMaxRange(h.detach(), axis, bits);
      scales = range.scales;
      offsets = range.offsets;
      client_side = h;  // straight-through: min-max ranges clip nothing
    }
    const double mean_bits = std::accumulate(bits.begin(), bits.end(), 0.0) / bits.size();
    if (mean_bits > budget + 1e-9) {
      return absl::InternalError(
          absl::StrCat("a frame of ", mean_bits, " bits exceeds the budget ", budget));
    }
    summary.max_budget_excess = std::max(summary.max_budget_excess, mean_bits - budget);
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, up.Send(h.detach(), step, bits, scales, offsets));
    return std::make_tuple(client_side, received, mean_bits);
  };

  for (int64_t step = 0; step < c.steps; ++step) {
    const auto step_start = Clock::now();
    SetLr(client_opt, LrAt(c, step, c.lr), 0);
    SetLr(client_opt, LrAt(c, step, c.activations.gate_lr), 1);
    SetLr(server_opt, LrAt(c, step, c.lr), 0);
    const Batch batch = data.Train(step);
    client_opt.zero_grad();
    server_opt.zero_grad();
    try {
      const at::Tensor h = model.client->forward(batch.inputs);
      SPLITQ_ASSIGN_OR_RETURN(auto crossed, cross_up(h, step, true));
      auto& [client_side, received, act_bits] = crossed;
      const at::Tensor server_in = received.detach().requires_grad_(true);
      const at::Tensor loss = TaskLoss(model.server->forward(server_in), batch.targets);
      loss.backward();
      const at::Tensor grad = server_in.grad();
      double grad_bits = 32;
      at::Tensor grad_back;
      if (c.gradients.mode == WireMode::kFloat32) {
        grad_back = down.SendRaw(grad);
      } else {
        grad_bits = ScheduleBits(c.gradients.target, c.gradients.bits, step);
        const std::vector<uint8_t> gbits(static_cast<size_t>(grad.size(axis)),
                                         static_cast<uint8_t>(grad_bits));
        const quant::WireRange range = quant::MaxAbsRange(grad, axis, gbits);
        SPLITQ_ASSIGN_OR_RETURN(grad_back,
                                down.Send(grad, step, gbits, range.scales, range.offsets));
      }
      std::vector<at::Tensor> outputs{client_side}, grads{grad_back};
      if (c.activations.mode == WireMode::kAmaq) {
        outputs.push_back(quant::BitRegularization({boundary}, c.activations.gate_beta,
                                                   c.activations.gate_lambda,
                                                   c.activations.target.TargetAt(step)));
        grads.push_back(at::ones({}));
      }
      torch::autograd::backward(outputs, grads);
      if (c.grad_clip > 0) {
        torch::nn::utils::clip_grad_norm_(model.client->parameters(), c.grad_clip);
        torch::nn::utils::clip_grad_norm_(model.server->parameters(), c.grad_clip);
      }
      client_opt.step();
      server_opt.step();
      const double step_ms =
          std::chrono::duration<double, std::milli>(Clock::now() - step_start).count();
      window_loss += loss.item<double>();
      window_act += act_bits;
      window_grad += grad_bits;
      ++window_n;
      if ((step + 1) % c.log_every == 0 || step + 1 == c.steps) {
        const double mean_loss = window_loss / window_n;
        if (first_window) summary.first_loss = mean_loss;
        first_window = false;
        summary.last_loss = mean_loss;
        summary.avg_act_bits = window_act / window_n;
        summary.avg_grad_bits = window_grad / window_n;
        const std::string line = absl::StrFormat(
            "{\"step\": %d, \"loss\": %.6f, \"lr\": %.6g, \"act_bits\": %.4f, \"grad_bits\": %.4f, "
            "\"bytes_up\": %d, \"bytes_down\": %d, \"step_ms\": %.3f}",
            step + 1, mean_loss, LrAt(c, step, c.lr), summary.avg_act_bits, summary.avg_grad_bits,
            up.bytes(), down.bytes(), step_ms);
        metrics << line << "\n";
        metrics.flush();
        if (options.progress) {
          options.progress(absl::StrFormat(
              "step %d/%d  loss %.4f  act bits %.2f  grad bits %.1f  up %.1f MB", step + 1, c.steps,
              mean_loss, summary.avg_act_bits, summary.avg_grad_bits, up.bytes() / 1e6));
        }
        window_loss = window_act = window_grad = 0;
        window_n = 0;
      }
      summary.bytes_fp32_equivalent += 4 * (h.numel() + grad.numel());
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("step ", step, ": ", e.what_without_backtrace()));
    }
  }

  // Validation, through the same wire (its own link, so the training link's state is not
  // touched).
  WireLink eval_link(quant::FrameKind::kActivation, axis, kernels::Rounding::kNearest, c.seed);
  std::swap(up, eval_link);
  double loss_sum = 0, correct = 0, count = 0;
  {
    at::NoGradGuard no_grad;
    for (const Batch& batch : data.Validation()) {
      SPLITQ_ASSIGN_OR_RETURN(auto crossed,
                              cross_up(model.client->forward(batch.inputs), c.steps, false));
      const at::Tensor logits = model.server->forward(std::get<1>(crossed));
      const double n = static_cast<double>(batch.targets.numel());
      loss_sum += TaskLoss(logits, batch.targets).item<double>() * n;
      correct += (logits.argmax(-1) == batch.targets).sum().item<double>();
      count += n;
    }
  }
  std::swap(up, eval_link);
  summary.val_loss = loss_sum / count;
  if (c.task == Task::kFashionMnist) {
    summary.val_accuracy = correct / count;
  } else {
    summary.val_bits_per_byte = summary.val_loss / std::log(2.0);
  }
  if (summary.max_budget_excess < -1e8) summary.max_budget_excess = 0;  // fp32: no budget
  summary.bytes_up = up.bytes();
  summary.bytes_down = down.bytes();
  summary.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();

  auto number_or_null = [](double v) {
    return v < 0 ? std::string("null") : absl::StrFormat("%.6f", v);
  };
  std::ofstream out(std::filesystem::path(options.out_dir) / "summary.json");
  out << absl::StrFormat(
      "{\n  \"task\": \"%s\",\n  \"steps\": %d,\n  \"val_loss\": %.6f,\n  \"val_accuracy\": %s,\n"
      "  \"val_bits_per_byte\": %s,\n  \"avg_act_bits\": %.4f,\n  \"avg_grad_bits\": %.4f,\n"
      "  \"bytes_up\": %d,\n  \"bytes_down\": %d,\n  \"bytes_fp32_equivalent\": %d,\n"
      "  \"wall_seconds\": %.3f,\n  \"max_budget_excess\": %.6f\n}\n",
      summary.task, summary.steps, summary.val_loss, number_or_null(summary.val_accuracy),
      number_or_null(summary.val_bits_per_byte), summary.avg_act_bits, summary.avg_grad_bits,
      summary.bytes_up, summary.bytes_down, summary.bytes_fp32_equivalent, summary.wall_seconds,
      summary.max_budget_excess);
  if (!out)
    return absl::InternalError(absl::StrCat(options.out_dir, ": cannot write summary.json"));
  return summary;
}

}  // namespace splitq::trainer
