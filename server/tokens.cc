#include "server/tokens.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <filesystem>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "server/coordinator_core.h"

namespace splitq::server {
namespace {
// The lookup key of a token: its SHA-256, raw (no hex: this runs on every call).
std::string Digest(absl::string_view token) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(token.data(), token.size(), digest, &size, EVP_sha256(), nullptr) != 1) {
    return std::string();  // never matches a stored key (Parse refuses a file it cannot hash)
  }
  return std::string(reinterpret_cast<const char*>(digest), size);
}
}  // namespace

namespace {

// A token travels as an HTTP/2 header value ("Bearer TOKEN"): gRPC aborts the process on a
// byte it may not send there, so only visible ASCII (0x21..0x7e) is accepted.
absl::Status CheckTokenText(absl::string_view token, const std::string& where) {
  for (size_t i = 0; i < token.size(); ++i) {
    const auto c = static_cast<unsigned char>(token[i]);
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": the token holds byte 0x", absl::Hex(c, absl::kZeroPad2), " at position ", i,
          ": a token is visible ASCII only (0x21..0x7e), as `splitq tokens` makes them"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenSet> TokenSet::Parse(const std::string& text, const std::string& origin) {
  TokenSet set;
  std::set<std::string> ids, tokens;
  int line_number = 0;
  for (const absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_number;
    const absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line[0] == '#') continue;
    const std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() != 2 && fields.size() != 3) {
      return absl::InvalidArgumentError(absl::StrCat(origin, ":", line_number,
                                                     ": expected 'ID TOKEN client|worker', got ",
                                                     fields.size(), " fields"));
    }
    TokenRole role = TokenRole::kAny;
    if (fields.size() == 3) {
      if (fields[2] == "client") {
        role = TokenRole::kClient;
      } else if (fields[2] == "worker") {
        role = TokenRole::kWorker;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(origin, ":", line_number, ": role '", fields[2], "': client or worker"));
      }
    }
    if (!IsValidMemberName(fields[0])) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": client id '", fields[0],
                       "' is not 1..64 of [A-Za-z0-9._-], not . or .."));
    }
    if (absl::Status st = CheckTokenText(fields[1], absl::StrCat(origin, ":", line_number));
        !st.ok()) {
      return st;
    }
    if (fields[1].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": the token is shorter than 16 characters"));
    }
    if (!ids.insert(fields[0]).second || !tokens.insert(fields[1]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line_number, ": duplicate client id or token"));
    }
    std::string digest = Digest(fields[1]);
    if (digest.empty()) return absl::InternalError("SHA-256 (OpenSSL EVP_Digest) failed");
    set.by_digest_.emplace(std::move(digest), set.tokens_.size());
    set.tokens_.push_back(Entry{fields[0], fields[1], role});
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

const char* TokenRoleName(TokenRole role) {
  switch (role) {
    case TokenRole::kClient:
      return "client";
    case TokenRole::kWorker:
      return "worker";
    case TokenRole::kAny:
      break;
  }
  return "client or worker";
}

absl::StatusOr<Bearer> TokenSet::Identify(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  const auto it = metadata.find("authorization");
  constexpr absl::string_view kPrefix = "Bearer ";
  if (it == metadata.end() || it->second.size() <= kPrefix.size() ||
      absl::string_view(it->second.data(), kPrefix.size()) != kPrefix) {
    return absl::UnauthenticatedError("a bearer token is required");
  }
  const absl::string_view presented(it->second.data() + kPrefix.size(),
                                    it->second.size() - kPrefix.size());
  const auto candidate = by_digest_.find(Digest(presented));
  const Entry* e = candidate == by_digest_.end() ? nullptr : &tokens_[candidate->second];
  // The digest found the one candidate; the token itself is compared in constant time.
  if (e == nullptr || e->token.size() != presented.size() ||
      CRYPTO_memcmp(e->token.data(), presented.data(), e->token.size()) != 0) {
    return absl::UnauthenticatedError("the bearer token is not valid");
  }
  return Bearer{e->id, e->role};
}

absl::StatusOr<std::string> TokenSet::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  absl::StatusOr<Bearer> bearer = Identify(metadata);
  if (!bearer.ok()) return bearer.status();
  return bearer->id;
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

absl::Status WriteTokens(const std::string& dir, const std::vector<std::string>& client_ids,
                         const std::vector<std::string>& worker_ids) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));
  std::string all =
      "# splitq bearer tokens: ID TOKEN ROLE (client or worker; keep this file private)\n";
  std::vector<std::pair<std::string, const char*>> members;
  for (const std::string& id : worker_ids) members.emplace_back(id, "worker");
  for (const std::string& id : client_ids) members.emplace_back(id, "client");
  std::set<std::string> seen;
  for (const auto& [id, role] : members) {
    if (!IsValidMemberName(id)) {
      return absl::InvalidArgumentError(
          absl::StrCat(role, " id '", id, "' is not 1..64 of [A-Za-z0-9._-], not . or .."));
    }
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat("id '", id, "' appears twice"));
    }
  }
  for (const auto& [id, role] : members) {
    absl::StatusOr<std::string> token = MakeToken();
    if (!token.ok()) return token.status();
    absl::StrAppend(&all, id, " ", *token, " ", role, "\n");
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
  SPLITQ_RETURN_IF_ERROR(CheckTokenText(token, path));
  if (token.size() < 16) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no token (16+ characters) in it"));
  }
  return token;
}

}  // namespace splitq::server
