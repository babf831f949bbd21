#include "trainer/train_loop.h"

#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "trainer/boundary.h"
#include "trainer/split_trainer.h"

namespace splitq::trainer {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// Keeps the lines of a .jsonl file whose "step" is at most `last_step` (after a resume).
absl::Status TruncateJsonl(const fs::path& path, int64_t last_step) {
  std::ifstream in(path);
  if (!in) return absl::OkStatus();
  std::string line, kept;
  while (std::getline(in, line)) {
    long long step = 0;
    if (std::sscanf(line.c_str(), "{\"step\": %lld", &step) == 1 && step <= last_step) {
      kept += line + "\n";
    }
  }
  in.close();
  return base::WriteFileAtomically(path, kept);  // a crash leaves the old file whole
}

std::string NumberOrNull(double v) { return v < 0 ? "null" : absl::StrFormat("%.6f", v); }
// num / den, or null when den is 0.
std::string RatioOrNull(double num, double den) {
  return den > 0 ? absl::StrFormat("%.4f", num / den) : "null";
}
// The wire's bits per element each way, and the code entropy's, between two totals (`before`
// zero: the whole run), as JSON members.
std::string WireBitsJson(const WireTotals& now, const WireTotals& before, const char* sep) {
  const double elements = static_cast<double>(now.elements_each_way() - before.elements_each_way());
  const CodeEntropyTotals& e = now.entropy;
  const CodeEntropyTotals& b = before.entropy;
  return absl::StrFormat(
      "\"wire_bits_up\": %s,%s\"wire_bits_down\": %s,%s\"code_entropy_bits_up\": %s,%s"
      "\"code_entropy_bits_down\": %s",
      RatioOrNull(8.0 * static_cast<double>(now.bytes_up - before.bytes_up), elements), sep,
      RatioOrNull(8.0 * static_cast<double>(now.bytes_down - before.bytes_down), elements), sep,
      RatioOrNull(e.bits_up - b.bits_up, static_cast<double>(e.elements_up - b.elements_up)), sep,
      RatioOrNull(e.bits_down - b.bits_down,
                  static_cast<double>(e.elements_down - b.elements_down)));
}

// The driver's own counters, saved inside each checkpoint.
struct Window {
  double loss = 0, act = 0, grad = 0, n = 0;
  double first_loss = 0, have_first = 0, last_loss = 0, avg_act = 0, avg_grad = 0;
  double wall_before = 0;  // seconds spent in earlier sessions of a resumed run

  std::vector<double> Pack() const {
    return {loss, act, grad, n, first_loss, have_first, last_loss, avg_act, avg_grad, wall_before};
  }
  void Unpack(const std::vector<double>& v) {
    if (v.size() != 10) return;
    loss = v[0], act = v[1], grad = v[2], n = v[3], first_loss = v[4], have_first = v[5];
    last_loss = v[6], avg_act = v[7], avg_grad = v[8], wall_before = v[9];
  }
};

// The mean budget over the logged window that ends with `steps_done` (the steps since the
// previous multiple of log_every): what that window's mean bits are compared with while the
// schedule moves.
double WindowBudget(double (*budget_at)(const RunConfig&, int64_t), const RunConfig& c,
                    int64_t steps_done) {
  const int64_t first = steps_done < 1 ? 0 : (steps_done - 1) / c.log_every * c.log_every;
  double sum = 0;
  for (int64_t k = first; k < steps_done; ++k) {
    const double b = budget_at(c, k);
    if (b < 0) return -1;
    sum += b;
  }
  return steps_done > first ? sum / static_cast<double>(steps_done - first) : budget_at(c, 0);
}

// `, "act_bit_map": "8876..."`: the step's bits per channel, one digit each (1..8); nothing
// for an fp32 frame.
std::string BitMapJson(const std::vector<uint8_t>& bits) {
  if (bits.empty()) return "";
  std::string digits;
  digits.reserve(bits.size());
  for (const uint8_t b : bits) digits.push_back(static_cast<char>('0' + std::min<uint8_t>(b, 9)));
  return absl::StrCat(", \"act_bit_map\": \"", digits, "\"");
}

// "3.11 (budget 4.00)", or "fp32" where there is no budget (budget < 0).
std::string BitsAndBudget(double used, double budget) {
  return budget < 0 ? std::string("fp32") : absl::StrFormat("%.2f (budget %.2f)", used, budget);
}

}  // namespace

double ActivationBudgetAt(const RunConfig& c, int64_t step) {
  switch (c.activations.mode) {
    case WireMode::kFloat32:
      return -1;
    case WireMode::kAmaq:
      return c.activations.target.TargetAt(step);
    default:
      return internal::ScheduleBits(c.activations.target, c.activations.bits, step);
  }
}

double GradientBudgetAt(const RunConfig& c, int64_t step) {
  if (c.gradients.mode == WireMode::kFloat32) return -1;
  return internal::ScheduleBits(c.gradients.target, c.gradients.bits, step);
}

std::string FormatSummary(const TrainSummary& s) {
  std::string out = s.task + ": ";
  if (s.clients > 1) {
    absl::StrAppendFormat(&out, "%d clients x %d steps (%d client steps)", s.clients,
                          s.steps / s.clients, s.steps);
  } else {
    absl::StrAppendFormat(&out, "%d steps", s.steps);
  }
  absl::StrAppendFormat(&out, " in %.1f s on %s; ", s.wall_seconds, s.device);
  const char* mean = s.clients > 1 ? " (mean over clients)" : "";
  if (s.val_accuracy >= 0)
    absl::StrAppendFormat(&out, "val accuracy %.4f%s, ", s.val_accuracy, mean);
  if (s.val_bits_per_byte >= 0) {
    absl::StrAppendFormat(&out, "val bits/byte %.4f%s, ", s.val_bits_per_byte, mean);
  }
  absl::StrAppendFormat(&out, "val loss %.4f\n", s.val_loss);
  const double wire_mb = (s.bytes_up + s.bytes_down) / 1e6;
  const double fp32_mb = s.bytes_fp32_equivalent / 1e6;
  absl::StrAppendFormat(&out, "wire %.1f MB up+down vs %.1f MB at fp32", wire_mb, fp32_mb);
  if (s.bytes_up + s.bytes_down > 0 && s.bytes_fp32_equivalent > 0) {
    absl::StrAppendFormat(&out, ": %.1fx less",
                          static_cast<double>(s.bytes_fp32_equivalent) /
                              static_cast<double>(s.bytes_up + s.bytes_down));
  }
  absl::StrAppendFormat(&out, " (%.1f MB up, %.1f MB down)\n", s.bytes_up / 1e6,
                        s.bytes_down / 1e6);
  absl::StrAppendFormat(&out, "bits per value at the end: activations %s, gradients %s\n",
                        BitsAndBudget(s.avg_act_bits, s.act_budget),
                        BitsAndBudget(s.avg_grad_bits, s.grad_budget));
  return out;
}

absl::StatusOr<TrainSummary> Train(const RunConfig& c, const TrainOptions& options) {
  SPLITQ_ASSIGN_OR_RETURN(auto trainer,
                          SplitTrainer::Create(c, options.init_checkpoint, options.resume));
  return RunTraining(*trainer, options);
}

absl::StatusOr<TrainSummary> RunTraining(StepRunner& runner, const TrainOptions& options) {
  StepRunner* trainer = &runner;
  const RunConfig& c = runner.config();
  const auto start = Clock::now();
  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(options.out_dir, ": ", ec.message()));
  const fs::path dir(options.out_dir);
  const fs::path checkpoint = dir / "checkpoint.pt";
  if (!options.resume && !options.overwrite) {
    std::error_code exists_error;
    const bool finished = fs::exists(dir / "summary.json", exists_error);
    if (finished || fs::exists(checkpoint, exists_error)) {
      return absl::FailedPreconditionError(absl::StrCat(
          options.out_dir, " already holds ", finished ? "a finished run" : "a stopped run", " (",
          finished ? "summary.json" : "checkpoint.pt",
          "); nothing was changed. --resume continues it, --force starts over there, --out "
          "DIR picks another folder"));
    }
  }
  if (!options.resume) {  // a new run: nothing of an older one may stay behind to resume
    std::error_code remove_error;
    for (const char* name : {"summary.json", "checkpoint.pt", "checkpoint.pt.tmp"}) {
      fs::remove(dir / name, remove_error);
    }
  }

  const std::function<void(const std::string&)>& note =
      options.note ? options.note : options.progress;
  Window w;
  if (options.resume) {
    std::vector<double> driver;
    SPLITQ_RETURN_IF_ERROR(trainer->LoadCheckpoint(checkpoint.string(), &driver));
    w.Unpack(driver);
    SPLITQ_RETURN_IF_ERROR(TruncateJsonl(dir / "metrics.jsonl", trainer->step()));
    SPLITQ_RETURN_IF_ERROR(TruncateJsonl(dir / "validation.jsonl", trainer->step()));
    if (note) {
      note(absl::StrFormat("resumed %s at step %d of %d%s", checkpoint.string(), trainer->step(),
                           c.steps, trainer->step() >= c.steps ? " (nothing left to train)" : ""));
    }
  }
  if (note && !options.resume && c.activations.mode == WireMode::kAmaq) {
    note(absl::StrFormat(
        "AMAQ: each channel learns its bits; the budget B*(t) goes %.2f -> %.2f bits per value "
        "over the run and is a ceiling (bits sit below it where the loss allows)",
        ActivationBudgetAt(c, 0), ActivationBudgetAt(c, c.steps - 1)));
  }
  // The logs are appended to in place (everything else is written to a temporary file and
  // renamed over): a symbolic link there would have a run write through it into whatever it
  // points at (the sixth outside probe overwrote a file that way).
  for (const char* name : {"metrics.jsonl", "validation.jsonl"}) {
    std::error_code link_error;
    if (fs::is_symlink(dir / name, link_error)) {
      return absl::FailedPreconditionError(
          absl::StrCat((dir / name).string(),
                       " is a symbolic link: a run writes its logs only to files of "
                       "its own (nothing was changed)"));
    }
  }
  const auto mode = options.resume ? std::ios::app : std::ios::trunc;
  std::ofstream metrics(dir / "metrics.jsonl", mode), validation(dir / "validation.jsonl", mode);
  if (!metrics || !validation) {
    return absl::InvalidArgumentError(absl::StrCat(options.out_dir, ": cannot write there"));
  }
  auto wall = [&] {
    return w.wall_before + std::chrono::duration<double>(Clock::now() - start).count();
  };
  auto save = [&] {
    Window saved = w;
    saved.wall_before = wall();
    return trainer->SaveCheckpoint(checkpoint.string(), saved.Pack());
  };
  EvalStats eval;
  auto validate = [&]() -> absl::Status {
    SPLITQ_ASSIGN_OR_RETURN(eval, trainer->Evaluate());
    validation << absl::StrFormat(
        "{\"step\": %d, \"val_loss\": %.6f, \"val_accuracy\": %s, \"val_bits_per_byte\": %s}\n",
        trainer->step(), eval.loss, NumberOrNull(eval.accuracy), NumberOrNull(eval.bits_per_byte));
    validation.flush();
    return absl::OkStatus();
  };

  // A step that an interrupt cut short leaves no state worth saving: the last checkpoint holds
  // the state, and --resume redoes the steps after it (a worker answers the ones it has applied
  // already without applying them again). A validation pass cut short leaves the state of the
  // step before it, which is saved.
  const auto cut_short = [&](const absl::Status& status, bool validating) -> absl::Status {
    if (status.ok() || options.interrupt == nullptr || !options.interrupt->load()) return status;
    if (validating) {
      SPLITQ_RETURN_IF_ERROR(save());
      return absl::CancelledError(absl::StrFormat(
          "interrupted during the validation after step %d (%s); %s holds the state (%s)",
          trainer->step(), status.message(), checkpoint.string(), options.resume_hint));
    }
    std::error_code error;
    const bool saved = fs::exists(checkpoint, error);
    return absl::CancelledError(absl::StrFormat(
        "interrupted during step %d (%s); %s", trainer->step() + 1, status.message(),
        saved ? absl::StrCat(checkpoint.string(), " holds the last checkpoint (",
                             options.resume_hint, "; the steps after it are redone)")
              : std::string("no checkpoint was written yet: a new run starts from step 0")));
  };
  WireTotals logged = trainer->wire();  // at the last metrics line (or the resume)
  while (trainer->step() < c.steps) {
    absl::StatusOr<StepStats> stepped = trainer->Step();
    if (!stepped.ok()) return cut_short(stepped.status(), false);
    const StepStats& s = *stepped;
    const int64_t step = trainer->step();  // steps done
    if (options.on_step) options.on_step(step, s, trainer->wire());
    w.loss += s.loss;
    w.act += s.act_bits;
    w.grad += s.grad_bits;
    w.n += 1;
    if (step % c.log_every == 0 || step == c.steps) {
      const double mean_loss = w.loss / w.n;
      if (w.have_first == 0) w.first_loss = mean_loss;
      w.have_first = 1;
      w.last_loss = mean_loss;
      w.avg_act = w.act / w.n;
      w.avg_grad = w.grad / w.n;
      const WireTotals wire = trainer->wire();
      metrics << absl::StrFormat(
          "{\"step\": %d, \"loss\": %.9g, \"lr\": %.6g, \"act_bits\": %.4f, \"grad_bits\": %.4f, "
          "\"act_budget\": %s, \"grad_budget\": %s, \"bytes_up\": %d, \"bytes_down\": %d, %s, "
          "\"step_ms\": %.3f, \"client_forward_ms\": %.3f, \"encode_ms\": %.3f, "
          "\"server_wire_ms\": %.3f, \"decode_ms\": %.3f, \"client_backward_ms\": %.3f%s}\n",
          step, mean_loss, LearningRateAt(c, step - 1, c.lr), w.avg_act, w.avg_grad,
          NumberOrNull(WindowBudget(ActivationBudgetAt, c, step)),
          NumberOrNull(WindowBudget(GradientBudgetAt, c, step)), wire.bytes_up, wire.bytes_down,
          WireBitsJson(wire, logged, " "), s.step_ms, s.client_forward_ms, s.encode_ms,
          std::max(0.0, s.step_ms - s.client_forward_ms - s.encode_ms - s.decode_ms -
                            s.client_backward_ms),
          s.decode_ms, s.client_backward_ms, BitMapJson(s.act_bit_map));
      logged = wire;
      metrics.flush();
      if (options.progress) {
        const double elapsed = wall();
        const double eta = elapsed / std::max<double>(1, step) * (c.steps - step);
        options.progress(absl::StrFormat(
            "step %d/%d  loss %.4f  act bits %s  grad bits %s  up %.1f MB  %.0f ms/step  "
            "eta %.0f s",
            step, c.steps, mean_loss,
            BitsAndBudget(w.avg_act, WindowBudget(ActivationBudgetAt, c, step)),
            c.gradients.mode == WireMode::kFloat32 ? "fp32" : absl::StrFormat("%.1f", w.avg_grad),
            wire.bytes_up / 1e6, s.step_ms, eta));
      }
      w.loss = w.act = w.grad = w.n = 0;
    }
    if (step % c.eval_every == 0 && step < c.steps) {
      SPLITQ_RETURN_IF_ERROR(cut_short(validate(), true));
    }
    const bool interrupted = options.interrupt != nullptr && options.interrupt->load();
    const bool stop = interrupted || step == options.stop_after;
    if (stop || (c.checkpoint_every > 0 && step % c.checkpoint_every == 0 && step < c.steps)) {
      SPLITQ_RETURN_IF_ERROR(save());
    }
    if (stop) {
      return absl::CancelledError(absl::StrFormat("stopped after step %d; %s holds the state (%s)",
                                                  step, checkpoint.string(), options.resume_hint));
    }
  }
  SPLITQ_RETURN_IF_ERROR(validate());
  SPLITQ_RETURN_IF_ERROR(save());

  TrainSummary summary;
  summary.task = c.task == Task::kFashionMnist ? "fmnist" : "lm";
  summary.steps = trainer->step();
  summary.val_loss = eval.loss;
  summary.val_accuracy = eval.accuracy;
  summary.val_bits_per_byte = eval.bits_per_byte;
  summary.first_loss = w.first_loss;
  summary.last_loss = w.last_loss;
  summary.avg_act_bits = w.avg_act;
  summary.avg_grad_bits = w.avg_grad;
  summary.act_budget = WindowBudget(ActivationBudgetAt, c, summary.steps);
  summary.grad_budget = WindowBudget(GradientBudgetAt, c, summary.steps);
  const WireTotals wire = trainer->wire();
  summary.bytes_up = wire.bytes_up;
  summary.bytes_down = wire.bytes_down;
  summary.bytes_fp32_equivalent = wire.bytes_fp32_equivalent;
  summary.max_budget_excess = wire.max_budget_excess;
  summary.entropy = wire.entropy;
  summary.wall_seconds = wall();
  summary.device = trainer->device();
  if (options.finish) options.finish(summary);

  SPLITQ_RETURN_IF_ERROR(WriteSummary(summary, (dir / "summary.json").string()));
  return summary;
}

namespace {
// ",\n  \"steps_lost\": N,\n  \"lost_steps\": [[A, B], ...]" ("" when steps_lost < 0).
std::string LostJson(const TrainSummary& summary) {
  if (summary.steps_lost < 0) return "";
  std::string ranges;
  for (const auto& [first, last] : summary.lost_steps) {
    absl::StrAppendFormat(&ranges, "%s[%d, %d]", ranges.empty() ? "" : ", ", first, last);
  }
  return absl::StrFormat(",\n  \"steps_lost\": %d,\n  \"lost_steps\": [%s]", summary.steps_lost,
                         ranges);
}

// ",\n  \"workers\": [...],\n  \"mean_clients_per_update\": x" ("" without workers).
std::string WorkersJson(const TrainSummary& summary) {
  if (summary.workers.empty()) return "";
  std::string out = ",\n  \"workers\": [";
  for (size_t i = 0; i < summary.workers.size(); ++i) {
    const WorkerReport& w = summary.workers[i];
    absl::StrAppendFormat(&out,
                          "%s\n    {\"name\": \"%s\", \"rank\": %d, \"server_updates\": %d, "
                          "\"steps_applied\": %d, \"weights_sha256\": \"%s\"}",
                          i == 0 ? "" : ",", w.name, w.rank, w.server_updates, w.steps_applied,
                          w.weights_sha256);
  }
  absl::StrAppendFormat(&out, "\n  ],\n  \"mean_clients_per_update\": %s",
                        NumberOrNull(summary.mean_clients_per_update));
  return out;
}
}  // namespace

absl::Status WriteSummary(const TrainSummary& summary, const std::string& path) {
  return base::WriteFileAtomically(
      path,
      absl::StrFormat(
          "{\n  \"task\": \"%s\",\n  \"steps\": %d,\n  \"val_loss\": %.6f,\n  \"val_accuracy\": "
          "%s,\n"
          "  \"val_bits_per_byte\": %s,\n  \"avg_act_bits\": %.4f,\n  \"avg_grad_bits\": %.4f,\n"
          "  \"act_budget\": %s,\n  \"grad_budget\": %s,\n"
          "  \"bytes_up\": %d,\n  \"bytes_down\": %d,\n  \"bytes_fp32_equivalent\": %d,\n"
          "  %s,\n  \"code_entropy_elements_up\": %d,\n  \"code_entropy_elements_down\": %d,\n"
          "  \"wall_seconds\": %.3f,\n  \"max_budget_excess\": %.6f,\n  \"device\": \"%s\",\n"
          "  \"clients\": %d%s%s\n}\n",
          summary.task, summary.steps, summary.val_loss, NumberOrNull(summary.val_accuracy),
          NumberOrNull(summary.val_bits_per_byte), summary.avg_act_bits, summary.avg_grad_bits,
          NumberOrNull(summary.act_budget), NumberOrNull(summary.grad_budget), summary.bytes_up,
          summary.bytes_down, summary.bytes_fp32_equivalent,
          WireBitsJson(WireTotals{summary.bytes_up, summary.bytes_down,
                                  summary.bytes_fp32_equivalent, 0, summary.entropy},
                       WireTotals{}, "\n  "),
          summary.entropy.elements_up, summary.entropy.elements_down, summary.wall_seconds,
          summary.max_budget_excess, summary.device, summary.clients, LostJson(summary),
          WorkersJson(summary)));
}

absl::StatusOr<TrainSummary> ReadSummary(const std::string& path) {
  TrainSummary s;
  try {
    const YAML::Node n = YAML::LoadFile(path);  // JSON is YAML
    auto number = [&](const char* key) {
      const YAML::Node v = n[key];
      return v && !v.IsNull() ? v.as<double>() : -1.0;
    };
    s.task = n["task"].as<std::string>();
    s.steps = n["steps"].as<int64_t>();
    s.val_loss = number("val_loss");
    s.val_accuracy = number("val_accuracy");
    s.val_bits_per_byte = number("val_bits_per_byte");
    s.avg_act_bits = number("avg_act_bits");
    s.avg_grad_bits = number("avg_grad_bits");
    s.act_budget = number("act_budget");
    s.grad_budget = number("grad_budget");
    if (const YAML::Node clients = n["clients"]) s.clients = clients.as<int64_t>();
    s.bytes_up = n["bytes_up"].as<int64_t>();
    s.bytes_down = n["bytes_down"].as<int64_t>();
    s.bytes_fp32_equivalent = n["bytes_fp32_equivalent"].as<int64_t>();
    // Entropy totals back from the per-element figures (absent in older summaries: zeros).
    const auto entropy = [&](const char* bits, const char* elements, int64_t* count,
                             double* total) {
      const YAML::Node e = n[elements];
      *count = e ? e.as<int64_t>() : 0;
      const double per = number(bits);
      *total = per > 0 ? per * static_cast<double>(*count) : 0;
    };
    entropy("code_entropy_bits_up", "code_entropy_elements_up", &s.entropy.elements_up,
            &s.entropy.bits_up);
    entropy("code_entropy_bits_down", "code_entropy_elements_down", &s.entropy.elements_down,
            &s.entropy.bits_down);
    s.wall_seconds = number("wall_seconds");
    s.max_budget_excess = n["max_budget_excess"].as<double>();
    s.device = n["device"].as<std::string>();
    if (const YAML::Node lost = n["steps_lost"]) s.steps_lost = lost.as<int64_t>();
    if (const YAML::Node ranges = n["lost_steps"]) {
      for (const YAML::Node& r : ranges) {
        s.lost_steps.emplace_back(r[0].as<int64_t>(), r[1].as<int64_t>());
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a summary.json: ", e.what()));
  }
  return s;
}

}  // namespace splitq::trainer
