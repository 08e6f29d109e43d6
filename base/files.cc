#include "base/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <thread>

namespace sinkscope {
StatusOr<FilePtr> OpenForRead(const std::string& path, const std::string& what, int64_t* size) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, what);
  if (S_ISDIR(st.st_mode)) return InvalidArgumentError(what + ": is a directory, expected a file");
  if (!S_ISREG(st.st_mode)) return InvalidArgumentError(what + ": not a regular file");
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (f == nullptr) return ErrnoStatus(errno, what, "cannot open");
  *size = static_cast<int64_t>(st.st_size);
  return f;
}

// "no such file or directory" and friends, lower-case like the rest of our messages.
std::string ErrnoText(int err) {
  std::string text = std::strerror(err);
  if (!text.empty()) text[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(text[0])));
  return text;
}

// A Status for a failed system call on `what` (e.g. "shard /x/a.bin"): NOT_FOUND for a
// missing file, INVALID_ARGUMENT for other unusable paths, INTERNAL otherwise.
Status ErrnoStatus(int err, const std::string& what, const std::string& action) {
  std::string message = what + ": " + (action.empty() ? "" : action + ": ") + ErrnoText(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return NotFoundError(std::move(message));
    case EACCES:
    case EPERM:
    case EISDIR:
    case ENAMETOOLONG:
    case ELOOP:
      return InvalidArgumentError(std::move(message));
    default:
      return InternalError(std::move(message));
  }
}

StatusOr<std::string> ReadRegularFile(const std::string& path, const std::string& what, int64_t max_bytes) {
  int64_t size = 0;
  ASSIGN_OR_RETURN(FilePtr f, OpenForRead(path, what, &size));
  if (max_bytes > 0 && size > max_bytes) {
    return InvalidArgumentError(what + ": " + std::to_string(size) + " bytes, more than the " +
                                std::to_string(max_bytes) + " this file may have");
  }
  std::string data(static_cast<size_t>(size), '\0');
  const size_t got = size > 0 ? std::fread(data.data(), 1, data.size(), f.get()) : 0;
  if (got != data.size()) {
    if (std::ferror(f.get())) return ErrnoStatus(errno, what, "read failed");
    return DataLossError(what + ": read " + std::to_string(got) + " of " + std::to_string(size) +
                         " bytes (file shrank while reading)");
  }
  return data;
}

Status WriteFileAtomically(const std::string& path, const std::string& bytes) {
  // A temporary name of this process and thread: two writers of the same file (a worker
  // that lost its lease and the one that took over) never share a temporary file.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." +
                          std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return InternalError("cannot create " + tmp + ": " + std::strerror(errno));
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string why = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return InternalError("cannot write " + tmp + ": " + why);
    }
    written += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    ::unlink(tmp.c_str());
    return InternalError("cannot fsync " + tmp + ": " + why);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    return InternalError("cannot rename " + tmp + " to " + path + ": " + why);
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return OkStatus();
}

}  // namespace sinkscope
