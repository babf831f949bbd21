// `splitq certs --out DIR [--host NAME ...] [--days N] [--keep | --force] [--export-server DIR]
// [--export-ca DIR] [--export-client DIR]`: a CA plus server and client certificates for the
// cluster's TLS (server/tls_certs.h), and copies of what each role needs in folders of their own
// (docker-compose.yml gives each role only its folder: the CA key never leaves DIR).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
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
      // The copies for each role, made again on every run (a new volume gets them too).
      const auto exported = [&opt]() -> int {
        const std::filesystem::path from(opt->out);
        for (const auto& [dir, names] :
             std::vector<std::pair<std::string, std::vector<std::string>>>{
                 {opt->export_server, {"server.crt", "server.key"}},
                 {opt->export_ca, {}},
                 {opt->export_client, {"client.crt", "client.key"}}}) {
          if (dir.empty()) continue;
          absl::Status status = base::CopyFilesInto(from, {"ca.crt"}, dir, 0644);
          for (const std::string& name : names) {
            if (!status.ok()) break;
            const bool secret = name.size() > 4 && name.substr(name.size() - 4) == ".key";
            status = base::CopyFilesInto(from, {name}, dir, secret ? 0600 : 0644);
          }
          if (!status.ok()) {
            std::fprintf(stderr, "certs: %s\n", std::string(status.message()).c_str());
            return 1;
          }
          std::printf("copied ca.crt%s%s to %s\n", names.empty() ? "" : ", ",
                      names.empty() ? "" : (names[0] + " and " + names[1]).c_str(), dir.c_str());
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
