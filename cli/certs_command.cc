// `splitq certs --out DIR [--host NAME ...] [--days N] [--keep | --force]`: a CA plus server and
// client certificates for the cluster's TLS (server/tls_certs.h).
#include <cstdio>
#include <filesystem>
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
    bool keep = false, force = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("certs", "Make a CA plus server and client certificates");
  cmd->add_option("--out", opt->out, "Output folder")->required();
  cmd->add_option("--host", opt->certs.hosts,
                  "Extra DNS name or IP of the servers (localhost, 127.0.0.1, ::1 are always in)");
  cmd->add_option("--days", opt->certs.days, "Validity in days (1..36500, default 365)");
  CLI::Option* keep =
      cmd->add_flag("--keep", opt->keep,
                    "Do nothing when --out already holds ca.crt (for init containers that rerun)");
  cmd->add_flag("--force", opt->force,
                "Replace the CA in --out (every ca.crt copied from it stops working)")
      ->excludes(keep);
  cmd->callback([opt, run] {
    *run = [opt] {
      const bool exists = std::filesystem::exists(std::filesystem::path(opt->out) / "ca.crt");
      if (opt->keep && exists) {
        std::printf("kept the certificates in %s\n", opt->out.c_str());
        return 0;
      }
      if (exists && !opt->force) {
        std::fprintf(stderr,
                     "certs: %s already holds a CA (ca.crt): --keep to leave it, or --force to "
                     "replace it (every ca.crt copied from it stops working)\n",
                     opt->out.c_str());
        return 2;
      }
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
