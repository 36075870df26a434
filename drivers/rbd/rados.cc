#include "drivers/rbd/rados.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <strings.h>
#include <utility>
#include <vector>

namespace imgfs {

Error rbd_error(int negative_errno, uint32_t timeout_s, std::string context) {
    int err = -negative_errno;
    if (err == ETIMEDOUT) {
        return make_error(EIO, "{}: the Ceph cluster did not answer within {} s", context,
                          timeout_s);
    }
    if (err == ESHUTDOWN) {
        // librbd's EBLOCKLISTED: the cluster fenced this client off, which happens when
        // another client broke the lock it held (its watch had lapsed). Nothing it sends is
        // taken any more; to the user that is an I/O error with the reason.
        return make_error(EIO,
                          "{}: the Ceph cluster blocklisted this client (another client broke "
                          "its lock); unmount and mount again to serve it",
                          context);
    }
    if (err <= 0) {
        err = EIO;
    }
    return Error{err, std::move(context)};
}

Error rbd_error(int negative_errno, const RadosCluster& cluster, std::string context) {
    if (negative_errno == -ETIMEDOUT) {
        cluster.note_unanswered();
    }
    return rbd_error(negative_errno, cluster.options().timeout_s, std::move(context));
}

namespace {

Status set_conf(rados_t c, const char* key, const std::string& value) {
    if (int r = ceph().rados_conf_set(c, key, value.c_str()); r < 0) {
        return make_error(-r, "Ceph option {}={}", key, value);
    }
    return {};
}

}  // namespace

Result<std::shared_ptr<RadosCluster>> RadosCluster::connect(const RadosOptions& options) {
    // Every other Ceph call goes through a cluster connected here: the one place to load them.
    TRY(load_ceph_api());
    rados_t c = nullptr;
    const std::string user = "client." + options.client_id;
    if (int r = ceph().rados_create2(&c, "ceph", user.c_str(), 0); r < 0) {
        return make_error(-r, "cannot create a Ceph client {}", user);
    }
    // Owned from here on: a failure below shuts the half-made client down.
    auto cluster = std::make_shared<RadosCluster>(c, options);
    const char* conf = options.conf_path.empty() ? nullptr : options.conf_path.c_str();
    if (int r = ceph().rados_conf_read_file(c, conf); r < 0) {
        return make_error(-r, "cannot read the Ceph configuration {}",
                          conf != nullptr ? conf : "($CEPH_CONF or /etc/ceph/ceph.conf)");
    }
    // rados_conf_parse_env: CEPH_ARGS, as the ceph tools honour it.
    (void)ceph().rados_conf_parse_env(c, nullptr);  // optional: a malformed CEPH_ARGS is ignored
    const std::string t = std::to_string(options.timeout_s);
    TRY(set_conf(c, "rados_osd_op_timeout", t));
    TRY(set_conf(c, "rados_mon_op_timeout", t));
    TRY(set_conf(c, "client_mount_timeout", t));
    // No librbd write cache: its default policy acknowledges a write before the cluster has
    // it, and if the cluster then fails the write (full, or past the deadline) the bytes are
    // dropped, so a later read shows what was there before with no error. A qcow2 layer that
    // had linked those clusters would serve zeros in their place. Without the cache a write
    // completes when the cluster has it, or fails, and the qcow2 driver gives the clusters
    // back.
    TRY(set_conf(c, "rbd_cache", "false"));
    // Taking the lock of a dead owner breaks it; the break must fence that owner off the
    // cluster (Ceph's default, forced here against a ceph.conf that turns it off), or a
    // client that was only cut off would come back as a second writer.
    TRY(set_conf(c, "rbd_blocklist_on_break_lock", "true"));
    // librbd's own thread dispatches each request (its default, forced against a ceph.conf
    // that turns it off): dispatched inline, a request held by the cluster's in-flight byte
    // limit would block the event loop that submits it.
    TRY(set_conf(c, "rbd_non_blocking_aio", "true"));
    // Logging goes to imgfs's own log, not to files under /var/log/ceph.
    TRY(set_conf(c, "log_to_stderr", "false"));
    TRY(set_conf(c, "log_file", ""));
    if (int r = ceph().rados_connect(c); r < 0) {
        return rbd_error(r, options.timeout_s,
                         fmt::format("cannot connect to the Ceph cluster as {}", user));
    }
    return cluster;
}

RadosCluster::~RadosCluster() {
    ceph().rados_shutdown(handle_);
}

std::string RadosCluster::client_address() const {
    char* addr = nullptr;
    if (ceph().rados_getaddrs(handle_, &addr) < 0 || addr == nullptr) {
        return "?";
    }
    std::string out(addr);
    ceph().rados_buffer_free(addr);
    return out;
}

Result<std::shared_ptr<RbdPool>> RbdPool::open(std::shared_ptr<RadosCluster> cluster,
                                               const std::string& pool,
                                               const std::string& name_space, EventLoop* loop) {
    rados_ioctx_t io = nullptr;
    if (int r = ceph().rados_ioctx_create(cluster->handle(), pool.c_str(), &io); r < 0) {
        if (r == -ENOENT) {
            return make_error(ENOENT, "Ceph pool '{}' does not exist", pool);
        }
        return rbd_error(r, *cluster, fmt::format("cannot open Ceph pool '{}'", pool));
    }
    ceph().rados_ioctx_set_namespace(io, name_space.c_str());
    return std::make_shared<RbdPool>(std::move(cluster), io, pool, name_space, loop);
}

RbdPool::RbdPool(std::shared_ptr<RadosCluster> cluster, rados_ioctx_t ioctx, std::string pool,
                 std::string name_space, EventLoop* loop)
    : cluster_(std::move(cluster)),
      ioctx_(ioctx),
      pool_(std::move(pool)),
      name_space_(std::move(name_space)),
      loop_(loop),
      offloader_(std::make_unique<Offloader>(loop)) {}

RbdPool::~RbdPool() {
    // No librbd call of ours may still run on a closer or the offload thread. The closers
    // take closes_mutex_ when they finish: joined without it.
    std::vector<std::thread> closers;
    {
        std::lock_guard<std::mutex> lock(closes_mutex_);
        closers.swap(closers_);
    }
    for (std::thread& closer : closers) {
        closer.join();
    }
    offloader_.reset();
    ceph().rados_ioctx_destroy(ioctx_);
}

std::string RbdPool::display_name() const {
    return name_space_.empty() ? "rbd:" + pool_ : "rbd:" + pool_ + "/" + name_space_;
}

namespace {

// Ceph's reading of a boolean option: true/false in any case, else an integer (non-zero is
// true); a pool's or image's override is listed as the string it was set to.
bool ceph_bool(const std::string& value) {
    if (strcasecmp(value.c_str(), "true") == 0) {
        return true;
    }
    if (strcasecmp(value.c_str(), "false") == 0) {
        return false;
    }
    return std::strtoll(value.c_str(), nullptr, 10) != 0;
}

// A size option ("0", "0B", "32M"): whether it is zero.
bool ceph_size_is_zero(const std::string& value) {
    char* end = nullptr;
    return std::strtoull(value.c_str(), &end, 10) == 0 && end != value.c_str();
}

// The image's effective librbd options, by name, with where each was set.
Result<std::map<std::string, rbd_config_option_t>> image_options(
    rbd_image_t image, std::vector<rbd_config_option_t>* storage, const std::string& where) {
    int count = 0;
    int r = -ERANGE;
    // The list can grow between the sizing call and the next: ask again while it does.
    for (int attempt = 0; attempt < 4 && r == -ERANGE; ++attempt) {
        storage->resize(static_cast<size_t>(std::max(count, 0)));
        r = ceph().rbd_config_image_list(image, storage->empty() ? nullptr : storage->data(),
                                         &count);
    }
    if (r < 0) {
        storage->clear();
        return make_error(-r, "{}: cannot read the image's librbd configuration", where);
    }
    storage->resize(static_cast<size_t>(count));
    std::map<std::string, rbd_config_option_t> by_name;
    for (const rbd_config_option_t& o : *storage) {
        by_name[o.name] = o;
    }
    return by_name;
}

const char* option_source(const rbd_config_option_t& o) {
    switch (o.source) {
        case RBD_CONFIG_SOURCE_POOL:
            return "the pool's configuration (rbd config pool ...)";
        case RBD_CONFIG_SOURCE_IMAGE:
            return "the image's configuration (rbd config image ...)";
        case RBD_CONFIG_SOURCE_CONFIG:
            break;
    }
    return "the client's configuration";
}

// The write cache is switched off for imgfs's cluster handle (see connect), but a pool's or
// an image's own configuration overrides the client's. A write-through cache (no dirty
// bytes allowed) acknowledges only what the cluster has, so that one is harmless. The
// persistent write-back cache (the pwl_cache plugin) acknowledges from local storage.
Status write_cache_off(rbd_image_t image, const std::string& where) {
    std::vector<rbd_config_option_t> storage;
    auto listed = image_options(image, &storage, where);
    if (!listed) {
        return std::move(listed).error();
    }
    const auto& options = *listed;
    std::string problem;
    if (auto cache = options.find("rbd_cache");
        cache != options.end() && ceph_bool(cache->second.value)) {
        auto dirty = options.find("rbd_cache_max_dirty");
        if (dirty == options.end() || !ceph_size_is_zero(dirty->second.value)) {
            problem = fmt::format("librbd's write cache is on for it (rbd_cache={} in {})",
                                  cache->second.value, option_source(cache->second));
        }
    }
    if (auto plugins = options.find("rbd_plugins");
        problem.empty() && plugins != options.end() &&
        std::string(plugins->second.value).find("pwl_cache") != std::string::npos) {
        auto mode = options.find("rbd_persistent_cache_mode");
        if (mode != options.end() && std::string(mode->second.value) != "disabled") {
            problem = fmt::format(
                "librbd's persistent write-back cache is on for it "
                "(rbd_persistent_cache_mode={} in {})",
                mode->second.value, option_source(mode->second));
        }
    }
    // The client sets rbd_blocklist_on_break_lock, but a pool's or image's configuration
    // overrides it. Without it a client that breaks a lapsed holder's lock does not fence
    // that holder off, and the holder's writes still land when its network comes back: two
    // writers. (Checked here: every writer passes this before it takes the lock.)
    std::string fencing;
    if (auto blocklist = options.find("rbd_blocklist_on_break_lock");
        blocklist != options.end() && !ceph_bool(blocklist->second.value)) {
        fencing = fmt::format(
            "{}: rbd_blocklist_on_break_lock={} in {}: a lock broken by another host would not "
            "fence this one off, so two hosts could write it. imgfs writes an image only with "
            "it on; remove the setting",
            where, blocklist->second.value, option_source(blocklist->second));
    }
    // Forced on for the client as well: with it off, librbd dispatches a request on the
    // caller's thread, which here is the event loop, and a request over the cluster's
    // in-flight byte limit would block it with no deadline.
    std::string blocking;
    if (auto non_blocking = options.find("rbd_non_blocking_aio");
        non_blocking != options.end() && !ceph_bool(non_blocking->second.value)) {
        blocking = fmt::format(
            "{}: rbd_non_blocking_aio={} in {}: librbd would run requests on imgfs's event "
            "loop, where one waiting for the cluster stops every other; remove the setting",
            where, non_blocking->second.value, option_source(non_blocking->second));
    }
    ceph().rbd_config_image_list_cleanup(storage.data(), static_cast<int>(storage.size()));
    if (!problem.empty()) {
        return make_error(EINVAL,
                          "{}: {}; imgfs writes an image only with it off, so that every "
                          "write it acknowledges is in the cluster. Remove the setting or set "
                          "rbd_cache_max_dirty=0 for this image",
                          where, problem);
    }
    if (!fencing.empty()) {
        return make_error(EINVAL, "{}", fencing);
    }
    if (!blocking.empty()) {
        return make_error(EINVAL, "{}", blocking);
    }
    return {};
}

}  // namespace

Result<RbdImage> RbdImage::open(std::shared_ptr<RbdPool> pool, const std::string& name,
                                bool read_only, Presence presence) {
    rbd_image_t image = nullptr;
    // librbd's read-only open registers no watch on the header (since Octopus), so other
    // clients could neither see the layer in use nor be stopped by it: `rbd rm` removes an
    // image open only that way, and another host's rescan would take a layer in the middle
    // of a chain edit for an abandoned one. A read-write handle that is never written
    // watches the header and takes no lock (imgfs takes it explicitly, and only through a
    // writer's handle); read_only_ keeps this one from writing. Registering the watch is a
    // write to the cluster: where that fails (caps that allow only reads, a full pool) the
    // layer still opens, quietly, as it can be read.
    int r = -EPERM;
    if (!read_only || presence == Presence::kAnnounced) {
        r = ceph().rbd_open(pool->ioctx(), name.c_str(), &image, nullptr);
    }
    // On any error: a full pool does not refuse the watch, it lets its registration run out
    // the deadline (a full OSD holds writes), and a layer must stay readable there. Narrowed
    // to refusals once, that made every command on a full pool fail with EIO instead of
    // starting and failing cleanly (test_rbd test_chain_edits_on_a_full_pool_lose_nothing).
    // The cost: on a cluster too slow to register a watch in time, the layer is served
    // without one, unseen by other hosts' checks.
    if (read_only && r < 0 && r != -ENOENT) {
        r = ceph().rbd_open_read_only(pool->ioctx(), name.c_str(), &image, nullptr);
    }
    if (r < 0) {
        return rbd_error(r, pool->cluster(),
                         fmt::format("cannot open RBD image {}/{}", pool->display_name(), name));
    }
    RbdImage out;
    out.pool_ = std::move(pool);
    out.image_ = image;
    out.name_ = name;
    out.read_only_ = read_only;
    return out;
}

RbdImage::RbdImage(RbdImage&& o) noexcept
    : pool_(std::move(o.pool_)),
      image_(std::exchange(o.image_, nullptr)),
      name_(std::move(o.name_)),
      read_only_(o.read_only_) {}

RbdImage& RbdImage::operator=(RbdImage&& o) noexcept {
    if (this != &o) {
        reset();
        pool_ = std::move(o.pool_);
        image_ = std::exchange(o.image_, nullptr);
        name_ = std::move(o.name_);
        read_only_ = o.read_only_;
    }
    return *this;
}

namespace {

// rbd_close releases the lock and the watch: round trips. One that misses the deadline is
// noted like any other call's, so the layers closed after it do not wait again (a read-only
// or fsynced layer has no other round trip at close to notice the dead cluster by).
void close_and_note(rbd_image_t image, const RadosCluster& cluster) {
    const auto start = std::chrono::steady_clock::now();
    int r = ceph().rbd_close(image);  // nothing to do about a failure but note it
    // By its time, not only its result: on a stopped OSD each close returned 0 after about
    // three deadlines (its requests time out one after the other, and the close goes on).
    // A close that takes a whole deadline, even one that succeeds, is a cluster past
    // answering in time, which is all the mark says.
    if (r == -ETIMEDOUT || std::chrono::steady_clock::now() - start >=
                               std::chrono::seconds(cluster.options().timeout_s)) {
        cluster.note_unanswered();
    }
}

}  // namespace

void RbdImage::close_image() {
    if (image_ != nullptr) {
        // Waits for the image's requests; a dead cluster fails them at the deadline.
        close_and_note(std::exchange(image_, nullptr), pool_->cluster());
    }
}

void RbdImage::close_off_loop(std::shared_ptr<void> keep) {
    if (image_ != nullptr) {
        rbd_image_t image = std::exchange(image_, nullptr);
        // Runs before the pool's offloader is destroyed, and so before its ioctx and its
        // count of closes go (the offloader is the pool's last member).
        RbdPool* pool = pool_.get();
        pool->close_handed_over();
        std::function<void()> close = [image, keep, pool] {
            close_and_note(image, pool->cluster());
            pool->close_done();
        };
        if (pool->cluster().skip_round_trips()) {
            pool->close_aside(std::move(close));
        } else {
            pool->offloader()->hand_over(std::move(close));
        }
    }
}

void RbdPool::close_handed_over() {
    std::lock_guard<std::mutex> lock(closes_mutex_);
    ++closes_pending_;
}

void RbdPool::close_done() {
    {
        std::lock_guard<std::mutex> lock(closes_mutex_);
        --closes_pending_;
    }
    closes_changed_.notify_all();
}

void RbdPool::close_aside(std::function<void()> close) {
    std::lock_guard<std::mutex> lock(closes_mutex_);
    closers_.emplace_back(std::move(close));
}

void RbdPool::wait_for_closes() {
    if (offloader_->on_worker()) {
        return;  // they queue behind the caller: waiting would never end
    }
    std::unique_lock<std::mutex> lock(closes_mutex_);
    closes_changed_.wait_for(lock, std::chrono::seconds(timeout_s()),
                             [this] { return closes_pending_ == 0; });
}

void RbdImage::reset() {
    close_image();
    pool_.reset();
}

Result<uint64_t> RbdImage::size() const {
    uint64_t size = 0;
    if (int r = ceph().rbd_get_size(image_, &size); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("{}: cannot read the size", name_));
    }
    return size;
}

std::string RbdImage::lock_owners() const {
    rbd_lock_mode_t mode{};
    char* owners[8] = {};
    size_t count = 8;
    if (ceph().rbd_lock_get_owners(image_, &mode, owners, &count) < 0 || count == 0) {
        return "another client";
    }
    std::string out;
    for (size_t i = 0; i < count; ++i) {
        out += (i == 0 ? "" : ", ") + std::string(owners[i]);
    }
    ceph().rbd_lock_get_owners_cleanup(owners, count);
    return out;
}

Result<bool> RbdImage::owner_alive(char** owners, size_t count) const {
    // Every host serving a layer watches it, so a base of a pool many hosts mount has many
    // watchers: the list grows to what librbd says it needs (it sets the count on ERANGE),
    // since assuming the owner alive would keep a dead writer's lock forever.
    std::vector<rbd_image_watcher_t> watchers(16);
    size_t watcher_count = watchers.size();
    int r = ceph().rbd_watchers_list(image_, watchers.data(), &watcher_count);
    for (int tries = 0; r == -ERANGE && tries < 3; ++tries) {
        watchers.resize(std::max(watcher_count, watchers.size() * 2));
        watcher_count = watchers.size();
        r = ceph().rbd_watchers_list(image_, watchers.data(), &watcher_count);
    }
    if (r == -ERANGE) {
        return true;  // still growing faster than we can list: not for us to take
    }
    if (r < 0) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot list the clients that have it open", name_));
    }
    bool alive = false;
    for (size_t i = 0; i < count && !alive; ++i) {
        for (size_t w = 0; w < watcher_count; ++w) {
            alive = alive || std::strcmp(owners[i], watchers[w].addr) == 0;
        }
    }
    ceph().rbd_watchers_list_cleanup(watchers.data(), watcher_count);
    return alive;
}

Result<bool> RbdImage::held_by_live_client() const {
    rbd_lock_mode_t mode{};
    char* owners[8] = {};
    size_t count = 8;
    int r = ceph().rbd_lock_get_owners(image_, &mode, owners, &count);
    if (r == -ENOENT || (r >= 0 && count == 0)) {
        return false;
    }
    if (r == -ERANGE) {
        return true;  // a shared lock of many clients: not for us to take
    }
    if (r < 0) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot read the exclusive lock's owner", name_));
    }
    Result<bool> alive = owner_alive(owners, count);
    ceph().rbd_lock_get_owners_cleanup(owners, count);
    return alive;
}

Status RbdImage::check_write_cache_off() const {
    Status st = write_cache_off(image_, pool_->display_name() + "/" + name_);
    if (!st && (st.error().errnum == ETIMEDOUT || st.error().errnum == ESHUTDOWN)) {
        // Reading the configuration is a round trip: past the deadline, or blocklisted, it
        // fails as every other call does (EIO with the reason; a timeout also marks the
        // cluster as not answering).
        return rbd_error(-st.error().errnum, pool_->cluster(), st.error().context);
    }
    return st;
}

Status RbdImage::lock_exclusive() const {
    TRY(check_lockable());
    TRY(check_write_cache_off());  // every writer takes the lock before its first write
    // Already ours (a claim that took it but failed right after): the owner check below would
    // find this client alive and refuse it its own lock.
    int is_owner = 0;
    if (ceph().rbd_is_exclusive_lock_owner(image_, &is_owner) == 0 && is_owner != 0) {
        return {};
    }
    // Asked for the lock, a client under librbd's automatic policy (QEMU, rbd map, any client
    // that never took it explicitly) hands it over and waits to get it back: asking a live
    // owner would make this host a second writer of an image in use. Only a lock whose owner
    // no longer watches the image (dead; Ceph dropped its watch) is taken, by breaking it.
    TRY_ASSIGN(bool live, held_by_live_client());
    if (live) {
        return make_error(EROFS, "{} is being written by {} (RBD exclusive lock)", name_,
                          lock_owners());
    }
    int r = ceph().rbd_lock_acquire(image_, RBD_LOCK_MODE_EXCLUSIVE);
    if (r == -EROFS || r == -EBUSY || r == -EAGAIN) {
        return make_error(EROFS, "{} is being written by {} (RBD exclusive lock)", name_,
                          lock_owners());
    }
    if (r < 0) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot take the exclusive lock", name_));
    }
    return {};
}

Status RbdImage::check_lockable() const {
    uint64_t features = 0;
    if (int r = ceph().rbd_get_features(image_, &features); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("{}: cannot read its features", name_));
    }
    if ((features & RBD_FEATURE_EXCLUSIVE_LOCK) == 0) {
        return make_error(EPERM,
                          "{} lacks RBD's exclusive-lock feature, without which imgfs cannot "
                          "keep other hosts from writing it; `rbd feature enable {}/{} "
                          "exclusive-lock` adds it",
                          name_, pool_->display_name().substr(4), name_);
    }
    return {};
}

Status RbdImage::unlock_exclusive() const {
    if (int r = ceph().rbd_lock_release(image_); r < 0) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot give back the exclusive lock", name_));
    }
    return {};
}

Status RbdImage::check_no_writer() const {
    TRY(check_lockable());
    // Only a listed owner needs the acquire below (which breaks the lock of one Ceph sees
    // gone): taking a free lock, even for a moment, could fail another host's first write.
    rbd_lock_mode_t mode{};
    char* owners[8] = {};
    size_t count = 8;
    int r = ceph().rbd_lock_get_owners(image_, &mode, owners, &count);
    if (r == -ENOENT || (r >= 0 && count == 0)) {
        return {};
    }
    if (r >= 0) {
        ceph().rbd_lock_get_owners_cleanup(owners, count);
    } else if (r != -ERANGE) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot read the exclusive lock's owner", name_));
    }
    // lock_exclusive refuses a live owner without asking it for the lock.
    if (Status st = lock_exclusive(); !st) {
        return st.error().errnum == EROFS ? make_error(EBUSY, "{}", st.error().message()) : st;
    }
    return unlock_exclusive();
}

Result<size_t> RbdImage::other_watchers() const {
    rbd_image_watcher_t watchers[16];
    size_t count = 16;
    int r = ceph().rbd_watchers_list(image_, watchers, &count);
    if (r == -ERANGE) {
        return count;  // more than 16: certainly others
    }
    if (r < 0) {
        return rbd_error(r, pool_->cluster(),
                         fmt::format("{}: cannot list the clients that have it open", name_));
    }
    const uint64_t self = ceph().rados_get_instance_id(pool_->cluster().handle());
    size_t others = 0;
    for (size_t i = 0; i < count; ++i) {
        others += static_cast<uint64_t>(watchers[i].id) != self ? 1 : 0;
    }
    ceph().rbd_watchers_list_cleanup(watchers, count);
    return others;
}

Result<std::string> RbdImage::id() const {
    char id[64];
    if (int r = ceph().rbd_get_id(image_, id, sizeof id); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("{}: cannot read the id", name_));
    }
    return std::string(id);
}

}  // namespace imgfs
