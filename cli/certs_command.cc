// `splitq certs --out DIR [--host NAME ...] [--days N]`: a CA plus server and client
// certificates for the cluster's TLS (server/tls_certs.h).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "server/tls_certs.h"

namespace splitq::cli {

void RegisterCerts(CLI::App& app, RunFn* run) {
  struct Options {
    std::string out;
    server::CertificateOptions certs;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("certs", "Make a CA plus server and client certificates");
  cmd->add_option("--out", opt->out, "Output folder")->required();
  cmd->add_option("--host", opt->certs.hosts,
                  "Extra DNS name or IP of the servers (localhost, 127.0.0.1, ::1 are always in)");
  cmd->add_option("--days", opt->certs.days, "Validity in days (1..36500, default 365)");
  cmd->callback([opt, run] {
    *run = [opt] {
      const absl::Status status = server::MakeCertificates(opt->out, opt->certs);
      if (!status.ok()) {
        std::fprintf(stderr, "certs: %s\n", std::string(status.message()).c_str());
        return 1;
      }
      std::printf(
          "wrote %s/{ca,server,client}.{crt,key} (keys are mode 0600: keep ca.key offline)\n",
          opt->out.c_str());
      return 0;
    };
  });
}

}  // namespace splitq::cli
