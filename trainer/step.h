// splitq trainer: one training step, top to bottom, for any pair of parties.
//
// A run has two parties, a client part (client_part.h: the first layers, the sending half of
// boundary 1, for U-shaped models also the head) and a server part (server_part.h: the rest),
// joined by a ServerLink (split_link.h): in one process for `splitq train` (LocalServerLink), or
// the network for `splitq client` (client/worker_client.h). ClientRunner is the step both run:
//
//   client  ClientPart::Forward     batch(step); h1 = client(x); boundary 1 quantizes h1 (UpFrame)
//   link    ServerLink::Train       server: decode; h2 = server(h1^)
//             plain:                  loss = CE(h2, y); backward; d h1^ quantized (DownFrame)
//             U-shaped:               boundary 2 quantizes h2 (DownFrame, activation)
//   client  ClientPart::Head        U-shaped: decode; loss = CE(head(h2^), y); d h2^ (HeadGradient)
//   link    ServerLink::TrainHead   U-shaped: server: decode; backward; d h1^ (DownFrame)
//   client  ClientPart::Backward    decode d h1^; backward through boundary 1 and the client;
//                                   both parties have stepped AdamW.
// Every frame is encoded, serialized, parsed and decoded, in one process too: there is no
// shortcut, so `splitq train` and a cluster of one client compute the same curve (bit for bit on
// the CPU: tests/trainer/step_test.cc, tests/cli/cluster_test.sh equivalence).
//
// When the link fails and ServerLink::Recover says OK (a new session, perhaps on another worker),
// the step starts again on the new session from the frame already computed (nothing is counted
// twice; AQ-SGD recomputes it, see ClientPart::NewSession).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_link.h"

namespace splitq::trainer {

class ClientPart;

struct StepStats {
  double loss = 0;       // training loss of this step's batch
  double act_bits = 0;   // mean bits per element of this step's activation frames (32: fp32)
  double grad_bits = 0;  // ... and of its gradient frames
  double step_ms = 0;    // wall time of the step
  // Where the client's part of it went (host wall time; on CUDA, kernels run asynchronously, so
  // a phase shows when its work was issued and waited for, not its kernels alone): the client's
  // layers forward, quantizing and encoding the activation frame, decoding the gradient frame,
  // and the client's layers backward with the optimizer step. The rest of step_ms is the
  // server's part and the wire (in `splitq train`, the server part in-process; U-shaped: the
  // head step too).
  double client_forward_ms = 0, encode_ms = 0, decode_ms = 0, client_backward_ms = 0;
  // Bits per channel of this step's activation frame (boundary 1; empty: fp32). metrics.jsonl
  // logs it as "act_bit_map" (one digit a channel) on each of its lines.
  std::vector<uint8_t> act_bit_map;
};

struct EvalStats {
  double loss = 0;            // mean cross-entropy over the validation set (nats)
  double accuracy = -1;       // classification; -1 otherwise
  double bits_per_byte = -1;  // language model (loss / ln 2); -1 otherwise
};

// Labels are not counted in the byte totals: in the plain layout they travel with the
// activation frame, one byte per target here (both tasks have at most 256 classes): 64 bytes a
// step for Fashion-MNIST, 4096 for the language-model configs (0.5% of a 4-bit frame).
// The order-0 entropy of the quantized frames' codes (quant::MeasureCodeEntropy: a histogram
// per channel and frame), summed over the training frames that crossed: what an entropy coder
// with a static table per channel could bring the codes to. fp32 frames are not measured.
struct CodeEntropyTotals {
  int64_t elements_up = 0, elements_down = 0;  // elements of the quantized frames measured
  double bits_up = 0, bits_down = 0;           // their entropy, in bits (totals)
};

// Elements: every frame up has a counterpart down of the same shape (the activation and its
// gradient; U-shaped also the second boundary's), so the elements each way are
// bytes_fp32_equivalent / 8.
struct WireTotals {
  int64_t bytes_up = 0;               // client -> server, frames as serialized, over the whole run
  int64_t bytes_down = 0;             // server -> client
  int64_t bytes_fp32_equivalent = 0;  // what the same tensors would have cost as float32
  double max_budget_excess = 0;       // max over activation frames of (mean bits - budget)
  CodeEntropyTotals entropy;
  int64_t elements_each_way() const { return bytes_fp32_equivalent / 8; }
};

// Bytes held by the client part (its own layers, the first boundary, and its optimizer).
struct ClientMemory {
  int64_t parameters = 0;       // all client parameters (trainable or frozen), and buffers
  int64_t trainable = 0;        // of which trainable
  int64_t optimizer_state = 0;  // AdamW moments of the client's trainable parameters
  int64_t boundary_tensor = 0;  // the boundary activations of a batch (float32)
  int64_t aqsgd_cache = 0;      // the client's AQ-SGD caches now
};

// The learning rate at `step` for a base rate: linear warm-up over optim.warmup_steps, then
// cosine decay to zero at `steps`. A negative step counts as step 0.
double LearningRateAt(const RunConfig& config, int64_t step, double base);

// What the train driver (train_loop.h) runs: SplitTrainer (both parties in one process), or a
// networked client (ClientRunner over a network link).
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

// A ClientPart driven through a ServerLink: the step above. Evaluate = every validation batch
// through link.Evaluate (U-shaped: and the client's head). Checkpoints are the client part's.
class ClientRunner : public StepRunner {
 public:
  ClientRunner(ClientPart& part, ServerLink& link) : part_(part), link_(link) {}
  absl::StatusOr<StepStats> Step() override;
  absl::StatusOr<EvalStats> Evaluate() override;
  absl::Status SaveCheckpoint(const std::string& path,
                              const std::vector<double>& driver_state) const override;
  absl::Status LoadCheckpoint(const std::string& path, std::vector<double>* driver) override;
  int64_t step() const override;
  const RunConfig& config() const override;
  WireTotals wire() const override;
  std::string device() const override;

 private:
  ClientPart& part_;
  ServerLink& link_;
};

}  // namespace splitq::trainer
