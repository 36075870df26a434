// RbdStore: a Ceph pool (or a namespace of one) as an image directory. Each RBD image is what
// a file is in a directory: "vm1.qcow2" holds qcow2 bytes, a raw image made by `rbd create`
// is served as it is. Names are RBD image names (no '/' or '@'). What a pool cannot do that a
// directory can: give an image a second name (no hard links), so StoreCaps.second_names is
// false and chain edits that rely on it refuse. Backing names inside the pool are recorded as
// "rbd:POOL/IMAGE" (what QEMU opens; it looks for a relative name as a local file) and either
// form is read.
//
// Cluster-wide safety: RBD's exclusive lock, taken explicitly so that librbd never hands it to
// another client on request, marks the one host that writes an image. A layer that may be
// written (FileOptions::exclusive) is opened only if no live client holds the lock (else EBUSY
// naming the holder), but the lock itself is taken on the first write (Node::claim_writes), so
// hosts that mount one pool each write the images their users write, and all of them read the
// rest. A layer this store creates is locked at once. Ceph frees the lock of a client that
// died (its watch times out; the next acquire blocklists it and breaks the lock).
// lock_for_serving() therefore takes nothing.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "drivers/rbd/rados.h"
#include "drivers/store.h"

namespace imgfs {

/// Where a pool store lives: "rbd:POOL" or "rbd:POOL/NAMESPACE".
struct RbdLocation {
    std::string pool;
    std::string name_space;
};
/// True if `spec` starts with "rbd:" (the user means a pool, not a directory).
bool is_rbd_spec(const std::string& spec);
/// Parses "rbd:POOL[/NAMESPACE]"; EINVAL with the reason for anything else.
Result<RbdLocation> parse_rbd_location(const std::string& spec);

/// An open RBD image of a store.
class RbdFile final : public StoreFile {
  public:
    /// `size_bytes`: the image's size as the opener read it (off the loop).
    RbdFile(RbdImage image, FileId id, RbdLock lock, uint64_t size_bytes)
        : image_(std::move(image)), id_(id), lock_(lock), size_bytes_(size_bytes) {}
    RbdFile(const RbdFile&) = delete;
    RbdFile& operator=(const RbdFile&) = delete;
    /// The close, a round trip, goes to the pool's offload thread. Not for an image that
    /// holds its lock: the next open of it for writing must find the lock released.
    void close_off_loop() override {
        if (lock_ != RbdLock::kHeld) {
            image_.close_off_loop(nullptr);
        }
    }
    [[nodiscard]] FileId id() const override { return id_; }
    Result<uint64_t> size() override { return image_.size(); }
    Result<size_t> read_at(MutBuf buf, uint64_t offset) override;
    /// An RbdNode over the image.
    Result<std::shared_ptr<Node>> into_node(NodeEnv env, std::string name,
                                            const FileOptions& options) override;

  private:
    RbdImage image_;
    FileId id_;
    RbdLock lock_;
    uint64_t size_bytes_;
};

class RbdStore final : public Store {
  public:
    /// Connects and opens the pool; blocking (before the loop serves). `loop` is where the
    /// pool's offload thread resumes its callers.
    static Result<std::unique_ptr<RbdStore>> open(const RbdLocation& where,
                                                  const RadosOptions& options, EventLoop* loop);
    explicit RbdStore(std::shared_ptr<RbdPool> pool);

    [[nodiscard]] const StoreCaps& caps() const override { return caps_; }
    [[nodiscard]] const std::string& display_name() const override { return display_; }
    [[nodiscard]] const std::string& real_path() const override { return no_path_; }
    [[nodiscard]] std::string own_name(const std::string& recorded) const override;
    [[nodiscard]] std::string recorded_name(const std::string& name) const override;
    /// "rbd:POOL/IMAGE" or "rbd:POOL/NAMESPACE/IMAGE" of another pool or namespace of the
    /// same cluster, without options or a snapshot. open() and open_from_loop() take it and
    /// open that image read-only.
    [[nodiscard]] std::string external_name(const std::string& recorded) const override;
    Result<std::vector<StoreEntry>> list() override;
    Result<FileId> id_of(const std::string& name, bool follow_links) override;
    Result<std::unique_ptr<StoreFile>> open(const std::string& name, bool read_only,
                                            bool direct) override;
    /// On the pool's offload thread (opening an image is a round trip).
    Task<Result<std::unique_ptr<StoreFile>>> open_from_loop(std::string name,
                                                            FileOptions options) override;
    Result<std::unique_ptr<StoreFile>> create_exclusive(const std::string& name) override;
    Status rename_noreplace(const std::string& from, const std::string& to) override;
    /// EOPNOTSUPP: RBD images have one name.
    Status add_name(const std::string& existing, const std::string& name) override;
    /// Blocking: whether another client has the image open (RbdImage::other_watchers).
    Result<bool> open_elsewhere(const std::string& name) override;
    Result<bool> may_be_in_creation(const std::string& name) override;
    /// Every pool of the store shares the cluster connection (see RadosCluster).
    void begin_closing() override { pool_->cluster_ref()->begin_closing(); }
    /// Ceph breaks a gone client's locks and drops its watches itself (see RadosCluster).
    [[nodiscard]] bool closes_stalled() const override {
        return pool_->cluster().skip_round_trips();
    }
    Status remove(const std::string& name) override;
    /// Nothing to do: a name operation is durable in the cluster once it returned.
    Status sync() override { return {}; }
    /// The cluster's raw capacity (RBD images are thin; pools share the OSDs).
    Result<StoreSpace> space() override;
    /// Nothing: images are locked one by one (see the file comment).
    Status lock_for_serving() override { return {}; }

    [[nodiscard]] const std::shared_ptr<RbdPool>& pool() const { return pool_; }

  private:
    enum class Lock {
        kNone,      // read-only, or a lower layer that only a commit writes (librbd locks it)
        kDeferred,  // refused if another host writes it; locked on the first write
        kNow,       // locked before it is handed out (an image this store just made)
    };
    /// Opens `name` for reading, or for writing under `lock`. Blocking. `presence` says how a
    /// read-only open shows to other hosts (a writer is always seen).
    Result<std::unique_ptr<StoreFile>> open_image(
        const std::string& name, bool read_only, Lock lock,
        RbdImage::Presence presence = RbdImage::Presence::kAnnounced);
    /// The image of another pool that `spec` (an external_name()) names: its pool, opened
    /// once and kept, and the image's name there.
    Result<std::pair<std::shared_ptr<RbdPool>, std::string>> external_image(
        const std::string& spec);
    FileId file_id(const std::string& display, const std::string& image_id) const;

    std::shared_ptr<RbdPool> pool_;
    std::string display_;
    std::string no_path_;
    std::mutex external_mutex_;  // external_pools_ is used from the scan's and the pools' threads
    std::map<std::string, std::shared_ptr<RbdPool>> external_pools_;  // by "rbd:POOL[/NS]"
    StoreCaps caps_{.second_names = false, .snapshot_separator = '~', .shared_between_hosts = true};
};

}  // namespace imgfs
