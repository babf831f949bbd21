#include "server/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace splitq::server {

absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view contents,
                                 mode_t mode) {
  const std::string temp = path.string() + ".tmp";
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, mode);
  if (fd < 0) return absl::InternalError(absl::StrCat(temp, ": cannot create"));
  ::fchmod(fd, mode);  // the umask may have narrowed it; an old file may have been wider
  const bool ok =
      ::write(fd, contents.data(), contents.size()) == static_cast<ssize_t>(contents.size());
  if (::close(fd) != 0 || !ok) return absl::InternalError(absl::StrCat(temp, ": write failed"));
  std::error_code ec;
  std::filesystem::rename(temp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path.string(), ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace splitq::server
