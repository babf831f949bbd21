#include "server/tokens.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <filesystem>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/files.h"
#include "server/coordinator_core.h"

namespace splitq::server {

absl::StatusOr<TokenSet> TokenSet::Parse(const std::string& text, const std::string& origin) {
  TokenSet set;
  std::set<std::string> ids, tokens;
  int line_number = 0;
  for (const absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_number;
    const absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line[0] == '#') continue;
    const std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(origin, ":", line_number,
                                                     ": expected 'CLIENT_ID TOKEN', got ",
                                                     fields.size(), " fields"));
    }
    if (!IsValidMemberName(fields[0])) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": client id '", fields[0],
                       "' is not 1..64 of [A-Za-z0-9._-], not . or .."));
    }
    if (fields[1].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": the token is shorter than 16 characters"));
    }
    if (!ids.insert(fields[0]).second || !tokens.insert(fields[1]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": duplicate client id or token"));
    }
    set.tokens_.emplace_back(fields[0], fields[1]);
  }
  return set;
}

absl::StatusOr<TokenSet> TokenSet::Load(const std::string& path) {
  absl::StatusOr<std::string> text = base::ReadSecretFile(path, "token file");
  if (!text.ok()) return text.status();
  absl::StatusOr<TokenSet> set = Parse(*text, path);
  if (set.ok() && set->size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": no tokens in it, so every call would be refused (make them with `splitq tokens`)"));
  }
  return set;
}

absl::StatusOr<std::string> TokenSet::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  const auto it = metadata.find("authorization");
  constexpr absl::string_view kPrefix = "Bearer ";
  if (it == metadata.end() || it->second.size() <= kPrefix.size() ||
      absl::string_view(it->second.data(), kPrefix.size()) != kPrefix) {
    return absl::UnauthenticatedError("a bearer token is required");
  }
  const absl::string_view presented(it->second.data() + kPrefix.size(),
                                    it->second.size() - kPrefix.size());
  const std::string* match = nullptr;
  for (const auto& [id, token] : tokens_) {
    // Constant time per candidate, and every candidate is compared.
    if (token.size() == presented.size() &&
        CRYPTO_memcmp(token.data(), presented.data(), token.size()) == 0) {
      match = &id;
    }
  }
  if (match == nullptr) return absl::UnauthenticatedError("the bearer token is not valid");
  return *match;
}

absl::StatusOr<std::string> MakeToken() {
  unsigned char bytes[32];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return absl::InternalError("RAND_bytes failed");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (const unsigned char b : bytes) {
    token.push_back(kHex[b >> 4]);
    token.push_back(kHex[b & 15]);
  }
  return token;
}

absl::Status WriteTokens(const std::string& dir, const std::vector<std::string>& client_ids) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));
  std::string all = "# splitq bearer tokens: CLIENT_ID TOKEN (keep this file private)\n";
  std::set<std::string> seen;
  for (const std::string& id : client_ids) {
    if (!IsValidMemberName(id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("client id '", id, "' is not 1..64 of [A-Za-z0-9._-], not . or .."));
    }
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat("client id '", id, "' appears twice"));
    }
  }
  for (const std::string& id : client_ids) {
    absl::StatusOr<std::string> token = MakeToken();
    if (!token.ok()) return token.status();
    absl::StrAppend(&all, id, " ", *token, "\n");
    if (absl::Status s = base::WriteFileAtomically(std::filesystem::path(dir) / (id + ".token"),
                                                   *token + "\n", 0600);
        !s.ok()) {
      return s;
    }
  }
  return base::WriteFileAtomically(std::filesystem::path(dir) / "tokens", all, 0600);
}

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  absl::StatusOr<std::string> text = base::ReadSecretFile(path, "token file", 4096);
  if (!text.ok()) return text.status();
  const std::string token(absl::StripAsciiWhitespace(*text));
  if (token.size() < 16) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no token (16+ characters) in it"));
  }
  return token;
}

}  // namespace splitq::server
