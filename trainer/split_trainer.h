// splitq trainer: SplitTrainer, the state and the step of one split-learning run, client and
// server in one process with the wire codec in the loop. `splitq train` (train_loop.h) drives
// it; `splitq bench step` runs two side by side.
//
// One step (design.md, "One training step"):
//   client:  h1 = client(x); boundary 1 quantizes h1 -> frame -> bytes          (up)
//   server:  parse, decode; h2 = server(h1^)
//     plain:     loss = CE(h2, y) on the server (labels go with the frame)
//     U-shaped:  boundary 2 quantizes h2 -> frame -> bytes                        (down)
//                client: decode; loss = CE(head(h2^), y); d h2^ -> frame -> bytes (up)
//                server: decode; backpropagate through the server
//   server:  d h1^ -> frame -> bytes (max-abs ranges, stochastic rounding)        (down)
//   client:  decode; backpropagate through boundary 1 and the client; both step AdamW.
// Every frame is encoded, serialized, parsed and decoded: there is no shortcut.
//
// Boundary modes (quant.activations.mode), the same at both boundaries:
//   fp32     raw float32 bytes.
//   uniform  the schedule's bits for every channel, min-max ranges; straight-through.
//   amaq     AmaqBoundary: learned per-channel bits under the schedule's budget (a frame's
//            mean bits never exceed it), learned ranges, the bit regulariser. Each boundary's
//            gates and ranges belong to the party that sends it (boundary 2: the server),
//            in that party's second optimizer group (quant.activations.gate.lr); each party
//            regularises its own boundary.
//   aqsgd    AQ-SGD (design.md "Delta mode"): the sender sends C(h - m_i) for sample i,
//            uniform bits and min-max ranges of the delta; sender and receiver both set
//            m_i <- m_i + C(h - m_i) from the same frame (each decodes it), so their caches
//            stay identical. m starts at zero, so a sample's first visit is plain uniform
//            quantization. Caches are float16, one entry per sample seen: memory is
//            (samples seen) x (boundary elements per sample) x 2 bytes on each side.
//            Validation samples have no cache entry: they cross as plain uniform frames.
// Gradients (quant.gradients.mode): fp32, or uniform bits from their schedule with per-channel
// max-abs ranges and stochastic (unbiased) rounding keyed by (seed, step, element).
//
// Samples: Fashion-MNIST image i, or language-model window i of the training text
// (ByteWindowsAt). Batches are drawn from Philox keyed by (seed, step): a run is a pure
// function of its config, so a resumed run gives the same curve as an uninterrupted one.
//
// Checkpoints (SaveCheckpoint) hold the model (by block, so --init works across split
// points), the AMAQ boundaries, both optimizers, the AQ-SGD caches, the wire byte counters
// and the step. The wire encoders are not saved: the first frame after a resume carries the
// bit map again (a few hundred bytes more than an uninterrupted run).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"

namespace splitq::trainer {

struct StepStats {
  double loss = 0;       // training loss of this step's batch
  double act_bits = 0;   // mean bits per element of this step's activation frames (32: fp32)
  double grad_bits = 0;  // ... and of its gradient frames
  double step_ms = 0;    // wall time of the step
};

struct EvalStats {
  double loss = 0;            // mean cross-entropy over the validation set (nats)
  double accuracy = -1;       // classification; -1 otherwise
  double bits_per_byte = -1;  // language model (loss / ln 2); -1 otherwise
};

// Labels are not counted in the byte totals: in the plain layout they travel with the
// activation frame, one byte per target here (both tasks have at most 256 classes): 64 bytes a
// step for Fashion-MNIST, 4096 for the language-model configs (0.5% of a 4-bit frame).
struct WireTotals {
  int64_t bytes_up = 0;               // client -> server, frames as serialized, over the whole run
  int64_t bytes_down = 0;             // server -> client
  int64_t bytes_fp32_equivalent = 0;  // what the same tensors would have cost as float32
  double max_budget_excess = 0;       // max over activation frames of (mean bits - budget)
};

// Bytes held by the client part (its own layers, the first boundary, and its optimizer).
struct ClientMemory {
  int64_t parameters = 0;       // all client parameters (trainable or frozen), and buffers
  int64_t trainable = 0;        // of which trainable
  int64_t optimizer_state = 0;  // AdamW moments of the client's trainable parameters
  int64_t boundary_tensor = 0;  // one boundary activation of a batch (float32)
  int64_t aqsgd_cache = 0;      // the sender-side AQ-SGD cache now
};

// The learning rate at `step` for a base rate: linear warm-up over optim.warmup_steps, then
// cosine decay to zero at `steps`. A negative step counts as step 0.
double LearningRateAt(const RunConfig& config, int64_t step, double base);

// What the train driver (train_loop.h) runs: SplitTrainer (both parties in one process), or a
// networked client (split_parts.h, ClientRunner).
class StepRunner {
 public:
  virtual ~StepRunner() = default;
  // Trains on batch step() and advances step().
  virtual absl::StatusOr<StepStats> Step() = 0;
  // The validation set (training state not touched).
  virtual absl::StatusOr<EvalStats> Evaluate() = 0;
  // The state this party holds, atomically written; `driver_state` is stored opaquely.
  virtual absl::Status SaveCheckpoint(const std::string& path,
                                      const std::vector<double>& driver_state) const = 0;
  virtual absl::Status LoadCheckpoint(const std::string& path,
                                      std::vector<double>* driver_state) = 0;
  virtual int64_t step() const = 0;
  virtual const RunConfig& config() const = 0;
  virtual WireTotals wire() const = 0;
  virtual std::string device() const = 0;  // "cpu" or "cuda"
};

class SplitTrainer : public StepRunner {
 public:
  // Builds data, model, boundaries and optimizers. `init_checkpoint` (--init): a checkpoint
  // (of any run of the same task and model shape, at any split point) whose model weights
  // become the base before LoRA is applied; a LoRA run (lora.rank > 0) requires one, and the
  // checkpoint of a LoRA run is refused (its adapters would be dropped).
  // Errors: a missing data set (NOT_FOUND naming its Debian package), device cuda without a
  // GPU (FAILED_PRECONDITION), a checkpoint that does not match the model (FAILED_PRECONDITION
  // naming the field), bf16_autocast on the CPU (INVALID_ARGUMENT), granularity other than
  // channel with a quantized boundary (UNIMPLEMENTED).
  // `for_resume`: LoadCheckpoint follows (it holds the whole model, so a LoRA run needs no
  // --init then).
  static absl::StatusOr<std::unique_ptr<SplitTrainer>> Create(
      const RunConfig& config, const std::string& init_checkpoint = "", bool for_resume = false);
  ~SplitTrainer() override;

  // Trains on batch step() and advances step(). A frame over the budget, a non-finite loss
  // or a wire error stops the run with an error (the state is then not meant to continue).
  absl::StatusOr<StepStats> Step() override;
  // The validation set through the same model and wire (its own links; training state is
  // not touched).
  absl::StatusOr<EvalStats> Evaluate() override;

  // Writes the whole training state to `path` (through a temporary file and a rename, so a
  // crash never leaves a half-written checkpoint). `driver_state` is stored opaquely (the
  // caller's own counters, e.g. partial metric windows) and returned by LoadCheckpoint.
  absl::Status SaveCheckpoint(const std::string& path,
                              const std::vector<double>& driver_state = {}) const override;
  // Restores a state written by SaveCheckpoint of a run with the same model, split point,
  // boundary mode, bit range and LoRA settings (FAILED_PRECONDITION naming the first field
  // that differs). Optimizer hyper-parameters come back from the checkpoint (the learning
  // rate is set again every step).
  absl::Status LoadCheckpoint(const std::string& path,
                              std::vector<double>* driver_state = nullptr) override;

  int64_t step() const override;
  const RunConfig& config() const override;
  WireTotals wire() const override;
  std::string device() const override;  // "cpu" or "cuda"
  ClientMemory client_memory() const;

 private:
  struct Impl;
  explicit SplitTrainer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::trainer
