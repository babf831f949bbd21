#include "tools/kernel_bench.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#if defined(SPLITQ_TORCH_CUDA)
#include <c10/cuda/CUDAFunctions.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "quant/lsq_quantizer.h"
#include "quant/tensor_ops.h"
#include "quant/wire_codec.h"

namespace splitq::tools {
namespace {

struct CaseResult {
  std::string name;
  double bytes = 0;  // read + written per call
  double ours_ms = 0;
  std::optional<double> torch_ms;
};

void Sync(const at::Device& device) {
#if defined(SPLITQ_TORCH_CUDA)
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

// GPU: the mean over `iters` back-to-back calls, synchronised around the loop (the caching
// allocator makes allocation free). CPU: the median of `iters` individually timed calls, because
// on the VMs we measured a call that draws fresh pages from the kernel pays ~12 us per 4 KiB
// page fault (up to 70 ms for a 64 MiB output), and which call pays it varies run to run.
// Scales and offsets of a min/max range, as the codec takes them.
quant::QuantTensors ToQuantTensors(const quant::WireRange& range) {
  quant::QuantTensors q;
  q.scale = range.scales;
  q.offset = range.offsets;
  return q;
}

double TimeMs(const at::Device& device, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  Sync(device);
  if (device.is_cuda()) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    Sync(device);
    const auto end = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::milli>(end - start).count() / iters;
  }
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

double Gbps(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

}  // namespace

int RunKernelBench(const KernelBenchOptions& opt) {
  const at::Device device(opt.device == "cuda" ? at::kCUDA : at::kCPU);
  if (device.is_cuda() && !kernels::CudaKernelsBuilt()) {
    spdlog::error("--device cuda: this splitq was built without CUDA kernels");
    return 2;
  }
  const int64_t rows = opt.rows > 0 ? opt.rows : (device.is_cuda() ? 16384 : 4096);
  const int64_t cols = opt.cols;
  const int iters = opt.iters > 0 ? opt.iters : (device.is_cuda() ? 20 : 9);
  const double n = static_cast<double>(rows * cols);
  std::printf(
      "splitq bench kernels: device=%s shape=[%lld, %lld] fp32, channels on axis 1, "
      "%s of %d timed calls after 3 warm-ups\n",
      opt.device.c_str(), static_cast<long long>(rows), static_cast<long long>(cols),
      device.is_cuda() ? "mean" : "median", iters);

  at::manual_seed(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor x = at::randn({rows, cols}, f32);
  const at::Tensor dy = at::randn({rows, cols}, f32);
  const at::Tensor scale = (x.abs().amax(0) / 127.0).contiguous();
  const at::Tensor zp_int = at::zeros({cols}, f32.dtype(at::kInt));
  const at::Tensor zp_float = at::zeros({cols}, f32);
  const quant::Grouping per_channel{kernels::Granularity::kChannel, 1};

  std::vector<CaseResult> results;
  {
    CaseResult r;
    r.name = "copy";
    r.bytes = 8 * n;
    // Into a buffer allocated once: the bandwidth limit, without allocation costs.
    at::Tensor copy_out = at::empty_like(x);
    r.ours_ms = TimeMs(device, iters, [&] { copy_out.copy_(x); });
    results.push_back(r);
  }
  {
    CaseResult r;
    r.name = "fake_quant_per_channel";
    r.bytes = 8 * n;
    quant::QuantTensors q;
    q.scale = scale;
    q.uniform_bits = 8;
    q.is_signed = true;
    r.ours_ms = TimeMs(device, iters, [&] { (void)quant::FakeQuantize(x, per_channel, q); });
    r.torch_ms = TimeMs(device, iters, [&] {
      (void)at::fake_quantize_per_channel_affine(x, scale, zp_int, 1, -128, 127);
    });
    results.push_back(r);
  }
  {
    // forward: read x, write y; backward: read x and dy, write dx (5 passes).
    CaseResult r;
    r.name = "lsq_per_channel_fwd_bwd";
    r.bytes = 20 * n;
    quant::LsqOptions lsq;
    lsq.bits = 8;
    lsq.is_signed = true;
    lsq.grouping = per_channel;
    const at::Tensor xg = x.detach().requires_grad_(true);
    const at::Tensor sg = scale.detach().requires_grad_(true);
    const at::Tensor zg = zp_float.detach().requires_grad_(true);
    r.ours_ms = TimeMs(device, iters, [&] {
      const at::Tensor y = quant::LsqFakeQuant(xg, sg, at::Tensor(), lsq);
      (void)torch::autograd::grad({y}, {xg, sg}, {dy});
    });
    r.torch_ms = TimeMs(device, iters, [&] {
      const at::Tensor y =
          at::_fake_quantize_learnable_per_channel_affine(xg, sg, zg, 1, -128, 127, 1.0);
      (void)torch::autograd::grad({y}, {xg, sg, zg}, {dy});
    });
    results.push_back(r);
  }
  const std::vector<uint8_t> bits4(static_cast<size_t>(cols), 4);
  const quant::WireRange range4 = quant::MinMaxRange(x, 1, bits4);
  const quant::QuantTensors q4 = ToQuantTensors(range4);
  {
    CaseResult r;
    r.name = "pack_4bit";
    r.bytes = 4 * n + n / 2;
    r.ours_ms = TimeMs(device, iters, [&] {
      (void)quant::QuantizePack(x, per_channel, q4, bits4, kernels::RoundingSpec{});
    });
    r.torch_ms = TimeMs(device, iters, [&] {
      const at::Tensor codes =
          ((x - range4.offsets) / range4.scales).round_().clamp_(0, 15).to(at::kByte);
      const at::Tensor pairs = codes.view({rows, cols / 2, 2});
      (void)pairs.select(2, 0).bitwise_or(pairs.select(2, 1).bitwise_left_shift(4));
    });
    results.push_back(r);
  }
  {
    CaseResult r;
    r.name = "unpack_4bit";
    r.bytes = 4 * n + n / 2;
    const at::Tensor packed =
        quant::QuantizePack(x, per_channel, q4, bits4, kernels::RoundingSpec{});
    r.ours_ms = TimeMs(device, iters, [&] {
      (void)quant::UnpackDequantize(packed, {rows, cols}, at::kFloat, per_channel, q4, bits4);
    });
    const at::Tensor torch_packed = at::randint(0, 255, {rows, cols / 2}, f32.dtype(at::kByte));
    r.torch_ms = TimeMs(device, iters, [&] {
      const at::Tensor lo = torch_packed.bitwise_and(15);
      const at::Tensor hi = torch_packed.bitwise_right_shift(4);
      const at::Tensor codes = at::stack({lo, hi}, 2).view({rows, cols}).to(at::kFloat);
      (void)(codes * range4.scales + range4.offsets);
    });
    results.push_back(r);
  }
  {
    std::vector<uint8_t> mixed(static_cast<size_t>(cols));
    std::mt19937 rng(1);
    for (auto& b : mixed) b = static_cast<uint8_t>(3 + rng() % 3);
    const quant::QuantTensors q = ToQuantTensors(quant::MinMaxRange(x, 1, mixed));
    CaseResult r;
    r.name = "pack_mixed_3to5bit";
    r.bytes = 4 * n + n / 2;
    r.ours_ms = TimeMs(device, iters, [&] {
      (void)quant::QuantizePack(x, per_channel, q, mixed, kernels::RoundingSpec{});
    });
    results.push_back(r);
  }
  if (device.is_cpu()) {
    const int threads_before = at::get_num_threads();
    at::set_num_threads(1);
#if defined(_OPENMP)
    omp_set_num_threads(1);
#endif
    quant::WireEncoder encoder(1, quant::FrameKind::kActivation, {});
    quant::Frame frame;
    CaseResult enc;
    enc.name = "encode_4bit_1thread";
    enc.bytes = 4 * n + n / 2;
    enc.ours_ms = TimeMs(device, iters, [&] {
      frame = encoder.Encode(x, 0, bits4, range4.scales, range4.offsets).value();
    });
    results.push_back(enc);
    // A frame that carries its bit map, so that every decode call stands alone.
    frame = quant::WireEncoder(2, quant::FrameKind::kActivation, {})
                .Encode(x, 0, bits4, range4.scales, range4.offsets)
                .value();
    quant::WireDecoder decoder;
    CaseResult dec;
    dec.name = "decode_4bit_1thread";
    dec.bytes = 4 * n + n / 2;
    dec.ours_ms = TimeMs(device, iters, [&] { (void)decoder.Decode(frame).value(); });
    results.push_back(dec);
    at::set_num_threads(threads_before);
#if defined(_OPENMP)
    omp_set_num_threads(threads_before);
#endif
  }

  const double copy_gbps = Gbps(results[0].bytes, results[0].ours_ms);
  std::printf("%-26s %10s %10s %10s %10s %12s %12s\n", "case", "ours_ms", "torch_ms", "ours_GB/s",
              "torch_GB/s", "ours/copy", "torch/ours");
  for (const CaseResult& r : results) {
    const double ours = Gbps(r.bytes, r.ours_ms);
    std::printf(
        "%-26s %10.3f %10s %10.1f %10s %11.0f%% %12s\n", r.name.c_str(), r.ours_ms,
        r.torch_ms ? std::to_string(*r.torch_ms).substr(0, 8).c_str() : "-", ours,
        r.torch_ms ? std::to_string(Gbps(r.bytes, *r.torch_ms)).substr(0, 7).c_str() : "-",
        100.0 * ours / copy_gbps,
        r.torch_ms ? (std::to_string(*r.torch_ms / r.ours_ms).substr(0, 5) + "x").c_str() : "-");
  }
  if (!opt.json_path.empty()) {
    std::ofstream out(opt.json_path);
    if (!out) {
      spdlog::error("cannot write {}", opt.json_path);
      return 1;
    }
    out << "{\n  \"device\": \"" << opt.device << "\",\n  \"shape\": [" << rows << ", " << cols
        << "],\n  \"iters\": " << iters << ",\n  \"cases\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const CaseResult& r = results[i];
      out << "    {\"name\": \"" << r.name << "\", \"ours_gbps\": " << Gbps(r.bytes, r.ours_ms)
          << ", \"torch_gbps\": "
          << (r.torch_ms ? std::to_string(Gbps(r.bytes, *r.torch_ms)) : std::string("null"))
          << ", \"copy_gbps\": " << copy_gbps << ", \"ours_ms\": " << r.ours_ms
          << ", \"torch_ms\": " << (r.torch_ms ? std::to_string(*r.torch_ms) : std::string("null"))
          << "}" << (i + 1 < results.size() ? "," : "") << "\n";
    }
    out << "  ]\n}\n";
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  return 0;
}

}  // namespace splitq::tools
