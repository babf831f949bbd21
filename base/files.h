// splitq base: the one way the product writes a file that must never be seen half-written
// (checkpoints, summaries, keys, certificates, tokens, run ids), and how it reads small files
// (tokens, certificates).
//
// Every such write goes through a temporary file beside the target (`path`.tmp.XXXXXX, a new
// name each time), fsync, a rename over the target and an fsync of the folder: a reader sees
// the old file or the new one, and neither a crash nor a power failure leaves an empty or
// partial file (a crash may leave the temporary beside it).
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::base {

// Writes `contents` to `path` atomically and durably (above). The file gets exactly `mode`
// (e.g. 0600 for keys and tokens), whatever the umask. INTERNAL naming the file and the
// reason on failure; the target is then untouched.
absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view contents,
                                 mode_t mode = 0644);

// The second half of WriteFileAtomically, for a writer that fills `temp` itself (a torch
// archive): fsyncs `temp`, renames it over `path`, fsyncs the folder. INTERNAL on failure,
// and `temp` is removed.
absl::Status CommitFile(const std::filesystem::path& temp, const std::filesystem::path& path);

// The whole of a small file or pipe (at most `max_bytes`). NOT_FOUND when it does not exist,
// PERMISSION_DENIED when it cannot be read, INVALID_ARGUMENT for a directory or more than
// max_bytes; each message names the file and says `what` it is (e.g. "token file"). A FIFO
// without a writer blocks, as for any reader.
absl::StatusOr<std::string> ReadSmallFile(const std::filesystem::path& path, const char* what,
                                          size_t max_bytes = 16 << 20);

// ReadSmallFile for a secret (a key, a token file): FAILED_PRECONDITION, naming the file and
// the fix, when it is a regular file that its group or others may read or write (mode & 066:
// a secret others may replace is no secret either), as ssh does for private keys. Pipes (`--token
// <(...)`) are taken as they are.
absl::StatusOr<std::string> ReadSecretFile(const std::filesystem::path& path, const char* what,
                                           size_t max_bytes = 16 << 20);

// Copies the files `names` of folder `from` into folder `to` (made if missing), each written
// atomically with `mode` (0600 for secrets), for handing a role only the secrets it needs
// (`splitq certs --export-*`, `splitq tokens --export`). The first failure is returned, naming
// the file: NOT_FOUND for a missing source, INTERNAL when `to` cannot be made or written.
absl::Status CopyFilesInto(const std::filesystem::path& from, const std::vector<std::string>& names,
                           const std::filesystem::path& to, mode_t mode);

// Removes `path` and everything under it, with POSIX calls (nftw); a missing path is fine.
// Use this, not std::filesystem::remove_all, in anything that links PyTorch's libtorch: on the
// GPU host remove_all binds to the copy of std::filesystem inside libtorch.so, built against
// another libstdc++, and crashes on a directory that holds files.
void RemoveTree(const std::string& path);

}  // namespace splitq::base
