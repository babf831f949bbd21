// splitq server: bearer tokens, one per client (design.md, "Security and faults").
//
// A token file holds one client per line, "CLIENT_ID TOKEN" (blank lines and lines starting
// with '#' are skipped); a client's own token file holds just its token. `splitq tokens --out
// DIR ID...` writes DIR/tokens (for the coordinator and workers) and DIR/ID.token (for each
// client), all mode 0600. Tokens are 32 random bytes in hex (OpenSSL's RAND_bytes).
//
// On the wire a client sends the call metadata "authorization: Bearer TOKEN" on every call
// (AddBearer); a server checks it with Authenticate before doing anything else, and answers
// UNAUTHENTICATED without saying which part was wrong.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/support/string_ref.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::server {

class TokenSet {
 public:
  // INVALID_ARGUMENT for a malformed line (naming the file and line), a duplicate id or
  // token, or an id outside [A-Za-z0-9._-]{1,64} or . or ..; Load also for a file without any token
  // (it would refuse every call) or one that is not a regular file. NOT_FOUND for a missing file,
  // PERMISSION_DENIED for one that cannot be read.
  static absl::StatusOr<TokenSet> Load(const std::string& path);
  static absl::StatusOr<TokenSet> Parse(const std::string& text, const std::string& origin);

  // The client id the call's bearer token belongs to, or UNAUTHENTICATED.
  absl::StatusOr<std::string> Authenticate(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

  size_t size() const { return tokens_.size(); }

 private:
  std::vector<std::pair<std::string, std::string>> tokens_;  // (id, token)
};

// A fresh token: 64 hex digits.
absl::StatusOr<std::string> MakeToken();
// Writes DIR/tokens and DIR/<id>.token for each id (mode 0600).
absl::Status WriteTokens(const std::string& dir, const std::vector<std::string>& client_ids);
// Reads a client's token file (surrounding white space dropped); errors as TokenSet::Load.
absl::StatusOr<std::string> ReadToken(const std::string& path);

}  // namespace splitq::server
