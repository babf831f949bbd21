#include "trainer/checkpoint_io.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "trainer/setup.h"

namespace splitq::trainer::internal {
namespace {

int64_t TargetMask(const std::vector<std::string>& targets) {
  int64_t mask = 0;
  const char* names[] = {"qkv", "proj", "fc1", "fc2"};
  for (int i = 0; i < 4; ++i) {
    if (std::find(targets.begin(), targets.end(), names[i]) != targets.end()) mask |= 1 << i;
  }
  return mask;
}

}  // namespace

std::vector<std::shared_ptr<torch::nn::Module>> Blocks(const SplitModel& m) {
  std::vector<std::shared_ptr<torch::nn::Module>> out;
  for (const auto* part : {&m.client, &m.server, &m.head}) {
    for (const auto& block : (*part)->children()) out.push_back(block);
  }
  return out;
}

Fields ShapeFields(const RunConfig& c) {
  return {{"task", static_cast<int64_t>(c.task)},
          {"model.layers", c.task == Task::kLanguageModel ? c.layers : 0},
          {"model.width", c.task == Task::kLanguageModel ? c.width : 0},
          {"model.heads", c.task == Task::kLanguageModel ? c.heads : 0},
          {"model.context", c.task == Task::kLanguageModel ? c.context : 0},
          {"quant.weights.bits", c.weight_bits},
          {"quant.weights.input_bits", c.input_bits}};
}

Fields StateFields(const RunConfig& c) {
  return {{"model.split_after", c.split_after},
          {"model.u_shaped", c.u_shaped},
          {"lora.rank", c.lora_rank},
          {"lora.alpha (x1000)", static_cast<int64_t>(std::llround(c.lora_alpha * 1000))},
          {"lora.targets", TargetMask(c.lora_targets)},
          {"quant.activations.mode", static_cast<int64_t>(c.activations.mode)},
          {"quant.activations.bits.min", c.activations.bits.min},
          {"quant.activations.bits.max", c.activations.bits.max}};
}

at::Tensor FieldTensor(const Fields& fields) {
  std::vector<int64_t> v;
  for (const auto& f : fields) v.push_back(f.second);
  return at::tensor(v, at::kLong);
}

absl::Status CheckFields(const std::string& path, const Fields& fields, const at::Tensor& stored) {
  if (stored.numel() != static_cast<int64_t>(fields.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a splitq checkpoint of this version"));
  }
  for (size_t i = 0; i < fields.size(); ++i) {
    const int64_t got = stored.data_ptr<int64_t>()[i];
    if (got != fields[i].second) {
      return absl::FailedPreconditionError(absl::StrCat(path, ": the checkpoint has ",
                                                        fields[i].first, " = ", got,
                                                        ", this run has ", fields[i].second));
    }
  }
  return absl::OkStatus();
}

void WriteHeader(torch::serialize::OutputArchive& archive, const char* version_key, int64_t version,
                 const RunConfig& c, const CheckpointCounters& n,
                 const std::vector<double>& driver) {
  archive.write(version_key, at::tensor({version}, at::kLong));
  archive.write("shape", FieldTensor(ShapeFields(c)));
  archive.write("state", FieldTensor(StateFields(c)));
  archive.write("counters",
                at::tensor({n.step, n.bytes_up, n.bytes_down, n.bytes_fp32}, at::kLong));
  archive.write("driver", at::tensor(driver, at::kDouble));
  archive.write("code_entropy", at::tensor({static_cast<double>(n.entropy.elements_up),
                                            static_cast<double>(n.entropy.elements_down),
                                            n.entropy.bits_up, n.entropy.bits_down},
                                           at::kDouble));
}

absl::Status ReadHeader(torch::serialize::InputArchive& archive, const std::string& path,
                        const char* version_key, int64_t version, const char* kind,
                        const RunConfig& c, CheckpointCounters* n, std::vector<double>* driver) {
  at::Tensor v, shape, state, counters, driver_t;
  if (!archive.try_read(version_key, v) || v.cpu().item<int64_t>() != version) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a ", kind, " checkpoint of version ", version));
  }
  archive.read("shape", shape);
  archive.read("state", state);
  SPLITQ_RETURN_IF_ERROR(CheckFields(path, ShapeFields(c), shape.cpu()));
  SPLITQ_RETURN_IF_ERROR(CheckFields(path, StateFields(c), state.cpu()));
  archive.read("counters", counters);
  counters = counters.cpu();
  const int64_t* p = counters.data_ptr<int64_t>();
  *n = CheckpointCounters{p[0], p[1], p[2], p[3], {}};
  at::Tensor entropy;
  if (archive.try_read("code_entropy", entropy) && entropy.numel() == 4) {
    entropy = entropy.cpu().to(at::kDouble);
    const double* e = entropy.data_ptr<double>();
    n->entropy =
        CodeEntropyTotals{static_cast<int64_t>(e[0]), static_cast<int64_t>(e[1]), e[2], e[3]};
  }
  archive.read("driver", driver_t);
  if (driver != nullptr) {
    driver_t = driver_t.cpu();
    driver->assign(driver_t.data_ptr<double>(), driver_t.data_ptr<double>() + driver_t.numel());
  }
  return absl::OkStatus();
}

absl::Status OpenArchive(const std::string& path, const at::Device& device,
                         torch::serialize::InputArchive* archive) {
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat(path, ": no checkpoint to resume from"));
  }
  return TorchCall(
      path + ": cannot read the checkpoint",
      [&] {
        archive->load_from(path, device);
        return absl::OkStatus();
      },
      absl::StatusCode::kFailedPrecondition);
}

absl::Status SaveArchive(torch::serialize::OutputArchive& archive, const std::string& path) {
  const std::string temp = path + ".tmp";
  const absl::Status written = TorchCall(path + ": cannot write the checkpoint", [&] {
    archive.save_to(temp);
    return absl::OkStatus();
  });
  if (!written.ok()) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    return written;
  }
  // Checkpoints hold weights learned from private data: private to the user (metrics, logs
  // and summaries follow the umask).
  std::error_code ignored;
  std::filesystem::permissions(
      temp, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write, ignored);
  return base::CommitFile(temp, path);
}

void SaveBlocks(torch::serialize::OutputArchive& archive,
                const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, size_t first) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    torch::serialize::OutputArchive block;
    blocks[i]->save(block);
    archive.write(absl::StrCat("block.", first + i), block);
  }
}

absl::Status LoadBlocks(torch::serialize::InputArchive& archive, const std::string& path,
                        const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                        size_t first) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::vector<std::vector<int64_t>> shapes;
    for (const at::Tensor& p : blocks[i]->parameters()) shapes.push_back(p.sizes().vec());
    torch::serialize::InputArchive block;
    if (!archive.try_read(absl::StrCat("block.", first + i), block)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": the checkpoint has no block ", first + i));
    }
    blocks[i]->load(block);
    const std::vector<at::Tensor> after = blocks[i]->parameters();
    for (size_t j = 0; j < after.size(); ++j) {
      if (after[j].sizes().vec() != shapes[j]) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": a parameter of block ", first + i,
                         " in the checkpoint does not match the model's shape"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status SaveCheckpointFile(
    const std::string& path, const char* version_key, int64_t version, const RunConfig& c,
    const CheckpointCounters& counters, const std::vector<double>& driver,
    const std::function<void(torch::serialize::OutputArchive&)>& parts) {
  torch::serialize::OutputArchive archive;
  SPLITQ_RETURN_IF_ERROR(TorchCall(path + ": cannot write the checkpoint", [&]() -> absl::Status {
    WriteHeader(archive, version_key, version, c, counters, driver);
    parts(archive);
    return absl::OkStatus();
  }));
  return SaveArchive(archive, path);
}

absl::Status LoadCheckpointFile(
    const std::string& path, const at::Device& device, const char* version_key, int64_t version,
    const char* kind, const RunConfig& c, std::vector<double>* driver,
    const std::function<absl::Status(torch::serialize::InputArchive&, const CheckpointCounters&)>&
        parts) {
  torch::serialize::InputArchive archive;
  SPLITQ_RETURN_IF_ERROR(OpenArchive(path, device, &archive));
  return TorchCall(
      path + ": cannot restore the checkpoint",
      [&]() -> absl::Status {
        CheckpointCounters n;
        SPLITQ_RETURN_IF_ERROR(
            ReadHeader(archive, path, version_key, version, kind, c, &n, driver));
        return parts(archive, n);
      },
      absl::StatusCode::kFailedPrecondition);
}

}  // namespace splitq::trainer::internal
