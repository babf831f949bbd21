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

#include "kernels/op_table.h"
#include "quant/channel_rotation.h"
#include "quant/lsq_quantizer.h"
#include "quant/tensor_ops.h"
#include "quant/wire_codec.h"

namespace splitq::tools {
namespace {

struct CaseResult {
  kernels::KernelCase c;
  std::string name;  // c.Name(), or a CPU wire row's own name
  bool in_table = true;
  double bytes = 0;  // read + written per call
  double ours_ms = 0;
  double copy_ms = 0;  // copy of the same shape and dtype
  // What PyTorch's read-only (sum) and write-only (fill) kernels take for the bytes this call
  // reads and writes (0: not estimated); see RwBoundMs.
  double bound_ms = 0;
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

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out;
}

// Runs `fn` and returns its time, or nothing when PyTorch refuses the op (e.g. a dtype it does
// not take); the reason is logged once per case.
std::optional<double> TimeTorchMs(const at::Device& device, int iters, const std::string& name,
                                  const std::function<void()>& fn) {
  try {
    return TimeMs(device, iters, fn);
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    spdlog::info("{}: no PyTorch figure ({})", name, what);
    return std::nullopt;
  }
}

// The per-channel tensors of one shape, broadcastable against x ([1, .., C, .., 1]).
at::Tensor Along(const at::Tensor& v, int64_t dims, int64_t axis) {
  std::vector<int64_t> shape(static_cast<size_t>(dims), 1);
  shape[static_cast<size_t>(axis)] = v.numel();
  return v.view(shape);
}

// A memory bound for one call: the bytes it reads at the rate of PyTorch's read-only kernel
// (a sum of x) plus the bytes it writes at the rate of its write-only kernel (a fill of a
// tensor like x), both measured on this shape and dtype: reads and writes share the memory
// bus, so a call that moves R bytes in and W out takes at least about R / read + W / write.
// Packed codes count as bytes of x's dtype at the same rates. 0 for the CPU wire rows.
double RwBoundMs(const kernels::KernelCase& c, double read_ms, double fill_ms) {
  const double es = static_cast<double>(kernels::DTypeSize(c.dtype));
  const double codes = (c.bits == 0 ? 0.5 * (c.mixed_lo + c.mixed_hi) : c.bits) / 8.0 / es;
  switch (c.op) {
    case kernels::KernelOp::kCopy:
    case kernels::KernelOp::kFakeQuant:
    case kernels::KernelOp::kRotate:
      return read_ms + fill_ms;
    case kernels::KernelOp::kLsq:  // x twice and dy; y and dx
      return 3 * read_ms + 2 * fill_ms;
    case kernels::KernelOp::kPack:
    case kernels::KernelOp::kPackStochastic:
      return read_ms + codes * fill_ms;
    case kernels::KernelOp::kUnpack:
      return codes * read_ms + fill_ms;
  }
  return 0;
}

}  // namespace

int RunKernelBench(const KernelBenchOptions& opt) {
  const at::Device device(opt.device == "cuda" ? at::kCUDA : at::kCPU);
  if (device.is_cuda() && !kernels::CudaKernelsBuilt()) {
    spdlog::error("--device cuda: this splitq was built without CUDA kernels");
    return 2;
  }
  const kernels::Device kdev = device.is_cuda() ? kernels::Device::kCuda : kernels::Device::kCpu;
  const int iters = opt.iters > 0 ? opt.iters : (device.is_cuda() ? 20 : 9);
  std::printf(
      "splitq bench kernels: device=%s, the cases of kernels/op_table.h%s%s, %s of %d timed "
      "calls after 3 warm-ups\n",
      opt.device.c_str(), opt.filter.empty() ? "" : " whose name contains ", opt.filter.c_str(),
      device.is_cuda() ? "mean" : "median", iters);

  std::vector<CaseResult> results;
  for (const auto& [shape, dtypes] : kernels::PerfShapes(kdev)) {
    for (const kernels::DType kdtype : dtypes) {
      std::vector<kernels::KernelCase> cases;
      for (const kernels::KernelCase& c : kernels::PerfCases(kdev)) {
        if (c.shape.name != shape.name || c.dtype != kdtype) continue;
        if (!opt.filter.empty() && c.Name().find(opt.filter) == std::string::npos) continue;
        cases.push_back(c);
      }
      if (cases.empty()) continue;
      const at::ScalarType dtype = quant::ToScalarType(kdtype);
      const auto layout = kernels::MakeGroupLayout(shape.shape, shape.granularity, shape.axis);
      if (!layout.ok()) {
        spdlog::error("{}: {}", shape.name, layout.status().ToString());
        return 1;
      }
      const int64_t dims = static_cast<int64_t>(shape.shape.size());
      const int64_t axis = shape.axis < 0 ? shape.axis + dims : shape.axis;
      const int64_t groups = layout->groups;
      at::manual_seed(0);
      const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
      const at::Tensor x = at::randn(shape.shape, f32).to(dtype);
      const at::Tensor dy = at::randn(shape.shape, f32).to(dtype);
      const at::Tensor xf = x.to(at::kFloat);
      const quant::Grouping grouping{shape.granularity, static_cast<int32_t>(axis)};
      // Per-channel max-abs for the 8-bit ops.
      const at::Tensor scale8 = (xf.movedim(axis, 0).reshape({groups, -1}).abs().amax(1) / 127.0)
                                    .clamp_min(1e-8)
                                    .contiguous();
      at::Tensor copy_out = at::empty_like(x);
      const double copy_ms = TimeMs(device, iters, [&] { copy_out.copy_(x); });
      const double read_ms = TimeMs(device, iters, [&] { (void)x.sum(); });
      const double fill_ms = TimeMs(device, iters, [&] { copy_out.fill_(1); });

      for (const kernels::KernelCase& c : cases) {
        CaseResult r;
        r.c = c;
        r.name = c.Name();
        r.bytes = c.Bytes();
        r.copy_ms = copy_ms;
        r.bound_ms = RwBoundMs(c, read_ms, fill_ms);
        const std::vector<uint8_t> bits =
            c.bits == 0
                ? c.MixedBits(groups)
                : std::vector<uint8_t>(static_cast<size_t>(groups), static_cast<uint8_t>(c.bits));
        switch (c.op) {
          case kernels::KernelOp::kCopy:
            r.ours_ms = copy_ms;
            break;
          case kernels::KernelOp::kFakeQuant: {
            quant::QuantTensors q;
            q.scale = scale8;
            q.uniform_bits = 8;
            q.is_signed = true;
            r.ours_ms = TimeMs(device, iters, [&] { (void)quant::FakeQuantize(x, grouping, q); });
            const at::Tensor zp = at::zeros({groups}, f32.dtype(at::kInt));
            r.torch_ms = TimeTorchMs(device, iters, r.name, [&] {
              (void)at::fake_quantize_per_channel_affine(x, scale8, zp, axis, -128, 127);
            });
            break;
          }
          case kernels::KernelOp::kLsq: {
            quant::LsqOptions lsq;
            lsq.bits = 8;
            lsq.is_signed = true;
            lsq.grouping = grouping;
            const at::Tensor xg = x.detach().requires_grad_(true);
            const at::Tensor sg = scale8.detach().clone().requires_grad_(true);
            const at::Tensor zg = at::zeros({groups}, f32).requires_grad_(true);
            r.ours_ms = TimeMs(device, iters, [&] {
              const at::Tensor y = quant::LsqFakeQuant(xg, sg, at::Tensor(), lsq);
              (void)torch::autograd::grad({y}, {xg, sg}, {dy});
            });
            r.torch_ms = TimeTorchMs(device, iters, r.name, [&] {
              const at::Tensor y =
                  at::_fake_quantize_learnable_per_channel_affine(xg, sg, zg, axis, -128, 127, 1.0);
              (void)torch::autograd::grad({y}, {xg, sg, zg}, {dy});
            });
            break;
          }
          case kernels::KernelOp::kRotate: {
            // Ours: the fast transform (kernels/rotate.h); PyTorch: the same R as a [b, b]
            // matmul on the channels moved last (ChannelRotation's fallback).
            quant::ChannelRotation rotation(groups, c.block, 1);
            r.ours_ms = TimeMs(device, iters, [&] { (void)rotation.Forward(x, axis); });
            quant::ChannelRotation dense(groups, c.block, 1);
            dense.set_force_matmul(true);
            r.torch_ms = TimeTorchMs(device, iters, r.name, [&] { (void)dense.Forward(x, axis); });
            break;
          }
          case kernels::KernelOp::kPack:
          case kernels::KernelOp::kPackStochastic:
          case kernels::KernelOp::kUnpack: {
            const quant::WireRange range = quant::MinMaxRange(xf, static_cast<int32_t>(axis), bits);
            const quant::QuantTensors q = ToQuantTensors(range);
            kernels::RoundingSpec rounding;
            if (c.op == kernels::KernelOp::kPackStochastic) {
              rounding = kernels::RoundingSpec{kernels::Rounding::kStochastic, 7, 1};
            }
            const at::Tensor s4 = Along(range.scales, dims, axis);
            const at::Tensor o4 = Along(range.offsets, dims, axis);
            if (c.op != kernels::KernelOp::kUnpack) {
              r.ours_ms = TimeMs(device, iters, [&] {
                (void)quant::QuantizePack(x, grouping, q, bits, rounding);
              });
              if (c.op == kernels::KernelOp::kPack && c.bits == 4 && x.numel() % 2 == 0) {
                // The same job in plain tensor ops: two neighbouring codes per byte.
                r.torch_ms = TimeTorchMs(device, iters, r.name, [&] {
                  const at::Tensor codes =
                      ((x.to(at::kFloat) - o4) / s4).round_().clamp_(0, 15).to(at::kByte);
                  const at::Tensor pairs = codes.view({-1, 2});
                  (void)pairs.select(1, 0).bitwise_or(pairs.select(1, 1).bitwise_left_shift(4));
                });
              }
            } else {
              const at::Tensor packed = quant::QuantizePack(x, grouping, q, bits, rounding);
              r.ours_ms = TimeMs(device, iters, [&] {
                (void)quant::UnpackDequantize(packed, shape.shape, dtype, grouping, q, bits);
              });
              if (c.bits == 4 && x.numel() % 2 == 0) {
                const at::Tensor torch_packed =
                    at::randint(0, 255, {x.numel() / 2}, f32.dtype(at::kByte));
                r.torch_ms = TimeTorchMs(device, iters, r.name, [&] {
                  const at::Tensor lo = torch_packed.bitwise_and(15);
                  const at::Tensor hi = torch_packed.bitwise_right_shift(4);
                  const at::Tensor codes = at::stack({lo, hi}, 1).view(shape.shape).to(at::kFloat);
                  (void)(codes * s4 + o4).to(dtype);
                });
              }
            }
            break;
          }
        }
        results.push_back(r);
      }

      const std::string enc_name = "encode_1thread:" + shape.name + ":float32:b4";
      const std::string dec_name = "decode_1thread:" + shape.name + ":float32:b4";
      if (device.is_cpu() && kdtype == kernels::DType::kFloat32 && axis == dims - 1 &&
          (enc_name.find(opt.filter) != std::string::npos ||
           dec_name.find(opt.filter) != std::string::npos)) {
        // The whole wire on one core (pack + CRC32C; validate + CRC + unpack).
        const std::vector<uint8_t> bits4(static_cast<size_t>(groups), 4);
        const quant::WireRange range4 = quant::MinMaxRange(x, static_cast<int32_t>(axis), bits4);
        const int threads_before = at::get_num_threads();
        at::set_num_threads(1);
#if defined(_OPENMP)
        omp_set_num_threads(1);
#endif
        const at::Tensor x2 = x.reshape({-1, groups});
        quant::WireEncoder encoder(1, quant::FrameKind::kActivation, {});
        quant::Frame frame;
        CaseResult enc;
        enc.in_table = false;
        enc.c.shape = shape;  // for the copy it is compared with
        enc.c.dtype = kernels::DType::kFloat32;
        enc.name = enc_name;
        enc.bytes = 4.0 * x.numel() + x.numel() / 2.0;
        enc.copy_ms = copy_ms;
        enc.ours_ms = TimeMs(device, iters, [&] {
          frame = encoder.Encode(x2, 0, bits4, range4.scales, range4.offsets).value();
        });
        results.push_back(enc);
        // A frame that carries its bit map, so that every decode call stands alone.
        frame = quant::WireEncoder(2, quant::FrameKind::kActivation, {})
                    .Encode(x2, 0, bits4, range4.scales, range4.offsets)
                    .value();
        quant::WireDecoder decoder;
        CaseResult dec = enc;
        dec.name = dec_name;
        dec.ours_ms = TimeMs(device, iters, [&] { (void)decoder.Decode(frame).value(); });
        results.push_back(dec);
        // The same with the payload entropy-coded (quant/entropy_coding.h), and with the
        // rotation of 256-channel blocks before it (issue 17's encode target counts both); the
        // bytes counted are the fp32 input and the coded frame. Randn codes at 4 bits: ~3.1
        // bits of entropy each.
        quant::WireEncoderOptions coding;
        coding.entropy_coding = true;
        quant::WireEncoder coded_encoder(3, quant::FrameKind::kActivation, coding);
        quant::Frame coded =
            coded_encoder.Encode(x2, 0, bits4, range4.scales, range4.offsets).value();
        const double coded_bytes = 4.0 * x.numel() + static_cast<double>(coded.payload.size());
        CaseResult cenc = enc;
        cenc.name = "encode_coded_1thread:" + shape.name + ":float32:b4";
        cenc.bytes = coded_bytes;
        cenc.ours_ms = TimeMs(device, iters, [&] {
          (void)coded_encoder.Encode(x2, 0, bits4, range4.scales, range4.offsets).value();
        });
        results.push_back(cenc);
        const quant::ChannelRotation rotation(groups, 256, 1);
        CaseResult renc = cenc;
        renc.name = "encode_rotated_coded_1thread:" + shape.name + ":float32:b4";
        renc.ours_ms = TimeMs(device, iters, [&] {
          const at::Tensor r = rotation.Forward(x2, 1);
          const quant::WireRange rr = quant::MinMaxRange(r, 1, bits4);
          (void)coded_encoder.Encode(r, 0, bits4, rr.scales, rr.offsets).value();
        });
        results.push_back(renc);
        coded = quant::WireEncoder(4, quant::FrameKind::kActivation, coding)
                    .Encode(x2, 0, bits4, range4.scales, range4.offsets)
                    .value();
        CaseResult cdec = cenc;
        cdec.name = "decode_coded_1thread:" + shape.name + ":float32:b4";
        cdec.ours_ms = TimeMs(device, iters, [&] { (void)decoder.Decode(coded).value(); });
        results.push_back(cdec);
        std::printf(
            "coded frame %s: %.3f bits per element (packed: 4), entropy %.3f\n", shape.name.c_str(),
            8.0 * static_cast<double>(coded.payload.size()) / static_cast<double>(x.numel()),
            coded_encoder.last_entropy().bits / static_cast<double>(x.numel()));
        at::set_num_threads(threads_before);
#if defined(_OPENMP)
        omp_set_num_threads(threads_before);
#endif
      }
    }
  }
  if (results.empty()) {
    spdlog::error("no case matches --filter {}", opt.filter);
    return 2;
  }

  std::printf("%-44s %9s %9s %10s %10s %10s %10s\n", "case", "ours_ms", "torch_ms", "ours_GB/s",
              "%_of_copy", "%_of_rw", "torch/ours");
  for (const CaseResult& r : results) {
    const double ours = Gbps(r.bytes, r.ours_ms);
    const double copy = Gbps(2.0 * static_cast<double>(r.c.shape.numel()) *
                                 static_cast<double>(kernels::DTypeSize(r.c.dtype)),
                             r.copy_ms);
    char torch_ms[32] = "-", ratio[32] = "-";
    if (r.torch_ms) {
      std::snprintf(torch_ms, sizeof(torch_ms), "%.3f", *r.torch_ms);
      std::snprintf(ratio, sizeof(ratio), "%.2fx", *r.torch_ms / r.ours_ms);
    }
    char rw[32] = "-";
    if (r.bound_ms > 0) std::snprintf(rw, sizeof(rw), "%.0f%%", 100.0 * r.bound_ms / r.ours_ms);
    std::printf("%-44s %9.3f %9s %10.1f %9.0f%% %10s %10s\n", r.name.c_str(), r.ours_ms, torch_ms,
                ours, 100.0 * ours / copy, rw, ratio);
  }
  if (!opt.json_path.empty()) {
    std::ofstream out(opt.json_path);
    if (!out) {
      spdlog::error("cannot write {}", opt.json_path);
      return 1;
    }
    out << "{\n  \"device\": \"" << opt.device << "\",\n  \"iters\": " << iters
        << ",\n  \"cases\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const CaseResult& r = results[i];
      const double copy_gbps = Gbps(2.0 * static_cast<double>(r.c.shape.numel()) *
                                        static_cast<double>(kernels::DTypeSize(r.c.dtype)),
                                    r.copy_ms);
      out << "    {\"name\": \"" << JsonEscape(r.name) << "\"";
      if (r.in_table) {
        out << ", \"op\": \"" << kernels::KernelOpName(r.c.op) << "\", \"shape_name\": \""
            << JsonEscape(r.c.shape.name) << "\", \"shape\": [";
        for (size_t d = 0; d < r.c.shape.shape.size(); ++d) {
          out << (d ? ", " : "") << r.c.shape.shape[d];
        }
        out << "], \"axis\": " << r.c.shape.axis << ", \"dtype\": \""
            << kernels::DTypeName(r.c.dtype) << "\", \"bits\": ";
        if (r.c.op == kernels::KernelOp::kCopy) {
          out << "null";
        } else if (r.c.op == kernels::KernelOp::kRotate) {
          out << "null, \"block\": " << r.c.block;
        } else if (r.c.bits == 0) {
          out << "\"" << r.c.mixed_lo << "-" << r.c.mixed_hi << "\"";
        } else {
          out << r.c.bits;
        }
      }
      out << ", \"ours_ms\": " << r.ours_ms << ", \"ours_gbps\": " << Gbps(r.bytes, r.ours_ms)
          << ", \"copy_gbps\": " << copy_gbps
          << ", \"pct_of_copy\": " << 100.0 * Gbps(r.bytes, r.ours_ms) / copy_gbps
          << ", \"rw_bound_ms\": " << r.bound_ms
          << ", \"pct_of_rw_bound\": " << (r.bound_ms > 0 ? 100.0 * r.bound_ms / r.ours_ms : 0.0)
          << ", \"torch_ms\": " << (r.torch_ms ? std::to_string(*r.torch_ms) : std::string("null"))
          << "}" << (i + 1 < results.size() ? "," : "") << "\n";
    }
    out << "  ]\n}\n";
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  return 0;
}

}  // namespace splitq::tools
