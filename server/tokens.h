// splitq server: bearer tokens, one per client or worker (design.md, "Security and faults").
//
// A token file holds one member per line, "ID TOKEN ROLE" with ROLE client or worker (blank
// lines and lines starting with '#' are skipped); a member's own token file holds just its
// token. `splitq tokens --out DIR [--worker NAME]... ID...` writes DIR/tokens (for the
// coordinator and workers) and DIR/ID.token for each, all mode 0600. Tokens are 32 random bytes
// in hex (OpenSSL's RAND_bytes).
//
// Roles: the coordinator registers a worker only for a worker token and a client only for a
// client token, and a worker opens sessions only for client tokens (PERMISSION_DENIED
// otherwise). A line without a role (files written before 2026-12-05) gives a token of either
// role, as then.
//
// On the wire a client sends the call metadata "authorization: Bearer TOKEN" on every call
// (AddBearer); a server checks it with Authenticate before doing anything else, and answers
// UNAUTHENTICATED without saying which part was wrong.
//
// A check costs O(1) in the number of tokens: the presented token's SHA-256 finds the one
// candidate, which is then compared in constant time (CRYPTO_memcmp). What the lookup's timing
// can reveal is about the digest of what the caller sent, not about any stored token.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/support/string_ref.h>

#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::server {

enum class TokenRole { kAny, kClient, kWorker };

// Who a call's token belongs to.
struct Bearer {
  std::string id;
  TokenRole role = TokenRole::kAny;
};

// "client", "worker" or "client or worker".
const char* TokenRoleName(TokenRole role);

class TokenSet {
 public:
  // INVALID_ARGUMENT for a malformed line (naming the file and line), a duplicate id or
  // token, or an id outside [A-Za-z0-9._-]{1,64} or . or ..; Load also for a file without any token
  // (it would refuse every call) or one that is not a regular file. NOT_FOUND for a missing file,
  // PERMISSION_DENIED for one that cannot be read.
  static absl::StatusOr<TokenSet> Load(const std::string& path);
  static absl::StatusOr<TokenSet> Parse(const std::string& text, const std::string& origin);

  // The id the call's bearer token belongs to, or UNAUTHENTICATED.
  absl::StatusOr<std::string> Authenticate(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;
  // The same, with the token's role.
  absl::StatusOr<Bearer> Identify(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

  size_t size() const { return tokens_.size(); }

 private:
  struct Entry {
    std::string id, token;
    TokenRole role = TokenRole::kAny;
  };
  std::vector<Entry> tokens_;
  std::unordered_map<std::string, size_t> by_digest_;  // a token's SHA-256 -> tokens_ index
};

// A fresh token: 64 hex digits.
absl::StatusOr<std::string> MakeToken();
// Writes DIR/tokens and DIR/<id>.token for each id (mode 0600): client tokens for
// `client_ids`, worker tokens for `worker_ids`.
absl::Status WriteTokens(const std::string& dir, const std::vector<std::string>& client_ids,
                         const std::vector<std::string>& worker_ids = {});
// Reads a client's token file (surrounding white space dropped); errors as TokenSet::Load.
absl::StatusOr<std::string> ReadToken(const std::string& path);

}  // namespace splitq::server
