#include "trainer/split_trainer.h"

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>

#include "base/status_macros.h"
#include "trainer/checkpoint_io.h"
#include "trainer/client_part.h"
#include "trainer/server_part.h"
#include "trainer/setup.h"

namespace splitq::trainer {
namespace {
using namespace internal;  // NOLINT(build/namespaces)
constexpr int64_t kCheckpointVersion = 1;
}  // namespace

struct SplitTrainer::Impl {
  std::unique_ptr<ClientPart> client;
  std::unique_ptr<ServerPart> server;
  std::unique_ptr<LocalServerLink> link;
  std::unique_ptr<ClientRunner> runner;
  at::Device device{at::kCPU};
};

SplitTrainer::SplitTrainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SplitTrainer::~SplitTrainer() = default;

absl::StatusOr<std::unique_ptr<SplitTrainer>> SplitTrainer::Create(const RunConfig& c,
                                                                   const std::string& init,
                                                                   bool for_resume) {
  auto impl = std::make_unique<Impl>();
  SPLITQ_ASSIGN_OR_RETURN(impl->client, ClientPart::Create(c, init, for_resume));
  ServerPartOptions options;
  options.network_input = false;
  options.for_resume = for_resume;
  SPLITQ_ASSIGN_OR_RETURN(impl->server, ServerPart::Create(c, init, options));
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  impl->link = std::make_unique<LocalServerLink>(*impl->server);
  impl->runner = std::make_unique<ClientRunner>(*impl->client, *impl->link);
  return std::unique_ptr<SplitTrainer>(new SplitTrainer(std::move(impl)));
}

absl::StatusOr<StepStats> SplitTrainer::Step() { return impl_->runner->Step(); }
absl::StatusOr<EvalStats> SplitTrainer::Evaluate() { return impl_->runner->Evaluate(); }

absl::Status SplitTrainer::SaveCheckpoint(const std::string& path,
                                          const std::vector<double>& driver_state) const {
  const Impl& s = *impl_;
  const WireTotals w = s.client->wire();
  return SaveCheckpointFile(
      path, "version", kCheckpointVersion, config(),
      CheckpointCounters{step(), w.bytes_up, w.bytes_down, w.bytes_fp32_equivalent, w.entropy},
      driver_state, [&](torch::serialize::OutputArchive& archive) {
        s.client->SaveParts(archive, /*with_caches=*/true);
        s.server->SaveParts(archive, s.link->session());
      });
}

absl::Status SplitTrainer::LoadCheckpoint(const std::string& path,
                                          std::vector<double>* driver_state) {
  Impl& s = *impl_;
  return LoadCheckpointFile(
      path, s.device, "version", kCheckpointVersion, "splitq", config(), driver_state,
      [&](torch::serialize::InputArchive& archive, const CheckpointCounters& n) -> absl::Status {
        SPLITQ_RETURN_IF_ERROR(s.client->LoadParts(archive, path, /*with_caches=*/true));
        SPLITQ_RETURN_IF_ERROR(s.server->LoadParts(archive, path, s.link->session(), n.step));
        s.client->SetCounters(n.step,
                              WireTotals{n.bytes_up, n.bytes_down, n.bytes_fp32, 0, n.entropy});
        return absl::OkStatus();
      });
}

int64_t SplitTrainer::step() const { return impl_->client->step(); }
const RunConfig& SplitTrainer::config() const { return impl_->client->config(); }
std::string SplitTrainer::device() const { return impl_->client->device(); }
ClientMemory SplitTrainer::client_memory() const { return impl_->client->memory(); }
void SplitTrainer::set_frame_tap(LocalServerLink::FrameTap tap) {
  impl_->link->set_tap(std::move(tap));
}

WireTotals SplitTrainer::wire() const {
  WireTotals w = impl_->client->wire();
  if (config().u_shaped && config().activations.mode != WireMode::kFloat32) {
    w.max_budget_excess = std::max(w.max_budget_excess, impl_->server->max_budget_excess());
  }
  return w;
}

}  // namespace splitq::trainer
