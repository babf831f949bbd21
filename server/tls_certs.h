// splitq server: the certificates of a cluster (`splitq certs --out DIR`, and `splitq demo`).
//
// MakeCertificates writes, into `dir`:
//   ca.crt, ca.key          a self-signed certificate authority (CA:TRUE, keyCertSign)
//   server.crt, server.key  signed by the CA, for TLS servers (serverAuth); its subject
//                           alternative names are `hosts` plus localhost, 127.0.0.1 and ::1
//   client.crt, client.key  signed by the CA, for mutual TLS (clientAuth)
// Keys are ECDSA P-256, signatures SHA-256, serial numbers random (128 bits). Certificates
// and keys are PEM; key files are created with mode 0600 (owner only). Existing files are
// replaced (each through a temporary file and a rename).
//
// Servers load server.crt/server.key and trust ca.crt; clients trust ca.crt (and present
// client.crt/client.key for mutual TLS).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace splitq::server {

struct CertificateOptions {
  std::vector<std::string> hosts;  // extra DNS names or IP literals for the server cert
  int days = 365;                  // validity, from one hour before now
  std::string organization = "splitq";
};

// INVALID_ARGUMENT for days outside 1..36500 or an empty host name; INTERNAL for an OpenSSL
// or file-system failure (the message names the file or the OpenSSL error).
absl::Status MakeCertificates(const std::string& dir, const CertificateOptions& options = {});

}  // namespace splitq::server
