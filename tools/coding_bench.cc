#include "tools/coding_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/files.h"
#include "quant/entropy_coding.h"
#include "quant/wire_format.h"
#include "trainer/config.h"
#include "trainer/split_trainer.h"

namespace splitq::tools {
namespace {

// A kept frame, parsed, with the bit map it decodes with.
struct Kept {
  quant::Frame frame;
  std::vector<uint8_t> bits;
  size_t serialized = 0;  // the frame's bytes as sent
};

// One direction's frames: the bit map follows the frames that carry one.
struct Way {
  explicit Way(const char* n) : name(n) {}
  const char* name;
  bool quantized = false;
  std::vector<uint8_t> map;
  std::deque<Kept> kept;
  std::string error;

  void Take(const std::string& bytes, size_t keep) {
    if (!quantized || !error.empty()) return;
    auto f = quant::ParseFrame(
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
    if (!f.ok()) {
      error = std::string(f.status().message());
      return;
    }
    if (!f->bits.empty()) map = f->bits;
    kept.push_back(Kept{std::move(*f), map, bytes.size()});
    if (kept.size() > keep) kept.pop_front();
  }
};

double MedianMs(int iters, const std::function<void()>& fn) {
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int RunCodingBench(const CodingBenchOptions& opt) {
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "config error: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  // The wire packed: this benchmark codes the frames itself.
  config->activations.coded = false;
  config->gradients.coded = false;
  config->steps = std::max<int64_t>(config->steps, opt.steps);
  Way up("up"), down("down");
  up.quantized = config->activations.mode != trainer::WireMode::kFloat32;
  down.quantized = !config->u_shaped ? config->gradients.mode != trainer::WireMode::kFloat32
                                     : up.quantized;  // U-shaped: boundary 2's activation
  if (!up.quantized && !down.quantized) {
    std::fprintf(stderr, "bench coding: both ways cross as fp32: there are no codes to code\n");
    return 2;
  }
  auto trainer = trainer::SplitTrainer::Create(*config, opt.init);
  if (!trainer.ok()) {
    std::fprintf(stderr, "bench coding: %s\n", std::string(trainer.status().message()).c_str());
    return 1;
  }
  const auto keep = static_cast<size_t>(opt.frames);
  (*trainer)->set_frame_tap([&](const trainer::UpFrame& u, const trainer::DownFrame& d) {
    up.Take(*u.frame, keep);
    down.Take(d.frame, keep);
  });
  for (int i = 0; i < opt.steps; ++i) {
    auto s = (*trainer)->Step();
    if (!s.ok()) {
      std::fprintf(stderr, "\nbench coding: %s\n", std::string(s.status().message()).c_str());
      return 1;
    }
    std::fprintf(stderr, "\rstep %d/%d", i + 1, opt.steps);
  }
  std::fprintf(stderr, "\n");
  if (!opt.dump_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(opt.dump_dir, ec);
  }
  std::string summary;
  std::printf(
      "bench coding: %s, %d steps, the last %d steps' frames; bits per element; the "
      "coder on one thread, median of %d calls a frame\n",
      opt.config_path.c_str(), opt.steps, opt.frames, opt.iters);
  std::printf("%-5s %6s %10s %8s %8s %8s %8s %9s %8s %10s %10s\n", "way", "frames", "elements",
              "headers", "packed", "entropy", "rans", "rans/ent", "channels", "enc_ns/el",
              "dec_ns/el");
  const kernels::ExecContext one_thread{kernels::Device::kCpu, nullptr, 1};
  for (Way* w : {&up, &down}) {
    if (!w->quantized) continue;
    if (!w->error.empty()) {
      std::fprintf(stderr, "bench coding: a %s frame: %s\n", w->name, w->error.c_str());
      return 1;
    }
    int64_t elements = 0, packed = 0, coded = 0, headers = 0, channels = 0;
    double entropy = 0, enc_ms = 0, dec_ms = 0;
    int index = 0;
    for (const Kept& k : w->kept) {
      auto layout = quant::FrameLayout(k.frame);
      auto h = quant::MeasureCodeEntropy(k.frame, k.bits);
      if (!layout.ok() || !h.ok()) {
        std::fprintf(stderr, "bench coding: a %s frame: %s\n", w->name,
                     std::string((layout.ok() ? h.status() : layout.status()).message()).c_str());
        return 1;
      }
      const std::vector<uint8_t>& payload = k.frame.payload;
      absl::StatusOr<quant::CodedPayload> c;
      enc_ms += MedianMs(opt.iters,
                         [&] { c = quant::EntropyCode(payload, *layout, k.bits, one_thread); });
      std::vector<uint8_t> back;
      absl::Status st;
      if (c.ok()) {
        dec_ms += MedianMs(opt.iters, [&] {
          st = quant::EntropyDecode(c->bytes, *layout, k.bits, &back, one_thread);
        });
      }
      if (!c.ok() || !st.ok() || back != payload) {
        std::fprintf(stderr, "bench coding: a %s frame does not code and decode back: %s\n",
                     w->name, std::string(c.ok() ? st.message() : c.status().message()).c_str());
        return 1;
      }
      elements += layout->numel();
      packed += static_cast<int64_t>(payload.size());
      coded += static_cast<int64_t>(c->bytes.size());
      headers += static_cast<int64_t>(k.serialized - payload.size());
      channels = layout->groups;
      entropy += h->bits;
      if (!opt.dump_dir.empty()) {
        std::vector<uint8_t> codes(static_cast<size_t>(layout->numel()));
        std::vector<int64_t> offsets(k.bits.size() + 1);
        (void)kernels::PackedOffsets(k.bits, layout->per_group(), absl::MakeSpan(offsets));
        for (size_t g = 0; g < k.bits.size(); ++g) {
          quant::internal::UnpackCodes(payload.data() + offsets[g], layout->per_group(), k.bits[g],
                                       codes.data() + g * static_cast<size_t>(layout->per_group()));
        }
        const std::string base = absl::StrFormat("%s/%s_%03d", opt.dump_dir, w->name, index);
        const std::vector<uint8_t>* files[2] = {&payload, &codes};
        for (int f = 0; f < 2; ++f) {
          const char* suffix = f == 0 ? ".packed" : ".codes";
          const std::vector<uint8_t>* bytes = files[f];
          const absl::Status ws = base::WriteFileAtomically(
              base + suffix,
              std::string_view(reinterpret_cast<const char*>(bytes->data()), bytes->size()));
          if (!ws.ok()) {
            std::fprintf(stderr, "bench coding: %s\n", std::string(ws.message()).c_str());
            return 1;
          }
        }
      }
      ++index;
    }
    const double n = static_cast<double>(elements);
    std::printf("%-5s %6zu %10lld %8.3f %8.3f %8.3f %8.3f %9.3f %8lld %10.2f %10.2f\n", w->name,
                w->kept.size(), static_cast<long long>(elements), 8.0 * headers / n,
                8.0 * packed / n, entropy / n, 8.0 * coded / n,
                8.0 * static_cast<double>(coded) / entropy, static_cast<long long>(channels),
                1e6 * enc_ms / n, 1e6 * dec_ms / n);
    summary += absl::StrFormat(
        "%s frames %zu elements %lld packed_bytes %lld rans_bytes %lld "
        "entropy_bits %.1f header_bytes %lld\n",
        w->name, w->kept.size(), static_cast<long long>(elements), static_cast<long long>(packed),
        static_cast<long long>(coded), entropy, static_cast<long long>(headers));
  }
  if (!opt.dump_dir.empty()) {
    const absl::Status ws = base::WriteFileAtomically(opt.dump_dir + "/summary.txt", summary);
    if (!ws.ok()) {
      std::fprintf(stderr, "bench coding: %s\n", std::string(ws.message()).c_str());
      return 1;
    }
    std::printf("wrote %s/{up,down}_NNN.{packed,codes} and summary.txt\n", opt.dump_dir.c_str());
  }
  return 0;
}

}  // namespace splitq::tools
