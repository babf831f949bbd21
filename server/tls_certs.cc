#include "server/tls_certs.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/files.h"

namespace splitq::server {
namespace {

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* c) const { X509_free(c); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

absl::Status OpenSslError(const std::string& what) {
  char buffer[256] = "no detail";
  const unsigned long code = ERR_get_error();
  if (code != 0) ERR_error_string_n(code, buffer, sizeof(buffer));
  ERR_clear_error();
  return absl::InternalError(absl::StrCat(what, ": ", buffer));
}

bool IsIpLiteral(const std::string& host) {
  ASN1_OCTET_STRING* ip = a2i_IPADDRESS(host.c_str());
  if (ip == nullptr) {
    ERR_clear_error();
    return false;
  }
  ASN1_OCTET_STRING_free(ip);
  return true;
}

absl::Status AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext == nullptr) return OpenSslError(absl::StrCat("extension ", OBJ_nid2sn(nid)));
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return ok == 1 ? absl::OkStatus() : OpenSslError("X509_add_ext");
}

struct Made {
  Key key;
  Cert cert;
};

// A certificate for `common_name`, signed by (issuer, issuer_key), or self-signed when
// issuer is null. `extensions`: (nid, value) pairs.
absl::Status MakeCert(const std::string& common_name, const CertificateOptions& options,
                      X509* issuer, EVP_PKEY* issuer_key,
                      const std::vector<std::pair<int, std::string>>& extensions, Made* out) {
  out->key.reset(EVP_EC_gen("P-256"));
  if (!out->key) return OpenSslError("EC key generation");
  out->cert.reset(X509_new());
  X509* cert = out->cert.get();
  if (cert == nullptr || X509_set_version(cert, 2) != 1) return OpenSslError("X509_new");
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof(serial)) != 1) return OpenSslError("RAND_bytes");
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof(serial), nullptr);
  const bool serial_ok = bn != nullptr && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert));
  BN_free(bn);
  if (!serial_ok) return OpenSslError("serial number");
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), static_cast<long>(options.days) * 86400L);
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(options.organization.c_str()),
                             -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  X509_set_issuer_name(cert, issuer != nullptr ? X509_get_subject_name(issuer) : name);
  if (X509_set_pubkey(cert, out->key.get()) != 1) return OpenSslError("X509_set_pubkey");
  X509* signer = issuer != nullptr ? issuer : cert;
  for (const auto& [nid, value] : extensions) {
    if (auto status = AddExtension(cert, signer, nid, value); !status.ok()) return status;
  }
  EVP_PKEY* signing_key = issuer_key != nullptr ? issuer_key : out->key.get();
  if (X509_sign(cert, signing_key, EVP_sha256()) == 0) return OpenSslError("X509_sign");
  return absl::OkStatus();
}

// The PEM text that `write` (PEM_write_bio_*) produces.
template <typename Write>
absl::StatusOr<std::string> Pem(Write write) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (bio == nullptr || write(bio) != 1) {
    BIO_free(bio);
    return OpenSslError("PEM encoding");
  }
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio, &data);
  std::string text(data, static_cast<size_t>(size));
  BIO_free(bio);
  return text;
}

absl::Status Save(const std::filesystem::path& dir, const std::string& stem, const Made& made) {
  EVP_PKEY* key = made.key.get();
  X509* cert = made.cert.get();
  absl::StatusOr<std::string> key_pem = Pem([key](BIO* b) {
    return PEM_write_bio_PrivateKey(b, key, nullptr, nullptr, 0, nullptr, nullptr);
  });
  absl::StatusOr<std::string> cert_pem =
      Pem([cert](BIO* b) { return PEM_write_bio_X509(b, cert); });
  if (!key_pem.ok()) return key_pem.status();
  if (!cert_pem.ok()) return cert_pem.status();
  if (absl::Status s = base::WriteFileAtomically(dir / (stem + ".key"), *key_pem, 0600); !s.ok()) {
    return s;
  }
  return base::WriteFileAtomically(dir / (stem + ".crt"), *cert_pem, 0644);
}

}  // namespace

absl::Status MakeCertificates(const std::string& dir, const CertificateOptions& options) {
  if (options.days < 1 || options.days > 36500) {
    return absl::InvalidArgumentError(absl::StrCat("days: ", options.days, " is outside 1..36500"));
  }
  std::vector<std::string> names{"DNS:localhost", "IP:127.0.0.1", "IP:::1"};
  for (const std::string& host : options.hosts) {
    if (host.empty()) return absl::InvalidArgumentError("hosts: an empty host name");
    // An IP literal, or a DNS name of [A-Za-z0-9.-] with at most a leading "*." wildcard.
    const std::string name = host.rfind("*.", 0) == 0 ? host.substr(2) : host;
    const bool dns = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-';
    });
    if ((!IsIpLiteral(host) && !dns) || host.size() > 253) {
      return absl::InvalidArgumentError(absl::StrCat(
          "hosts: '", host, "' is not a DNS name or an IP address ([A-Za-z0-9.-], or IPv6)"));
    }
    names.push_back(absl::StrCat(IsIpLiteral(host) ? "IP:" : "DNS:", host));
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));

  Made ca, server, client;
  absl::Status s = MakeCert("splitq CA", options, nullptr, nullptr,
                            {{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                             {NID_key_usage, "critical,keyCertSign,cRLSign"},
                             {NID_subject_key_identifier, "hash"}},
                            &ca);
  if (!s.ok()) return s;
  s = MakeCert("splitq server", options, ca.cert.get(), ca.key.get(),
               {{NID_basic_constraints, "critical,CA:FALSE"},
                {NID_key_usage, "critical,digitalSignature,keyAgreement"},
                {NID_ext_key_usage, "serverAuth"},
                {NID_subject_alt_name, absl::StrJoin(names, ",")},
                {NID_authority_key_identifier, "keyid"}},
               &server);
  if (!s.ok()) return s;
  s = MakeCert("splitq client", options, ca.cert.get(), ca.key.get(),
               {{NID_basic_constraints, "critical,CA:FALSE"},
                {NID_key_usage, "critical,digitalSignature,keyAgreement"},
                {NID_ext_key_usage, "clientAuth"},
                {NID_authority_key_identifier, "keyid"}},
               &client);
  if (!s.ok()) return s;
  for (const auto& [stem, made] :
       {std::pair<const char*, const Made*>{"ca", &ca}, {"server", &server}, {"client", &client}}) {
    if (auto saved = Save(dir, stem, *made); !saved.ok()) return saved;
  }
  return absl::OkStatus();
}

}  // namespace splitq::server
