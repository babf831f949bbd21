// splitq base: SHA-256 digests in hex (OpenSSL's EVP interface), for the config digest that
// clients and workers compare and the digest of a server part's weights.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace splitq::base {

// Feed bytes with Update, then HexDigest() once (64 lowercase hex digits).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(const void* data, size_t size);
  void Update(const std::string& bytes) { Update(bytes.data(), bytes.size()); }
  std::string HexDigest();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The digest of `bytes` in one call.
std::string Sha256Hex(const std::string& bytes);

}  // namespace splitq::base
