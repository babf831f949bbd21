// splitq server: writing and reading the small private files of a cluster (keys, certificates,
// tokens).
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::server {

// Writes `contents` to `path` through a temporary file and a rename, so a reader never sees
// a half-written file. The file gets exactly `mode` (e.g. 0600 for keys and tokens),
// whatever the umask. INTERNAL naming the file on failure.
absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view contents,
                                 mode_t mode);

// The whole of a small file or pipe (at most `max_bytes`). NOT_FOUND when it does not exist,
// PERMISSION_DENIED when it cannot be read, INVALID_ARGUMENT for a directory or more than
// max_bytes; each message names the file and says `what` it is (e.g. "token file"). A FIFO
// without a writer blocks, as for any reader.
absl::StatusOr<std::string> ReadSmallFile(const std::filesystem::path& path, const char* what,
                                          size_t max_bytes = 16 << 20);

}  // namespace splitq::server
