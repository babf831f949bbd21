// `splitq bench transport [--json FILE] [--mib N] [--chunk-kib K] [--streams S | --sessions N]
// [--protobuf]
// [--sync-server] [--grpc-arg NAME=INT]... [--frame-kib K]...`:
// frames over gRPC on loopback against a raw TCP socket moving the same bytes
// (tools/transport_bench.h).
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "tools/transport_bench.h"

namespace splitq::cli {

void RegisterBenchTransport(CLI::App& bench, RunFn* run) {
  struct Options {
    std::string json;
    int mib = 256;
    int chunk_kib = 1024;
    int streams = 1;
    int sessions = 1;
    bool sync_server = false;
    bool protobuf = false;
    std::vector<std::string> grpc_args;
    std::vector<int> frame_kib;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = bench.add_subcommand(
      "transport", "Frames over gRPC on loopback against a raw TCP socket, same bytes");
  cmd->add_option("--json", opt->json, "Also write the results as JSON to this file");
  cmd->add_option("--mib", opt->mib, "MiB moved per frame size and round (default 256)")
      ->check(IntRange(1, 1 << 30));
  cmd->add_option("--chunk-kib", opt->chunk_kib,
                  "FrameChunk size in KiB (default 1024, the client's)")
      ->check(IntRange(1, 4096));
  cmd->add_option("--streams", opt->streams,
                  "Experiment: deal each frame's chunks over this many streams, one HTTP/2 "
                  "connection each (default 1, what a session does)")
      ->check(IntRange(1, 16));
  cmd->add_option("--sessions", opt->sessions,
                  "A worker's aggregate ingest: this many sessions at once (own connection "
                  "each) against as many TCP connections; rates are summed (default 1)")
      ->check(IntRange(1, 64));
  cmd->add_option("--frame-kib", opt->frame_kib,
                  "Measure only this frame size in KiB (repeatable; default 64, 256, 1024, 4096 "
                  "and 16384)")
      ->check(IntRange(1, 65536));
  cmd->add_flag("--sync-server", opt->sync_server,
                "Serve with gRPC's sync API instead of the callback API the worker uses "
                "(implies --protobuf)");
  cmd->add_flag("--protobuf", opt->protobuf,
                "Send and read chunks through protobuf's generated classes (copies the data), "
                "not without copies as sessions do");
  cmd->add_option("--grpc-arg", opt->grpc_args,
                  "A gRPC channel argument NAME=INT for both ends (repeatable), e.g. "
                  "grpc.http2.max_frame_size=1048576")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            const size_t eq = s.find('=');
            if (eq == std::string::npos || eq == 0) return "expected NAME=INT, got " + s;
            const std::optional<int64_t> v = ParseWholeNumber(std::string_view(s).substr(eq + 1));
            if (!v || *v < INT32_MIN || *v > INT32_MAX) {
              return "the value of " + s + " is not a 32-bit integer";
            }
            return std::string();
          },
          "NAME=INT"));
  cmd->callback([opt, run] {
    *run = [opt] {
      // The file opens before the minutes of measuring, not after.
      std::ofstream out;
      if (!opt->json.empty()) {
        out.open(opt->json);
        if (!out) {
          std::fprintf(stderr, "bench transport: cannot write %s: %s\n", opt->json.c_str(),
                       std::strerror(errno));
          return 1;
        }
      }
      tools::TransportOptions options;
      options.mib_per_size = opt->mib;
      options.chunk_bytes = int64_t{opt->chunk_kib} << 10;
      options.streams = opt->streams;
      options.sessions = opt->sessions;
      options.callback_server = !opt->sync_server;
      options.protobuf_messages = opt->protobuf || opt->sync_server;
      for (const int kib : opt->frame_kib) options.frame_sizes.push_back(int64_t{kib} << 10);
      for (const std::string& a : opt->grpc_args) {
        const size_t eq = a.find('=');
        options.grpc_args.emplace_back(a.substr(0, eq), std::stoi(a.substr(eq + 1)));
      }
      const char* messages = options.protobuf_messages ? "protobuf" : "zero-copy";
      if (options.sessions > 1) {
        std::printf(
            "gRPC: %d sessions at once, one stream and connection each, %d KiB chunks, %s "
            "messages, %s server API; TCP: %d connections; MB/s summed over them\n",
            options.sessions, opt->chunk_kib, messages,
            options.callback_server ? "callback" : "sync", options.sessions);
      } else {
        std::printf(
            "gRPC: %d stream(s), %d KiB chunks, %s messages, %s server API; TCP: one "
            "connection\n",
            options.streams, opt->chunk_kib, messages,
            options.callback_server ? "callback" : "sync");
      }
      auto results = tools::RunTransportBench(options);
      if (!results.ok()) {
        std::fprintf(stderr, "bench transport: %s\n", results.status().ToString().c_str());
        return 1;
      }
      std::printf("%-10s %8s %12s %12s %8s\n", "frame", "frames", "gRPC MB/s", "TCP MB/s", "ratio");
      std::string json = absl::StrFormat(
          "{\"chunk_bytes\": %d, \"streams\": %d, \"sessions\": %d, \"messages\": \"%s\", "
          "\"server_api\": \"%s\", \"results\": [",
          options.chunk_bytes, options.streams, options.sessions, messages,
          options.callback_server ? "callback" : "sync");
      for (const tools::TransportResult& r : *results) {
        const double ratio = r.grpc_mb_s / r.tcp_mb_s;
        std::printf("%-10s %8d %12.0f %12.0f %8.3f\n",
                    absl::StrFormat("%d KiB", r.frame_bytes >> 10).c_str(), r.frames, r.grpc_mb_s,
                    r.tcp_mb_s, ratio);
        json += absl::StrFormat(
            "%s{\"frame_bytes\": %d, \"frames\": %d, \"grpc_mb_s\": %.1f, "
            "\"tcp_mb_s\": %.1f, \"ratio\": %.4f}",
            json.back() == '[' ? "" : ", ", r.frame_bytes, r.frames, r.grpc_mb_s, r.tcp_mb_s,
            ratio);
      }
      json += "]}\n";
      if (!opt->json.empty()) {
        out << json;
        out.close();
        if (!out) {
          std::fprintf(stderr, "bench transport: cannot write %s\n", opt->json.c_str());
          return 1;
        }
      }
      return 0;
    };
  });
}

}  // namespace splitq::cli
