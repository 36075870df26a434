// Store: an image directory as imgfs uses it. The names images are kept under, and the few
// things scans, snapshots and chain edits do with those names: list them, open one, create
// one exclusively, rename one without replacing another, give a file a second name, remove a
// name, make the names durable, and tell how much room is left. Everything above the store
// (jobs/, fuse/) goes through this interface and does not know what kind of store it has.
//
// Two implementations: LocalDirStore (a directory, every name confined beneath it with
// openat2) and RbdStore (a Ceph pool, or a namespace of one, through librbd). What a store
// lacks is data in StoreCaps, not an error to probe for. An open file of either kind is a
// StoreFile: headers are read from it, and it becomes the protocol node a layer is served from.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/node.h"
#include "core/result.h"
#include "core/task.h"
#include "drivers/chain_walk.h"
#include "drivers/file.h"

namespace imgfs {

/// One open file of a store.
class StoreFile {
  public:
    StoreFile() = default;
    StoreFile(const StoreFile&) = delete;
    StoreFile& operator=(const StoreFile&) = delete;
    virtual ~StoreFile() = default;

    /// The file's identity, the same under each of its names (taken when it was opened).
    [[nodiscard]] virtual FileId id() const = 0;
    /// Blocking: the file's size now.
    virtual Result<uint64_t> size() = 0;
    /// Blocking (offload thread, or before the loop serves): reads at `offset` until `buf` is
    /// full or the file ends; the bytes read. Buffers and offsets are 4096-aligned (the file
    /// may be open for direct I/O).
    virtual Result<size_t> read_at(MutBuf buf, uint64_t offset) = 0;
    /// The protocol node that serves this file (a FileNode, an RbdNode); the file is handed
    /// over to it. Only `options.direct`'s alignment, the locking and the test faults are
    /// local-file matters; the access mode was fixed when the file was opened.
    virtual Result<std::shared_ptr<Node>> into_node(NodeEnv env, std::string name,
                                                    const FileOptions& options) = 0;
    /// Called on the loop before a file is dropped unused (a chain walk that failed): closing
    /// may be a round trip for a remote store, which must not run there. A local file's close
    /// is not.
    virtual void close_off_loop() {}
};

struct StoreCaps {
    /// A file can carry two names at once (hard links). Chain edits rely on it: a layer leaving
    /// a chain gets a hidden second name before any header names it, so a crash at any point
    /// leaves the chain whole under one name or the other.
    bool second_names = false;
    /// What joins an image's name and a snapshot's in a snapshot overlay's name
    /// (NAME@SNAP.qcow2); an export's name is the file name cut at its first one. A pool uses
    /// '~': RBD and QEMU's rbd: names reserve '@' for RBD's own snapshots.
    char snapshot_separator = '@';
    /// Other hosts may write its images while this daemon serves them (a Ceph pool: an image
    /// another host holds the lock of is served read-only here). Data read a moment ago may be
    /// stale then, so nothing is read ahead (fuse/read_ahead.h).
    bool shared_between_hosts = false;
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
    /// False when the store cannot tell its room (a Ceph cluster without a manager reports
    /// none): the counts are zeros, and checks of free room are skipped, not failed.
    bool known = true;
    [[nodiscard]] uint64_t available_bytes() const { return available_blocks * block_bytes; }
};

class Store {
  public:
    Store() = default;
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;
    virtual ~Store() = default;

    // Every call below but open_from_loop may block (directory metadata, and for a remote
    // store a round trip): callers run them on an offload thread, or before the event loop
    // serves, never on the loop. Names are relative paths inside the store, as the store lists them
    // or backing names resolve ("base.qcow2", "sub/base.qcow2"); a name that would leave the store
    // is refused (EINVAL, or EPERM from open()).

    [[nodiscard]] virtual const StoreCaps& caps() const = 0;
    /// The store as the user named it, for messages.
    [[nodiscard]] virtual const std::string& display_name() const = 0;
    /// The absolute path backing names may use to point into the store ("" if it has none).
    [[nodiscard]] virtual const std::string& real_path() const = 0;
    /// A backing name as the store's own kind of URL ("rbd:POOL/IMAGE" in a pool) that names
    /// one of its files: that file's name. "" for any other name (a relative one included).
    [[nodiscard]] virtual std::string own_name(const std::string& /*recorded*/) const { return {}; }
    /// What a header records to name the store's file `name` as a backing file, so that QEMU
    /// opens it too: the name itself in a directory (relative), the URL in a pool.
    [[nodiscard]] virtual std::string recorded_name(const std::string& name) const { return name; }
    /// A recorded backing name that names an image of the same storage outside this store
    /// (another pool or namespace of the cluster), in the canonical form open() takes; empty
    /// if it names none. Such a layer is served only with allow_external_backing, read-only.
    [[nodiscard]] virtual std::string external_name(const std::string& /*recorded*/) const {
        return {};
    }

    /// Every name whose file is a regular file (following a symbolic link), sorted by name.
    /// Subdirectories, devices and dangling links are left out.
    virtual Result<std::vector<StoreEntry>> list() = 0;
    /// The identity of the file `name` names; with `follow_links` false, a symbolic link's own.
    virtual Result<FileId> id_of(const std::string& name, bool follow_links) = 0;
    /// Opens a file of the store. `name` may be a relative path inside the store; it may not
    /// leave it (through "..", an absolute symbolic link or one pointing outside): EPERM.
    virtual Result<std::unique_ptr<StoreFile>> open(const std::string& name, bool read_only,
                                                    bool direct) = 0;
    /// open() for a coroutine on the event loop, which it must not block: a local directory
    /// opens at once (openat2 does not wait for data), a remote store on its own thread. With
    /// `options.exclusive` (a layer that will be written) a store that has cluster-wide write
    /// locks refuses the file (EBUSY, the holder named) if another client holds its lock, and
    /// leaves taking the lock to the node's first write (Node::claim_writes).
    virtual Task<Result<std::unique_ptr<StoreFile>>> open_from_loop(std::string name,
                                                                    FileOptions options) = 0;
    /// Creates `name`, empty, for reading and writing (holding its write lock where the store
    /// has them); EEXIST if the name is taken.
    virtual Result<std::unique_ptr<StoreFile>> create_exclusive(const std::string& name) = 0;
    /// Renames `from` to `to`; EEXIST if `to` is taken (nothing is replaced). Atomic in a
    /// directory; in a pool several cluster updates (see RbdStore::rename_noreplace).
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
    /// Whether another process (another host's daemon) has the file open. A store that one
    /// daemon serves alone (lock_for_serving takes it all) has nothing to say: false.
    virtual Result<bool> open_elsewhere(const std::string& /*name*/) { return false; }
    /// Whether another process may have just made the file and not opened it yet (so that
    /// open_elsewhere cannot tell): a remote store's file made within its deadlines. False
    /// where one daemon serves the store alone.
    virtual Result<bool> may_be_in_creation(const std::string& /*name*/) { return false; }
    /// The daemon is closing every image (it is stopping). A remote store may then cut the
    /// close short once it stops answering, rather than wait out its deadline once per layer.
    /// Does not block.
    virtual void begin_closing() {}
    /// After begin_closing: whether closes of this store's files are left waiting on a store
    /// that stopped answering. They would only give back what the store takes back by itself
    /// once this client is gone (a remote store's locks and watches), so a stopping process
    /// may exit without them rather than wait out their deadlines.
    [[nodiscard]] virtual bool closes_stalled() const { return false; }
};

}  // namespace imgfs
