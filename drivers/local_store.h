// LocalDirStore: a directory of the host's file systems as a Store. Every name is resolved
// beneath the directory's descriptor (openat2 with RESOLVE_BENEATH), so neither "..", an
// absolute symbolic link nor one pointing outside reaches another file. The descriptor stays
// open for the store's lifetime: the mount's lock (flock) on the directory is held through it.
#pragma once

#include <memory>
#include <string>

#include "core/unique_fd.h"
#include "drivers/store.h"

namespace imgfs {

/// An open file of the host: a descriptor and the identity fstat gave it when it was opened.
class LocalFile final : public StoreFile {
  public:
    /// Takes `fd` over; fails if it cannot be stat'ed.
    static Result<std::unique_ptr<LocalFile>> from_fd(UniqueFd fd, const std::string& name);
    LocalFile(UniqueFd fd, FileId id) : fd_(std::move(fd)), id_(id) {}

    [[nodiscard]] int fd() const { return fd_.get(); }
    [[nodiscard]] FileId id() const override { return id_; }
    Result<uint64_t> size() override;
    Result<size_t> read_at(MutBuf buf, uint64_t offset) override;
    /// A FileNode over the descriptor.
    Result<std::shared_ptr<Node>> into_node(NodeEnv env, std::string name,
                                            const FileOptions& options) override;

  private:
    UniqueFd fd_;
    FileId id_;
};

/// Opens a host file outside any store (an absolute backing name, where the mount allows
/// those).
Result<std::unique_ptr<StoreFile>> open_host_file(const std::string& path, bool read_only,
                                                  bool direct);

class LocalDirStore final : public Store {
  public:
    /// Takes an open directory descriptor; `path` is how the user named it (for messages).
    LocalDirStore(UniqueFd dir_fd, std::string path);
    /// Opens the directory `path`.
    static Result<std::unique_ptr<LocalDirStore>> open_dir(const std::string& path);
    /// A store over a duplicate of `dir_fd` (tests, and callers that keep their own).
    static std::unique_ptr<LocalDirStore> over(int dir_fd);

    /// The directory's descriptor: for the mount's lock and for the crash harness, which
    /// watches the directory's fsyncs. Not for name operations: those go through the store.
    [[nodiscard]] int dir_fd() const { return dir_fd_.get(); }

    [[nodiscard]] const StoreCaps& caps() const override { return caps_; }
    [[nodiscard]] const std::string& display_name() const override { return path_; }
    [[nodiscard]] const std::string& real_path() const override { return real_; }
    Result<std::vector<StoreEntry>> list() override;
    Result<FileId> id_of(const std::string& name, bool follow_links) override;
    Result<std::unique_ptr<StoreFile>> open(const std::string& name, bool read_only,
                                            bool direct) override;
    /// open() itself: an openat2 does not wait for the disk's data. (A local file's locks
    /// are QEMU's byte-range locks, which the file node takes as permissions are set.)
    Task<Result<std::unique_ptr<StoreFile>>> open_from_loop(std::string name,
                                                            FileOptions options) override;
    Result<std::unique_ptr<StoreFile>> create_exclusive(const std::string& name) override;
    Status rename_noreplace(const std::string& from, const std::string& to) override;
    Status add_name(const std::string& existing, const std::string& name) override;
    Status remove(const std::string& name) override;
    Status sync() override;
    Result<StoreSpace> space() override;
    /// flock(LOCK_EX) on the directory, held through its descriptor.
    Status lock_for_serving() override;

  private:
    UniqueFd dir_fd_;
    std::string path_;
    std::string real_;
    StoreCaps caps_{.second_names = true};
};

/// Opens `path` beneath `dir_fd`; symbolic links and ".." may not leave the directory (EPERM).
Result<UniqueFd> open_beneath(int dir_fd, const std::string& path, bool read_only, bool direct);

/// The real path of the directory `dir_fd` names ("" if it has none, e.g. it was removed):
/// what absolute backing names are compared with.
std::string real_dir_path(int dir_fd);

}  // namespace imgfs
