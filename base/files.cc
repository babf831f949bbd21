#include "base/files.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"

namespace splitq::base {
namespace {

// fsync of a file or a folder; false (errno set) when it cannot be opened or synced.
bool Sync(const std::string& name, int flags) {
  const int fd = ::open(name.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  const int saved = errno;
  ::close(fd);
  errno = saved;
  return ok;
}

absl::Status Failed(const std::string& name, const char* doing, int error) {
  return absl::InternalError(absl::StrCat(name, ": cannot ", doing, ": ", strerror(error)));
}

}  // namespace

absl::Status CommitFile(const std::filesystem::path& temp, const std::filesystem::path& path) {
  if (!Sync(temp.string(), O_RDONLY)) {
    const int error = errno;
    ::unlink(temp.c_str());
    return Failed(temp.string(), "sync it to disk", error);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    return Failed(path.string(), "replace it", error);
  }
  // The rename itself on disk too. A folder that cannot be opened for reading (unusual
  // permissions) still has the new file; only the power-failure guarantee is weaker there.
  const std::filesystem::path parent = path.parent_path();
  (void)Sync(parent.empty() ? "." : parent.string(), O_RDONLY | O_DIRECTORY);
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view contents,
                                 mode_t mode) {
  // A name of its own (mkstemp: created new, 0600, never through a symlink), so that two
  // writers of one target cannot write into each other's temporary file.
  std::string temp = path.string() + ".tmp.XXXXXX";
  const int fd = ::mkstemp(temp.data());
  if (fd < 0) return Failed(path.string() + ".tmp", "create it", errno);
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  ::fchmod(fd, mode);  // exactly `mode`, whatever the umask
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = n < 0 ? errno : EIO;
      ::close(fd);
      ::unlink(temp.c_str());
      return Failed(temp, "write it", error);
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    return Failed(temp, "write it", error);
  }
  return CommitFile(temp, path);
}

absl::Status CopyFilesInto(const std::filesystem::path& from, const std::vector<std::string>& names,
                           const std::filesystem::path& to, mode_t mode) {
  std::error_code ec;
  std::filesystem::create_directories(to, ec);
  if (ec) {
    return absl::InternalError(absl::StrFormat("cannot make %s: %s", to.string(), ec.message()));
  }
  for (const std::string& name : names) {
    SPLITQ_ASSIGN_OR_RETURN(const std::string contents, ReadSmallFile(from / name, "file to copy"));
    SPLITQ_RETURN_IF_ERROR(WriteFileAtomically(to / name, contents, mode));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadSecretFile(const std::filesystem::path& path, const char* what,
                                           size_t max_bytes) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 066) != 0) {
    const bool read = (st.st_mode & 044) != 0;
    const unsigned bits = st.st_mode & (read ? 044 : 022);
    const char* who = bits == (read ? 044u : 022u) ? "its group and others"
                      : (bits & 070) != 0          ? "its group"
                                                   : "others";
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: this %s is %s by %s (mode %04o); make it private: chmod 600 %s", path.string(), what,
        read ? "readable" : "writable", who, st.st_mode & 07777, path.string()));
  }
  return ReadSmallFile(path, what, max_bytes);
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

void RemoveTree(const std::string& path) {
  nftw(
      path.c_str(),
      [](const char* entry, const struct stat*, int, struct FTW*) { return std::remove(entry); },
      16, FTW_DEPTH | FTW_PHYS);
}

}  // namespace splitq::base
