// `splitq-health HOST:PORT (--tls-dir DIR | --insecure) [--mtls] [--service S] [--timeout-ms N]`:
// `splitq health` as a binary of its own that does not link libtorch (cli/health_flags.h), for
// docker compose healthchecks. Exits 0 when SERVING, 1 otherwise, 2 for bad arguments.
#include <cstdlib>
#include <string>

#include "cli/health_flags.h"

int main(int argc, char** argv) {
  CLI::App app{"Ask a splitq server for its gRPC health (splitq health without libtorch)",
               "splitq-health"};
  splitq::cli::HealthOptions options;
  splitq::cli::AddHealthOptions(&app, &options);
  CLI11_PARSE(app, argc, argv);
  // As `splitq`: SPLITQ_PARSE_ONLY=1 checks the command line only (tests/deploy/compose_test.cc).
  if (const char* parse_only = std::getenv("SPLITQ_PARSE_ONLY");
      parse_only != nullptr && std::string(parse_only) == "1") {
    return 0;
  }
  return splitq::cli::RunHealth(options);
}
