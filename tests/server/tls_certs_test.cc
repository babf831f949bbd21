// server/tls_certs.h: the certificates verify against their CA with the right purposes and
// names, each key matches its certificate, key files are private, bad options are refused.
#include "server/tls_certs.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "base/files.h"

namespace splitq::server {
namespace {

X509* ReadCert(const std::filesystem::path& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return nullptr;
  X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  return cert;
}

EVP_PKEY* ReadKey(const std::filesystem::path& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return nullptr;
  EVP_PKEY* key = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  return key;
}

bool VerifiesAgainst(X509* ca, X509* cert) {
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca);
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, cert, nullptr);
  const bool ok = X509_verify_cert(ctx) == 1;
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  return ok;
}

class Certificates : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("splitq_certs_" + std::to_string(getpid()));
    base::RemoveTree(dir_);
    CertificateOptions options;
    options.hosts = {"worker-1.example", "10.1.2.3"};
    ASSERT_TRUE(MakeCertificates(dir_.string(), options).ok());
    ca_ = ReadCert(dir_ / "ca.crt");
    server_ = ReadCert(dir_ / "server.crt");
    client_ = ReadCert(dir_ / "client.crt");
    ASSERT_NE(ca_, nullptr);
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(client_, nullptr);
  }
  void TearDown() override {
    X509_free(ca_);
    X509_free(server_);
    X509_free(client_);
    base::RemoveTree(dir_);
  }
  std::filesystem::path dir_;
  X509 *ca_ = nullptr, *server_ = nullptr, *client_ = nullptr;
};

TEST_F(Certificates, ChainToTheirCaWithTheRightPurposes) {
  EXPECT_TRUE(VerifiesAgainst(ca_, server_));
  EXPECT_TRUE(VerifiesAgainst(ca_, client_));
  EXPECT_EQ(X509_check_purpose(server_, X509_PURPOSE_SSL_SERVER, 0), 1);
  EXPECT_EQ(X509_check_purpose(client_, X509_PURPOSE_SSL_CLIENT, 0), 1);
  EXPECT_NE(X509_check_purpose(client_, X509_PURPOSE_SSL_SERVER, 0), 1);
  EXPECT_EQ(X509_check_ca(ca_), 1);
  EXPECT_EQ(X509_check_ca(server_), 0);
  // A certificate from another CA does not verify.
  const std::filesystem::path other = dir_ / "other";
  ASSERT_TRUE(MakeCertificates(other.string()).ok());
  X509* other_ca = ReadCert(other / "ca.crt");
  EXPECT_FALSE(VerifiesAgainst(other_ca, server_));
  X509_free(other_ca);
}

TEST_F(Certificates, ServerNamesIncludeLoopbackAndTheGivenHosts) {
  EXPECT_EQ(X509_check_host(server_, "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_host(server_, "worker-1.example", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(server_, "127.0.0.1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(server_, "::1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(server_, "10.1.2.3", 0), 1);
  EXPECT_NE(X509_check_host(server_, "evil.example", 0, 0, nullptr), 1);
}

TEST_F(Certificates, KeysMatchAndArePrivate) {
  for (const char* stem : {"ca", "server", "client"}) {
    const std::filesystem::path key_path = dir_ / (std::string(stem) + ".key");
    EVP_PKEY* key = ReadKey(key_path);
    ASSERT_NE(key, nullptr) << stem;
    X509* cert = ReadCert(dir_ / (std::string(stem) + ".crt"));
    EXPECT_EQ(X509_check_private_key(cert, key), 1) << stem;
    X509_free(cert);
    EVP_PKEY_free(key);
    struct stat st {};
    ASSERT_EQ(stat(key_path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << stem;
  }
}

TEST(CertificateOptions, BadOptionsAreRefused) {
  CertificateOptions days;
  days.days = 0;
  EXPECT_EQ(MakeCertificates("/tmp/splitq_certs_bad", days).code(),
            absl::StatusCode::kInvalidArgument);
  CertificateOptions host;
  for (const char* bad : {"", "bad host/with slash", "a b", "a:b", "x*.y"}) {
    host.hosts = {bad};
    EXPECT_EQ(MakeCertificates("/tmp/splitq_certs_bad", host).code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

}  // namespace
}  // namespace splitq::server
