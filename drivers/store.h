// Store: an image directory as imgfs uses it. The names images are kept under, and the few
// things scans, snapshots and chain edits do with those names: list them, open one, create
// one exclusively, rename one without replacing another, give a file a second name, remove a
// name, make the names durable, and tell how much room is left. Everything above the store
// (jobs/, fuse/) goes through this interface and does not know what kind of store it has.
//
// One implementation so far: LocalDirStore (a directory, every name confined beneath it with
// openat2). A Ceph pool through librbd is the second one planned; what it lacks is data in
// StoreCaps, not an error to probe for. Its open() will hand out an RBD image rather than a
// descriptor, so open() is the one call whose type is expected to change.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/result.h"
#include "core/unique_fd.h"
#include "drivers/chain_walk.h"

namespace imgfs {

struct StoreCaps {
    /// A file can carry two names at once (hard links). Chain edits rely on it: a layer leaving
    /// a chain gets a hidden second name before any header names it, so a crash at any point
    /// leaves the chain whole under one name or the other.
    bool second_names = false;
};

/// One regular file of the store.
struct StoreEntry {
    std::string name;
    FileId id{};  // the same for every name of one file
};

/// Room in the store, as statfs reports it for a directory.
struct StoreSpace {
    uint64_t blocks = 0;
    uint64_t free_blocks = 0;
    uint64_t available_blocks = 0;  // free to an unprivileged writer
    uint64_t files = 0;
    uint64_t free_files = 0;
    uint32_t block_bytes = 0;     // the unit of the block counts
    uint32_t transfer_bytes = 0;  // preferred I/O size
    [[nodiscard]] uint64_t available_bytes() const { return available_blocks * block_bytes; }
};

class Store {
  public:
    Store() = default;
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;
    virtual ~Store() = default;

    // Every call below may block (directory metadata, and for a remote store a round trip):
    // callers run them on an offload thread, or before the event loop serves, never on the
    // loop. Names are relative paths inside the store, as the store lists them or backing
    // names resolve ("base.qcow2", "sub/base.qcow2"); a name that would leave the store is
    // refused (EINVAL, or EPERM from open()).

    [[nodiscard]] virtual const StoreCaps& caps() const = 0;
    /// The store as the user named it, for messages.
    [[nodiscard]] virtual const std::string& display_name() const = 0;
    /// The absolute path backing names may use to point into the store ("" if it has none).
    [[nodiscard]] virtual const std::string& real_path() const = 0;

    /// Every name whose file is a regular file (following a symbolic link), sorted by name.
    /// Subdirectories, devices and dangling links are left out.
    virtual Result<std::vector<StoreEntry>> list() = 0;
    /// The identity of the file `name` names; with `follow_links` false, a symbolic link's own.
    virtual Result<FileId> id_of(const std::string& name, bool follow_links) = 0;
    /// Opens a file of the store. `name` may be a relative path inside the store; it may not
    /// leave it (through "..", an absolute symbolic link or one pointing outside): EPERM.
    virtual Result<UniqueFd> open(const std::string& name, bool read_only, bool direct) = 0;
    /// Creates `name`, empty, for reading and writing; EEXIST if the name is taken.
    virtual Result<UniqueFd> create_exclusive(const std::string& name) = 0;
    /// Renames `from` to `to` atomically; EEXIST if `to` is taken (nothing is replaced).
    virtual Status rename_noreplace(const std::string& from, const std::string& to) = 0;
    /// Gives the file named `existing` the second name `name` (EEXIST if taken). Only where
    /// caps().second_names; elsewhere EOPNOTSUPP.
    virtual Status add_name(const std::string& existing, const std::string& name) = 0;
    /// Removes a name (ENOENT if there is none); the file goes with its last name.
    virtual Status remove(const std::string& name) = 0;
    /// Makes every name created, renamed or removed so far durable.
    virtual Status sync() = 0;
    virtual Result<StoreSpace> space() = 0;
    /// Takes the store for this process alone, until the store is destroyed: EWOULDBLOCK if
    /// another daemon holds it. (Two daemons on one store would write behind each other.)
    virtual Status lock_for_serving() = 0;
};

}  // namespace imgfs
