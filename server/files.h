// splitq server: writing the small private files of a cluster (keys, certificates, tokens).
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string_view>

#include "absl/status/status.h"

namespace splitq::server {

// Writes `contents` to `path` through a temporary file and a rename, so a reader never sees
// a half-written file. The file gets exactly `mode` (e.g. 0600 for keys and tokens),
// whatever the umask. INTERNAL naming the file on failure.
absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view contents,
                                 mode_t mode);

}  // namespace splitq::server
