#include "server/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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

absl::StatusOr<std::string> ReadSmallFile(const std::filesystem::path& path, const char* what,
                                          size_t max_bytes) {
  const std::string name = path.string();
  const int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    const std::string message = absl::StrCat(name, ": cannot read this ", what, ": ", strerror(e));
    if (e == ENOENT || e == ENOTDIR) return absl::NotFoundError(message);
    if (e == EACCES || e == EPERM) return absl::PermissionDeniedError(message);
    return absl::InvalidArgumentError(message);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(name, ": a directory, not a ", what));
  }
  // A regular file, or a pipe (`--token <(...)`): read to the end, at most max_bytes.
  std::string text;
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": reading this ", what, " failed: ", strerror(e)));
    }
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
    if (text.size() > max_bytes) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": more than the ", max_bytes, " bytes a ", what, " may hold"));
    }
  }
  ::close(fd);
  return text;
}

}  // namespace splitq::server
