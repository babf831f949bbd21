#include "proto/rpc_channel.h"

#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/files.h"

namespace splitq::rpc {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& dir, const std::string& name) {
  const std::string path = dir + "/" + name;
  // Keys are secrets: refused when others may read them.
  const bool key = absl::EndsWith(name, ".key");
  absl::StatusOr<std::string> text = key ? base::ReadSecretFile(path, "private key")
                                         : base::ReadSmallFile(path, "certificate file");
  if (text.status().code() == absl::StatusCode::kNotFound) {
    return absl::NotFoundError(
        absl::StrCat(path, " is missing (make the folder with `splitq certs --out ", dir, "`)"));
  }
  return text;
}

}  // namespace

absl::Status ValidateSecurity(const TransportSecurity& s) {
  if (s.tls_dir.empty() == !s.insecure) {
    return absl::InvalidArgumentError(
        s.insecure ? "--insecure and a TLS directory exclude each other"
                   : "no transport security: give a TLS directory (from `splitq certs`) or "
                     "--insecure for plaintext");
  }
  if (s.insecure && s.mutual_tls) {
    return absl::InvalidArgumentError("--mtls needs TLS: give a TLS directory, not --insecure");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TransportSecurity& s) {
  if (absl::Status v = ValidateSecurity(s); !v.ok()) return v;
  if (s.insecure) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadPem(s.tls_dir, "ca.crt");
  if (!ca.ok()) return ca.status();
  options.pem_root_certs = *ca;
  if (s.mutual_tls) {
    absl::StatusOr<std::string> key = ReadPem(s.tls_dir, "client.key");
    absl::StatusOr<std::string> cert = ReadPem(s.tls_dir, "client.crt");
    if (!key.ok()) return key.status();
    if (!cert.ok()) return cert.status();
    options.pem_private_key = *key;
    options.pem_cert_chain = *cert;
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TransportSecurity& s) {
  if (absl::Status v = ValidateSecurity(s); !v.ok()) return v;
  if (s.insecure) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> ca = ReadPem(s.tls_dir, "ca.crt");
  absl::StatusOr<std::string> key = ReadPem(s.tls_dir, "server.key");
  absl::StatusOr<std::string> cert = ReadPem(s.tls_dir, "server.crt");
  for (const auto* r : {&ca, &key, &cert}) {
    if (!r->ok()) return r->status();
  }
  grpc::SslServerCredentialsOptions options(
      s.mutual_tls ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_root_certs = *ca;
  options.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(options);
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // The numeric values of grpc::StatusCode and absl::StatusCode are the same canonical codes.
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

void AddBearer(grpc::ClientContext& context, const std::string& token) {
  context.AddMetadata("authorization", "Bearer " + token);
}

}  // namespace splitq::rpc
