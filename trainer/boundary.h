// splitq trainer, internal: the two halves of a boundary, which talk only in serialized bytes.
//
//   BoundarySender    the party that sends the activation (boundary 1: the client; boundary 2
//                     of a U-shaped model: the server): the AMAQ module (learned bits and
//                     ranges), the activation encoders, the AQ-SGD sender cache, and the
//                     decoder of the gradient that comes back.
//   BoundaryReceiver  the other party: the activation decoders, the AQ-SGD receiver cache,
//                     and the gradient encoder.
// A fp32 boundary sends raw frames (EncodeRawTensor): a small header with the shape, then the
// float32 values. With quant.activations.rotation the sender rotates the activation along its
// channels before everything else (AMAQ, AQ-SGD and the frame all see the rotated tensor) and
// the receiver undoes it after decoding; the gradient goes back in the rotated basis (any
// gradient mode), so the sender backpropagates through its quantizer and then through R.
// The rotation's seed: RotationSeed. The formulas are design.md's; the frame layout is
// docs/wire-format.md.
// Token granularity (quant.activations.granularity: token, the LM's [B, T, C] boundary with
// mode uniform or aqsgd): the activation frame carries the tensor as [B*T, C] with group axis
// 0, one scale, offset and width per token; the receiver gives it back its [B, T, C] shape
// (BoundaryReceiver's sample_shape). The gradient stays per channel.
//
// Not a public API: include it only from trainer/*.cc.
#pragma once

#include <ATen/ATen.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/amaq_boundary.h"
#include "quant/bit_schedule.h"
#include "quant/channel_rotation.h"
#include "quant/wire_codec.h"
#include "trainer/config.h"

namespace splitq::trainer::internal {

// The seed of boundary `index`'s rotation signs (kernels/rotate.h), from the run's seed: both
// sides derive it from the config they share (docs/wire-format.md).
uint64_t RotationSeed(const RunConfig& c, int index);

// The largest integer width within the schedule's budget at `step`, clamped to `range`.
int ScheduleBits(const quant::BitSchedule& s, const BitsRange& range, int64_t step);

// Raw float32 frames (fp32 boundaries): "SQR1", u32 rank, rank x i64 dims, then numel x f32,
// all little-endian. DecodeRawTensor checks the rank (<= 8), the element count against
// `limits.max_elements` and the byte count against the shape before it allocates
// (INVALID_ARGUMENT / RESOURCE_EXHAUSTED). With `require_finite` (a worker's input from the
// network) it also refuses NaN or infinite values (INVALID_ARGUMENT), as quantized frames
// refuse non-finite scales; in one process a diverging run is caught by its loss instead, with
// a hint about the learning rate.
std::string EncodeRawTensor(const at::Tensor& x);
absl::StatusOr<at::Tensor> DecodeRawTensor(const std::string& bytes,
                                           const quant::FrameLimits& limits = {},
                                           bool require_finite = false);

// AQ-SGD's per-sample cache m_i on one side of the wire (float16, on the tensors' device).
class DeltaCache {
 public:
  // m for `ids` as float32 [B, sample...]: zeros for samples not seen yet.
  at::Tensor Gather(const at::Tensor& ids, const at::Tensor& like) const;
  void Update(const at::Tensor& ids, const at::Tensor& values);
  // RESOURCE_EXHAUSTED when `ids` would bring the cache, at `sample_bytes` per entry, above
  // `max_bytes` (the ids not held yet counted once each).
  absl::Status Admit(const at::Tensor& ids, int64_t sample_bytes, int64_t max_bytes) const;
  int64_t bytes() const;
  void Save(torch::serialize::OutputArchive& archive, const std::string& key) const;
  void Load(torch::serialize::InputArchive& archive, const std::string& key,
            const at::Device& device);

 private:
  std::unordered_map<int64_t, at::Tensor> m_;
};

// The sending half of a boundary (see the top of this file).
class BoundarySender {
 public:
  struct Sent {
    at::Tensor sender_side;        // what the sender backpropagates through
    std::string bytes;             // the serialized frame
    double bits = 32;              // mean bits per element of the frame
    std::vector<uint8_t> bit_map;  // the frame's bits per channel (empty: fp32)
    quant::CodeEntropy entropy;    // of the frame's codes (training frames; 0 elements: fp32)
  };

  // `index`: 0 for boundary 1, 1 for boundary 2 (seeds differ). `shared`: the AMAQ module to
  // use (a server part's boundary 2, one module trained by every session); null: its own.
  BoundarySender(const RunConfig& c, int index, int axis, int64_t channels,
                 quant::AmaqBoundary shared = nullptr);

  // Quantizes and serializes h. `ids` (AQ-SGD) names the batch's samples; `train` false:
  // validation (its own encoder, no caches, no gradient through the AMAQ module; every validation
  // frame carries its bit map).
  // INTERNAL for a frame over the schedule's budget (a bug, never expected).
  absl::StatusOr<Sent> Send(const at::Tensor& h, int64_t step, const at::Tensor& ids, bool train);
  // What the sender backpropagates through for h (as Send's sender_side, without sending):
  // the AMAQ module's output for an AMAQ boundary, h itself otherwise. For recomputing a
  // slice of the batch (ClientPart's micro-batches).
  at::Tensor SenderSide(const at::Tensor& h, int64_t step);
  // Decodes the gradient frame that came back (the receiver's SendGradient).
  absl::StatusOr<at::Tensor> ReceiveGradient(const std::string& bytes, const at::Device& device,
                                             at::ScalarType dtype);
  // The code entropy of the last gradient frame ReceiveGradient decoded (0 elements: fp32).
  quant::CodeEntropy gradient_entropy() const { return gradient_entropy_; }
  // Measure the code entropy of training frames (Sent::entropy, gradient_entropy()): a pass
  // over the packed codes on the host, off by default (a server's boundary 2 has no use for it).
  void set_measure_entropy(bool on) { measure_ = on; }
  // A sent frame (bytes of Send) with its bit map included, resealed: for a receiver that
  // never got the map (a new session).
  static absl::StatusOr<std::string> WithBitMap(const std::string& bytes,
                                                const std::vector<uint8_t>& bit_map);
  // The next frames carry the bit map again (the receiver lost it: a new session, or a
  // FAILED_PRECONDITION from its decoder).
  void ResendBitMap();
  // The bit regulariser of this boundary (AMAQ), or an undefined tensor.
  at::Tensor Regularizer(int64_t step);

  quant::AmaqBoundary& amaq() { return amaq_; }
  const quant::AmaqBoundary& amaq() const { return amaq_; }
  DeltaCache& cache() { return cache_; }
  const DeltaCache& cache() const { return cache_; }
  // Forgets the AQ-SGD cache (a new session: the receiver starts from zero too).
  void ClearCache() { cache_ = DeltaCache(); }
  double max_budget_excess() const { return max_excess_; }
  void set_max_budget_excess(double v) { max_excess_ = v; }

 private:
  void Calibrate(const at::Tensor& h);

  const RunConfig& c_;
  int axis_;
  bool token_;  // token granularity: frames of [B*T, C], group axis 0
  quant::ChannelRotation rotation_;
  quant::AmaqBoundary amaq_;
  quant::WireEncoder act_, eval_;
  quant::WireDecoder self_decoder_, grad_decoder_;
  DeltaCache cache_;
  double max_excess_ = -1e9;
  // A budget in bytes (quant.activations.budget: bytes with amaq).
  bool Priced() const;
  // The AMAQ module's next code price after a coded training frame: each channel's wire bits
  // per element and nominal bit, averaged with the price before (this much of it stays; the
  // first measurement replaces the starting unit price). It takes effect at the next training
  // Send. Returns the frame's payload bits per element. The price is an average: it takes a
  // channel's coded size as proportional to its width, which a removed bit does not exactly
  // save (a dense channel saves about a whole bit, a nearly constant one almost nothing).
  static constexpr double kPriceMemory = 0.5;
  double UpdateCodePrice(const quant::CodeEntropy& entropy, const std::vector<uint8_t>& bits);
  std::vector<float> pending_price_;
  bool measured_price_ = false;
  quant::CodeEntropy gradient_entropy_;
  bool measure_ = false;
};

// A token frame's decoded [B*T, C] as [B, sample_shape...] (sample_shape [T, C]).
// INVALID_ARGUMENT naming both shapes when it does not divide; INTERNAL without a sample shape.
absl::StatusOr<at::Tensor> TokensToSamples(const at::Tensor& tokens,
                                           const std::vector<int64_t>& sample_shape);

// The receiving half of a boundary.
class BoundaryReceiver {
 public:
  // `require_finite`: fp32 frames with NaN or infinite values are INVALID_ARGUMENT (a worker's
  // input from the network; in one process a diverging run reaches the loss check instead).
  // `sample_shape`: one example's activation ([T, C]); needed with token granularity, where
  // the frame carries [B*T, C].
  BoundaryReceiver(const RunConfig& c, int index, int axis, const quant::FrameLimits& limits = {},
                   bool require_finite = false, std::vector<int64_t> sample_shape = {});

  // Parses, validates and decodes an activation frame to `dtype` on `device`. AQ-SGD
  // (`train`): adds the receiver's cache entries for `ids` and updates them. Errors as
  // quant::ParseFrame / WireDecoder::Decode (INVALID_ARGUMENT, FAILED_PRECONDITION for a bit
  // map it never got, RESOURCE_EXHAUSTED), and INVALID_ARGUMENT for a frame of the wrong
  // kind, or of another step than `step`.
  absl::StatusOr<at::Tensor> Receive(const std::string& bytes, int64_t step, const at::Tensor& ids,
                                     bool train, const at::Device& device, at::ScalarType dtype);
  // The gradient of the received tensor, quantized for the way back. Returns the frame and
  // its mean bits per element.
  absl::StatusOr<std::pair<std::string, double>> SendGradient(const at::Tensor& grad, int64_t step);

  // The next gradient frame carries its bit map again (a new session: the sender's decoder
  // is new).
  void ResendBitMap() { grad_.ResendBitMap(); }
  // The code entropy of the last training frame Receive decoded, and of the last gradient
  // frame SendGradient made (0 elements: fp32).
  quant::CodeEntropy received_entropy() const { return received_entropy_; }
  quant::CodeEntropy sent_entropy() const { return sent_entropy_; }
  // As BoundarySender::set_measure_entropy (off by default: a worker's boundary 1).
  void set_measure_entropy(bool on) { measure_ = on; }

  DeltaCache& cache() { return cache_; }
  const DeltaCache& cache() const { return cache_; }
  void ClearCache() { cache_ = DeltaCache(); }

 private:
  // The rotation for a tensor of `channels` channels (made at the first frame: the receiver
  // learns the channel count from it; a frame with another count rebuilds it, at most a
  // 1024 x 1024 matrix, and then fails the model's shape check).
  const quant::ChannelRotation& Rotation(int64_t channels);

  const RunConfig& c_;
  int axis_;
  int index_;
  quant::ChannelRotation rotation_;
  quant::FrameLimits limits_;
  bool require_finite_;
  std::vector<int64_t> sample_shape_;
  quant::WireDecoder act_, eval_;
  quant::WireEncoder grad_;
  DeltaCache cache_;
  quant::CodeEntropy received_entropy_, sent_entropy_;
  bool measure_ = false;
};

}  // namespace splitq::trainer::internal
