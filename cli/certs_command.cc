// `splitq certs --out DIR [--host NAME ...] [--days N] [--keep | --force] [--export-server DIR]
// [--export-ca DIR] [--export-client DIR]`: a CA plus server and client certificates for the
// cluster's TLS (server/tls_certs.h), and copies of what each role needs in folders of their own
// (docker-compose.yml gives each role only its folder: the CA key never leaves DIR).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "base/files.h"
#include "cli/commands.h"
#include "server/tls_certs.h"

namespace splitq::cli {

void RegisterCerts(CLI::App& app, RunFn* run) {
  struct Options {
    std::string out;
    server::CertificateOptions certs;
    bool keep = false, force = false;
    std::string export_server, export_ca, export_client;
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
  cmd->add_option("--export-server", opt->export_server,
                  "Also copy ca.crt, server.crt and server.key here (for the servers)");
  cmd->add_option("--export-ca", opt->export_ca,
                  "Also copy ca.crt alone here (for clients without --mtls)");
  cmd->add_option("--export-client", opt->export_client,
                  "Also copy ca.crt, client.crt and client.key here (for --mtls clients)");
  cmd->callback([opt, run] {
    *run = [opt] {
      // The copies for each role, made again on every run (a new volume gets them too): ca.crt,
      // and the role's certificate and key where it has them.
      const auto exported = [&opt]() -> int {
        struct Export {
          const std::string& dir;
          std::string name;  // "server", "client" or "" (ca.crt alone)
        };
        for (const Export& e : {Export{opt->export_server, "server"}, Export{opt->export_ca, ""},
                                Export{opt->export_client, "client"}}) {
          if (e.dir.empty()) continue;
          std::vector<std::string> certs = {"ca.crt"};
          if (!e.name.empty()) certs.push_back(e.name + ".crt");
          absl::Status status = base::CopyFilesInto(opt->out, certs, e.dir, 0644);
          if (status.ok() && !e.name.empty()) {
            status = base::CopyFilesInto(opt->out, {e.name + ".key"}, e.dir, 0600);
          }
          if (!status.ok()) {
            std::fprintf(stderr, "certs: %s\n", std::string(status.message()).c_str());
            return 1;
          }
          std::printf("copied ca.crt%s to %s\n",
                      e.name.empty() ? "" : (", " + e.name + ".crt and " + e.name + ".key").c_str(),
                      e.dir.c_str());
        }
        return 0;
      };
      const bool exists = std::filesystem::exists(std::filesystem::path(opt->out) / "ca.crt");
      if (opt->keep && exists) {
        std::printf("kept the certificates in %s\n", opt->out.c_str());
        return exported();
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
      return exported();
    };
  });
}

}  // namespace splitq::cli
