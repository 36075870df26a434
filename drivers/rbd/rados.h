// rados: a connection to a Ceph cluster and one pool (namespace) in it, and the open RBD image
// handle, as owned types. Everything here blocks (a round trip to the monitors or OSDs): it
// runs before the event loop serves or on the pool's offload thread, never on the loop.
//
// Deadlines: a cluster that stops answering must give an error, never a hung mount. The
// connection sets Ceph's own operation timeouts (monitor, OSD and mount) to `timeout_s`, so
// every librados and librbd call, asynchronous ones included, completes by then with
// ETIMEDOUT; rbd_error() turns that into EIO naming the deadline.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/offload.h"
#include "core/result.h"
#include "drivers/rbd/ceph_api.h"

namespace imgfs {

struct RadosOptions {
    /// ceph.conf to read; empty: $CEPH_CONF, else /etc/ceph/ceph.conf (librados' search).
    std::string conf_path;
    /// The client's name without "client." (its keyring is found through ceph.conf).
    std::string client_id = "admin";
    /// Deadline of every cluster operation, in seconds.
    uint32_t timeout_s = 30;
};

/// An error from a librados/librbd call (which return negative errno values): a timeout
/// becomes EIO with the deadline named, anything else keeps its errno.
Error rbd_error(int negative_errno, uint32_t timeout_s, std::string context);

class RadosCluster;
/// The same, for a call on a connected cluster: a timeout also marks `cluster` unanswered.
Error rbd_error(int negative_errno, const RadosCluster& cluster, std::string context);

/// One connected cluster client. Shared by every pool and image opened through it; the last
/// owner shuts the connection down.
class RadosCluster {
  public:
    static Result<std::shared_ptr<RadosCluster>> connect(const RadosOptions& options);
    explicit RadosCluster(rados_t handle, RadosOptions options)
        : handle_(handle), options_(std::move(options)) {}
    RadosCluster(const RadosCluster&) = delete;
    RadosCluster& operator=(const RadosCluster&) = delete;
    ~RadosCluster();

    [[nodiscard]] rados_t handle() const { return handle_; }
    [[nodiscard]] const RadosOptions& options() const { return options_; }
    /// This client's address as other clients see it (lock owners are named by it).
    [[nodiscard]] std::string client_address() const;

    // What the client has seen of the cluster's health. At close, the daemon flushes and
    // closes every layer, one round trip after the other; on a dead cluster each would wait
    // out the deadline, so an unmount of a few written images took minutes. Once a call has
    // missed its deadline while closing, the rest of the close does not ask again: the calls
    // that would only wait fail at once (skip_round_trips()), and the images close side by
    // side (RbdPool::close_aside). So a close takes about two deadlines, however many images.
    // Any answer clears the mark. Atomics: the offload and closing threads note results too.

    /// A call missed its deadline (rbd_error notes it).
    void note_unanswered() const { unanswered_.store(true, std::memory_order_relaxed); }
    /// A call was answered. (Read first: every request completes through here.)
    void note_answered() const {
        if (unanswered_.load(std::memory_order_relaxed)) {
            unanswered_.store(false, std::memory_order_relaxed);
        }
    }
    /// The daemon is closing every image (Store::begin_closing). Only a deadline missed from
    /// now on counts: one missed hours ago, by a cluster that has long recovered, must not
    /// cost the close its flushes.
    void begin_closing() {
        unanswered_.store(false, std::memory_order_relaxed);
        closing_.store(true, std::memory_order_relaxed);
    }
    /// Whether calls that would only wait out the deadline once more are skipped now.
    [[nodiscard]] bool skip_round_trips() const {
        return closing_.load(std::memory_order_relaxed) &&
               unanswered_.load(std::memory_order_relaxed);
    }

  private:
    rados_t handle_;
    RadosOptions options_;
    mutable std::atomic<bool> unanswered_{false};  // observations, not the connection's state
    std::atomic<bool> closing_{false};
};

/// A pool (and namespace) of a cluster, with an offload thread for the librbd calls that have
/// no asynchronous form (open, resize, stat). Images opened from it keep it alive.
///
/// Destruction order: the offload thread is joined before the I/O context is destroyed,
/// and the I/O context before the cluster reference is dropped.
class RbdPool {
  public:
    /// Opens `pool` (and `name_space`, "" for the default one) on `cluster`. The offload
    /// thread resumes its callers on `loop`.
    static Result<std::shared_ptr<RbdPool>> open(std::shared_ptr<RadosCluster> cluster,
                                                 const std::string& pool,
                                                 const std::string& name_space, EventLoop* loop);
    RbdPool(std::shared_ptr<RadosCluster> cluster, rados_ioctx_t ioctx, std::string pool,
            std::string name_space, EventLoop* loop);
    RbdPool(const RbdPool&) = delete;
    RbdPool& operator=(const RbdPool&) = delete;
    ~RbdPool();

    [[nodiscard]] rados_ioctx_t ioctx() const { return ioctx_; }
    [[nodiscard]] const std::string& pool() const { return pool_; }
    [[nodiscard]] const std::string& name_space() const { return name_space_; }
    [[nodiscard]] uint32_t timeout_s() const { return cluster_->options().timeout_s; }
    [[nodiscard]] const RadosCluster& cluster() const { return *cluster_; }
    [[nodiscard]] const std::shared_ptr<RadosCluster>& cluster_ref() const { return cluster_; }
    [[nodiscard]] EventLoop* loop() const { return loop_; }
    /// "rbd:POOL" or "rbd:POOL/NAMESPACE", as the user names it.
    [[nodiscard]] std::string display_name() const;
    [[nodiscard]] Offloader* offloader() { return offloader_.get(); }

    /// Closes handed to the offload thread (RbdImage::close_off_loop) and not done yet. librbd
    /// refuses to remove an image this client still has open, so a removal waits for them
    /// (wait_for_closes), up to the cluster deadline.
    void close_handed_over();
    void close_done();
    void wait_for_closes();
    /// Runs `close` on a thread of its own, side by side with other such closes, without
    /// waiting: for closes on a cluster that stopped answering (each waits out the deadline),
    /// which one after the other on the offload thread would add up. Joined by ~RbdPool.
    void close_aside(std::function<void()> close);

  private:
    std::mutex closes_mutex_;
    std::condition_variable closes_changed_;
    int closes_pending_ = 0;            // guarded by closes_mutex_
    std::vector<std::thread> closers_;  // guarded by closes_mutex_; joined first
    std::shared_ptr<RadosCluster> cluster_;
    rados_ioctx_t ioctx_;
    std::string pool_;
    std::string name_space_;
    EventLoop* loop_;
    std::unique_ptr<Offloader> offloader_;  // declared last: joined first
};

/// What an open image's user holds of its exclusive lock.
enum class RbdLock {
    kNone,     // nothing explicit (read-only, or librbd takes it for a rare write: a commit)
    kPending,  // it will be written: taken on the first write (RbdNode::claim_writes)
    kHeld,     // taken explicitly; librbd does not hand it over until the image is closed
};

/// An open RBD image. Closing waits for the image's in-flight requests (bounded by the
/// cluster deadline) and releases its exclusive lock if it holds it.
class RbdImage {
  public:
    /// How a read-only open shows to other clients.
    enum class Presence {
        kAnnounced,  // listed among the image's watchers: others see it open (every layer)
        kQuiet,      // not listed: a short look that must not count as a user (probes)
    };
    /// Opens image `name` of `pool`, read-only or for writing. Blocking.
    static Result<RbdImage> open(std::shared_ptr<RbdPool> pool, const std::string& name,
                                 bool read_only, Presence presence = Presence::kAnnounced);
    RbdImage() = default;
    RbdImage(RbdImage&& o) noexcept;
    RbdImage& operator=(RbdImage&& o) noexcept;
    RbdImage(const RbdImage&) = delete;
    RbdImage& operator=(const RbdImage&) = delete;
    ~RbdImage() { reset(); }

    [[nodiscard]] rbd_image_t handle() const { return image_; }
    [[nodiscard]] const std::shared_ptr<RbdPool>& pool() const { return pool_; }
    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] bool read_only() const { return read_only_; }
    /// The image's size now (a round trip when the header is stale).
    [[nodiscard]] Result<uint64_t> size() const;
    /// The image's id: stable across renames, the identity of a layer.
    [[nodiscard]] Result<std::string> id() const;
    /// Takes the image's exclusive lock explicitly, so librbd never hands it to another
    /// client while this one has the image open. A lock whose holder Ceph sees gone (its watch
    /// timed out) is broken, blocklisting that client. EROFS naming the holder if a live
    /// client holds it, whatever its lock policy: it is never asked to hand the lock over.
    /// Blocking.
    [[nodiscard]] Status lock_exclusive() const;
    /// Gives the exclusive lock back (taken by lock_exclusive()), so that another host may
    /// write the image. Blocking.
    [[nodiscard]] Status unlock_exclusive() const;
    /// Fails unless librbd acknowledges a write of this image only once the cluster has it:
    /// the pool's or the image's configuration can switch its write-back cache on again.
    /// Checked before any writer's first write (lock_exclusive) and when a top is opened.
    [[nodiscard]] Status check_write_cache_off() const;
    /// EPERM naming the fix unless the image has the exclusive-lock feature, which is what
    /// keeps a second host from writing it. Blocking (reads the cached header).
    [[nodiscard]] Status check_lockable() const;
    /// Whether a client that still has the image open (watches it) owns its exclusive lock.
    /// Blocking.
    [[nodiscard]] Result<bool> held_by_live_client() const;
    /// Whether a live client other than this one holds the exclusive lock: EBUSY naming it.
    /// If one is listed, takes the lock and gives it back, so that a dead holder's lock is
    /// broken here. Blocking.
    [[nodiscard]] Status check_no_writer() const;
    /// How many clients other than this process have the image open (each open watches the
    /// image's header, and imgfs's read-only layers too: see open()). A client that died
    /// stays listed until its watch times out (about 30 s). Blocking.
    [[nodiscard]] Result<size_t> other_watchers() const;
    /// Who holds the exclusive lock, for messages (the client's address, "127.0.0.1:0/2339").
    [[nodiscard]] std::string lock_owners() const;
    /// Closes the image (waiting for its requests, releasing its lock) but keeps the pool:
    /// safe on the pool's offload thread, which the pool's last reference would join.
    void close_image();
    /// Closes the image on the pool's offload thread without waiting (for a destructor on
    /// the loop: a close is a round trip, up to the deadline on a dead cluster). `keep` is
    /// released once the image is closed: what librbd may still use until then. While the
    /// cluster's round trips are skipped, the close runs aside (RbdPool::close_aside).
    void close_off_loop(std::shared_ptr<void> keep);
    void reset();

  private:
    /// Whether one of `owners` (lock owners, listed by address) watches the image.
    [[nodiscard]] Result<bool> owner_alive(char** owners, size_t count) const;
    std::shared_ptr<RbdPool> pool_;
    rbd_image_t image_ = nullptr;
    std::string name_;
    bool read_only_ = false;
};

}  // namespace imgfs
