#include "drivers/rbd/rbd_store.h"

#include <algorithm>
#include <functional>
#include <vector>

#include "drivers/rbd/rbd_node.h"

namespace imgfs {

namespace {

constexpr const char* kScheme = "rbd:";

// What Ceph accepts in a pool, namespace or image name, less what QEMU's rbd: syntax
// reserves ('/', '@', ':') and what would be a hidden or relative file elsewhere.
Status check_part(const std::string& part, const char* what, const std::string& spec) {
    bool bad = part.empty() || part == "." || part == ".." ||
               part.find_first_of("/@:\\\n") != std::string::npos;
    if (bad) {
        return make_error(EINVAL, "'{}': '{}' is not a valid {} name", spec, part, what);
    }
    return {};
}

// Image names are checked like the other parts; "." and ".." are fine for RBD but never ours.
Status check_image_name(const std::string& name) {
    if (name.empty() || name.find_first_of("/@:\\\n") != std::string::npos) {
        return make_error(EINVAL, "'{}' is not an image name of the pool", name);
    }
    return {};
}

// RBD allows names imgfs cannot address (':' and a backslash are option syntax in QEMU's rbd:
// names, '@' names snapshots): such an image is never written, created or renamed, but it is
// read like any other, since it may use a layer of the pool (QEMU opens it through blockdev
// options). Refused at first, it failed the scan's walk, which stopped every commit in the
// pool and the removal of leftovers. A name that cannot be an image at all is a missing one.
Status readable(const std::string& name) {
    if (name.empty() || name.find('/') != std::string::npos) {
        return make_error(ENOENT, "'{}' is not an image name of the pool", name);
    }
    return {};
}

uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ULL;
    for (unsigned char c : s) {
        h = (h ^ c) * 1099511628211ULL;
    }
    return h;
}

}  // namespace

bool is_rbd_spec(const std::string& spec) {
    return spec.rfind(kScheme, 0) == 0;
}

Result<RbdLocation> parse_rbd_location(const std::string& spec) {
    if (!is_rbd_spec(spec)) {
        return make_error(EINVAL, "'{}' is not of the form rbd:POOL[/NAMESPACE]", spec);
    }
    std::string rest = spec.substr(4);
    RbdLocation where;
    size_t slash = rest.find('/');
    where.pool = rest.substr(0, slash);
    TRY(check_part(where.pool, "pool", spec));
    if (slash != std::string::npos) {
        where.name_space = rest.substr(slash + 1);
        TRY(check_part(where.name_space, "namespace", spec));
    }
    return where;
}

Result<size_t> RbdFile::read_at(MutBuf buf, uint64_t offset) {
    // librbd refuses a read that starts at or past the end (EINVAL): stop at the end.
    TRY_ASSIGN(uint64_t size, image_.size());
    const size_t want =
        offset >= size ? 0 : static_cast<size_t>(std::min<uint64_t>(buf.size(), size - offset));
    size_t done = 0;
    while (done < want) {
        ssize_t n = ceph().rbd_read(image_.handle(), offset + done, want - done,
                                    reinterpret_cast<char*>(buf.data() + done));
        if (n < 0) {
            return rbd_error(static_cast<int>(n), image_.pool()->cluster(),
                             fmt::format("reading {}", image_.name()));
        }
        if (n == 0) {
            break;  // the end of the image
        }
        done += static_cast<size_t>(n);
    }
    return done;
}

Result<std::shared_ptr<Node>> RbdFile::into_node(NodeEnv env, std::string name,
                                                 const FileOptions& /*options*/) {
    TRY_ASSIGN(std::shared_ptr<RbdNode> node,
               RbdNode::open(env, std::move(name), std::move(image_), lock_, size_bytes_));
    return std::shared_ptr<Node>(std::move(node));
}

Result<std::unique_ptr<RbdStore>> RbdStore::open(const RbdLocation& where,
                                                 const RadosOptions& options, EventLoop* loop) {
    TRY_ASSIGN(std::shared_ptr<RadosCluster> cluster, RadosCluster::connect(options));
    TRY_ASSIGN(std::shared_ptr<RbdPool> pool,
               RbdPool::open(std::move(cluster), where.pool, where.name_space, loop));
    return std::make_unique<RbdStore>(std::move(pool));
}

RbdStore::RbdStore(std::shared_ptr<RbdPool> pool)
    : pool_(std::move(pool)), display_(pool_->display_name()) {}

std::string RbdStore::own_name(const std::string& recorded) const {
    // "rbd:POOL/IMAGE" or "rbd:POOL/NAMESPACE/IMAGE", this store's pool and namespace only;
    // anything with options (':') or a snapshot ('@') is not a plain image of ours.
    const std::string prefix = display_ + "/";
    if (recorded.rfind(prefix, 0) != 0) {
        return {};
    }
    std::string image = recorded.substr(prefix.size());
    return check_image_name(image) ? image : std::string();
}

std::string RbdStore::recorded_name(const std::string& name) const {
    return display_ + "/" + name;
}

FileId RbdStore::file_id(const std::string& display, const std::string& image_id) const {
    // No device number is all ones; the image id is unique within the pool.
    return FileId{static_cast<dev_t>(~0ULL), static_cast<ino_t>(fnv1a(display + "/" + image_id))};
}

std::string RbdStore::external_name(const std::string& recorded) const {
    if (!is_rbd_spec(recorded)) {
        return {};
    }
    std::vector<std::string> parts;
    std::string rest = recorded.substr(std::string(kScheme).size());
    for (size_t from = 0;;) {
        size_t slash = rest.find('/', from);
        parts.push_back(rest.substr(from, slash - from));
        if (slash == std::string::npos) {
            break;
        }
        from = slash + 1;
    }
    if (parts.size() < 2 || parts.size() > 3) {
        return {};
    }
    for (const std::string& part : parts) {
        if (!check_part(part, "name", recorded)) {
            return {};  // options (':'), a snapshot ('@') or an empty part
        }
    }
    const std::string where = recorded.substr(0, recorded.rfind('/'));
    return where == display_ ? std::string() : recorded;
}

Result<std::pair<std::shared_ptr<RbdPool>, std::string>> RbdStore::external_image(
    const std::string& spec) {
    if (external_name(spec).empty()) {
        return make_error(EINVAL, "'{}' is not an image of another pool", spec);
    }
    const size_t cut = spec.rfind('/');
    const std::string where = spec.substr(0, cut);
    std::lock_guard<std::mutex> lock(external_mutex_);
    auto it = external_pools_.find(where);
    if (it == external_pools_.end()) {
        TRY_ASSIGN(RbdLocation loc, parse_rbd_location(where));
        TRY_ASSIGN(std::shared_ptr<RbdPool> pool,
                   RbdPool::open(pool_->cluster_ref(), loc.pool, loc.name_space, pool_->loop()));
        it = external_pools_.emplace(where, std::move(pool)).first;
    }
    return std::make_pair(it->second, spec.substr(cut + 1));
}

Result<std::vector<StoreEntry>> RbdStore::list() {
    std::vector<rbd_image_spec_t> specs(64);
    size_t count = specs.size();
    int r = 0;
    while ((r = ceph().rbd_list2(pool_->ioctx(), specs.data(), &count)) == -ERANGE) {
        specs.resize(count);
    }
    if (r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot list {}", display_));
    }
    std::vector<StoreEntry> out;
    out.reserve(count);
    for (size_t i = 0; i < count; ++i) {
        out.push_back(StoreEntry{specs[i].name, file_id(display_, specs[i].id)});
    }
    ceph().rbd_image_spec_list_cleanup(specs.data(), count);
    std::sort(out.begin(), out.end(),
              [](const StoreEntry& a, const StoreEntry& b) { return a.name < b.name; });
    return out;
}

Result<FileId> RbdStore::id_of(const std::string& name, bool /*follow_links*/) {
    TRY(readable(name));
    TRY_ASSIGN(std::vector<StoreEntry> entries, list());
    for (const StoreEntry& e : entries) {
        if (e.name == name) {
            return e.id;
        }
    }
    return make_error(ENOENT, "{}", name);
}

Result<std::unique_ptr<StoreFile>> RbdStore::open_image(const std::string& name, bool read_only,
                                                        Lock lock, RbdImage::Presence presence) {
    if (is_rbd_spec(name)) {
        // Another pool's image (allow_external_backing): a base this mount only reads.
        if (!read_only) {
            return make_error(EROFS, "{} is in another pool: this mount only reads it", name);
        }
        TRY_ASSIGN(auto where, external_image(name));
        TRY_ASSIGN(RbdImage image, RbdImage::open(where.first, where.second, true, presence));
        TRY_ASSIGN(std::string id, image.id());
        TRY_ASSIGN(uint64_t size, image.size());
        FileId fid = file_id(where.first->display_name(), id);
        return std::unique_ptr<StoreFile>(
            std::make_unique<RbdFile>(std::move(image), fid, RbdLock::kNone, size));
    }
    TRY(readable(name));
    if (!read_only) {
        TRY(check_image_name(name));
    }
    TRY_ASSIGN(RbdImage image, RbdImage::open(pool_, name, read_only, presence));
    TRY_ASSIGN(std::string id, image.id());
    if (!read_only && lock == Lock::kDeferred) {
        TRY(image.check_write_cache_off());
        TRY(image.check_no_writer());
    }
    if (!read_only && lock == Lock::kNow) {
        if (Status st = image.lock_exclusive(); !st) {
            // Another host writes it (EROFS from the lock) is EBUSY to the caller; a missing
            // feature or a write cache keeps its own errno.
            const int err = st.error().errnum == EROFS ? EBUSY : st.error().errnum;
            return make_error(err, "{}", st.error().context);
        }
    }
    RbdLock held = RbdLock::kNone;
    if (!read_only && lock != Lock::kNone) {
        held = lock == Lock::kNow ? RbdLock::kHeld : RbdLock::kPending;
    }
    TRY_ASSIGN(uint64_t size, image.size());  // here, off the loop: it may be a round trip
    return std::unique_ptr<StoreFile>(
        std::make_unique<RbdFile>(std::move(image), file_id(display_, id), held, size));
}

Result<std::unique_ptr<StoreFile>> RbdStore::open(const std::string& name, bool read_only,
                                                  bool /*direct*/) {
    // Its callers take short looks (a header read by a scan, a backing probe or `imgfs info`):
    // unseen by other hosts, which would otherwise take the image for one in use, and without
    // a watch to register, which on a full pool runs out the whole deadline. Layers that are
    // served open through open_from_loop, and are seen.
    return open_image(name, read_only, Lock::kNone, RbdImage::Presence::kQuiet);
}

Task<Result<std::unique_ptr<StoreFile>>> RbdStore::open_from_loop(std::string name,
                                                                  FileOptions options) {
    std::function<Result<std::unique_ptr<StoreFile>>()> call =
        [this, name, options]() -> Result<std::unique_ptr<StoreFile>> {
        return open_image(name, options.read_only,
                          options.exclusive ? Lock::kDeferred : Lock::kNone);
    };
    co_return co_await pool_->offloader()->run<Result<std::unique_ptr<StoreFile>>>(std::move(call));
}

Result<std::unique_ptr<StoreFile>> RbdStore::create_exclusive(const std::string& name) {
    TRY(check_image_name(name));
    rbd_image_options_t opts = nullptr;
    ceph().rbd_image_options_create(&opts);
    // Ceph's default features, stated rather than taken from rbd_default_features: an image
    // imgfs writes needs exclusive-lock (check_lockable), which a cluster tuned for old
    // kernel clients may leave out of its defaults.
    const uint64_t features = RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |
                              RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF |
                              RBD_FEATURE_DEEP_FLATTEN;
    ceph().rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, features);
    int r = ceph().rbd_create4(pool_->ioctx(), name.c_str(), 0, opts);
    ceph().rbd_image_options_destroy(opts);
    if (r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot create {}", name));
    }
    Result<std::unique_ptr<StoreFile>> made = open_image(name, false, Lock::kNow);
    if (!made) {
        // Not left behind: the name would be taken, and the next attempt fail with EEXIST.
        (void)ceph().rbd_remove(pool_->ioctx(), name.c_str());
    }
    return made;
}

Status RbdStore::rename_noreplace(const std::string& from, const std::string& to) {
    TRY(check_image_name(from));
    TRY(check_image_name(to));
    // librbd refuses a taken destination (EEXIST) and never replaces it. Not atomic: librbd
    // claims the new name's id object, updates the pool's directory, then drops the old id
    // object, each a separate cluster write. One failing at the deadline (or a crash) can
    // leave the new name claimed but unlisted, or the rename done while this reports an
    // error. The chain-edit recovery (scan_plan: restore_renamed) reports a rename back that
    // fails and tries it again at every scan; a name left claimed stays so until an operator
    // removes it. Known limit, docs/design.md section 10.
    if (int r = ceph().rbd_rename(pool_->ioctx(), from.c_str(), to.c_str()); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot rename {} to {}", from, to));
    }
    return {};
}

Status RbdStore::add_name(const std::string& existing, const std::string& name) {
    return make_error(EOPNOTSUPP, "cannot give {} the second name {}: an RBD image has one name",
                      existing, name);
}

Result<bool> RbdStore::open_elsewhere(const std::string& name) {
    TRY(check_image_name(name));
    TRY_ASSIGN(RbdImage image, RbdImage::open(pool_, name, true, RbdImage::Presence::kQuiet));
    TRY_ASSIGN(size_t others, image.other_watchers());
    return others != 0;
}

Result<bool> RbdStore::may_be_in_creation(const std::string& name) {
    TRY(check_image_name(name));
    TRY_ASSIGN(RbdImage image, RbdImage::open(pool_, name, true, RbdImage::Presence::kQuiet));
    // Created so recently that its creator may not have opened it yet (a snapshot overlay
    // between rbd_create and rbd_open on another host). Two deadlines cover that step and a
    // modest clock difference between the hosts.
    timespec created{};
    if (int r = ceph().rbd_get_create_timestamp(image.handle(), &created); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot tell when {} was made", name));
    }
    const auto age_s = ::time(nullptr) - created.tv_sec;
    return age_s < 2 * static_cast<int64_t>(pool_->cluster().options().timeout_s);
}

Status RbdStore::remove(const std::string& name) {
    TRY(check_image_name(name));
    pool_->wait_for_closes();  // a node dropped just before may still have it open
    if (int r = ceph().rbd_remove(pool_->ioctx(), name.c_str()); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot remove {}", name));
    }
    return {};
}

Result<StoreSpace> RbdStore::space() {
    rados_cluster_stat_t st{};
    if (int r = ceph().rados_cluster_stat(pool_->cluster().handle(), &st); r < 0) {
        return rbd_error(r, pool_->cluster(), fmt::format("cannot stat {}", display_));
    }
    StoreSpace s;
    s.known = st.kb != 0;  // usage is gathered by the cluster's manager; without one, none
    s.block_bytes = 4096;
    s.transfer_bytes = 4 << 20;  // an RBD object
    s.blocks = st.kb / 4;
    s.free_blocks = st.kb_avail / 4;
    s.available_blocks = st.kb_avail / 4;
    s.files = st.num_objects + 1000000;
    s.free_files = 1000000;
    return s;
}

}  // namespace imgfs
