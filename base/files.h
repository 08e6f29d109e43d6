// Files as every layer reads and writes them: whole regular files with a size bound,
// atomic replacement (temporary file, fsync, rename, fsync of the folder), and errno
// turned into a Status that names what failed.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "base/status.h"

namespace sinkscope {

// "no such file or directory" and friends, lower-case like the rest of our messages.
std::string ErrnoText(int err);
// A Status for a failed system call on `what` (e.g. "shard /x/a.bin"): NOT_FOUND for a
// missing file, INVALID_ARGUMENT for other unusable paths, INTERNAL otherwise.
Status ErrnoStatus(int err, const std::string& what, const std::string& action = "");

// Closes a FILE* on scope exit.
struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

// Opens a regular file for reading (a folder, FIFO or device is refused) and gives its size.
StatusOr<FilePtr> OpenForRead(const std::string& path, const std::string& what, int64_t* size);

// The whole of a regular file (a folder, FIFO or device is refused: reading one could
// block or never end); more than `max_bytes` (> 0) is refused. `what` names it in errors.
StatusOr<std::string> ReadRegularFile(const std::string& path, const std::string& what, int64_t max_bytes = 0);

// Replaces `path` with `bytes` atomically and durably: readers see the old file or the
// new one, never a part. The temporary file is "<path>.tmp.<pid>.<thread>", so two
// writers of one path never share one.
Status WriteFileAtomically(const std::string& path, const std::string& bytes);

}  // namespace sinkscope
