#include "jobs/image_set.h"

#include <algorithm>
#include <cstring>
#include <ctime>
#include <map>

#include "core/drain.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "core/transaction.h"
#include "drivers/file.h"
#include "jobs/chain_edit.h"
#include "jobs/job.h"
#include "jobs/scan_plan.h"

namespace imgfs {

namespace {

// How often a scan looks again at an image another process's lock keeps (ImageSet::scan).
constexpr std::chrono::milliseconds kLockRetryPause{50};

constexpr const char* kExtensions[] = {".qcow2", ".qcow", ".img", ".raw"};

bool ends_with(const std::string& s, const char* suffix) {
    size_t n = std::strlen(suffix);
    return s.size() > n && s.compare(s.size() - n, n, suffix) == 0;
}

bool job_running(const Export& e) {
    return e.job != nullptr && !e.job->finished();
}

// The chain of `e` as the scan planner compares it with the directory.
std::vector<ServedLayer> served_layers(const Export& e) {
    std::vector<ServedLayer> out;
    for (const Layer& l : e.chain.layers) {
        out.push_back(ServedLayer{l.file, l.id});
    }
    return out;
}

}  // namespace

std::string export_name_of(const std::string& file, char snapshot_separator) {
    std::string base = file;
    for (const char* ext : kExtensions) {
        if (ends_with(base, ext)) {
            base.resize(base.size() - std::strlen(ext));
            break;
        }
    }
    size_t at = base.find(snapshot_separator);
    return at == std::string::npos ? base : base.substr(0, at);
}

bool is_image_file_name(const std::string& file) {
    if (file.empty() || file[0] == '.') {
        return false;
    }
    return std::any_of(std::begin(kExtensions), std::end(kExtensions),
                       [&file](const char* e) { return ends_with(file, e); });
}

ImageSet::ImageSet(NodeEnv env, std::unique_ptr<Store> store, ImageSetOptions options)
    : env_(env),
      store_(std::move(store)),
      options_(std::move(options)),
      timers_(env.loop),
      scan_lock_(env.loop, &timers_),
      offloader_(env.loop) {}

ImageSet::~ImageSet() = default;

std::shared_ptr<Export> ImageSet::find(std::string_view name) const {
    for (const auto& e : exports_) {
        if (e->name == name) {
            return e;
        }
    }
    return nullptr;
}

std::shared_ptr<Export> ImageSet::find_id(uint64_t id) const {
    for (const auto& e : exports_) {
        if (e->id == id) {
            return e;
        }
    }
    return nullptr;
}

Task<Result<std::vector<UnservedUser>>> ImageSet::unserved_users_of(std::set<FileId> ids) {
    std::set<std::string> served;
    for (const auto& e : exports_) {
        for (const Layer& l : e->chain.layers) {
            served.insert(l.file);
        }
    }
    Store* store = store_.get();
    const bool external = options_.allow_external_backing;
    std::function<Result<std::vector<UnservedUser>>()> find = [store, external, ids, served] {
        return unserved_users(store, external, ids, served);
    };
    co_return co_await offloader_.run<Result<std::vector<UnservedUser>>>(std::move(find));
}

std::vector<Export*> ImageSet::users_of(const Layer& layer, const Export* except) const {
    std::vector<Export*> out;
    for (const auto& e : exports_) {
        if (e.get() == except) {
            continue;
        }
        for (const Layer& l : e->chain.layers) {
            // Two chains may hold separate nodes on one file (one opened before a snapshot
            // made the layer a backing layer): that is still one layer they share.
            if (l.node == layer.node || (layer.id != FileId{} && l.id == layer.id)) {
                out.push_back(e.get());
                break;
            }
        }
    }
    return out;
}

void ImageSet::share_backing_layers(const Chain& chain) {
    for (size_t i = 1; i < chain.layers.size(); ++i) {
        cache_.chains.emplace(
            chain.layers[i].file,
            std::vector<Layer>(chain.layers.begin() + static_cast<std::ptrdiff_t>(i),
                               chain.layers.end()));
    }
}

Task<Result<TimedMutex::Guard>> ImageSet::lock_export(std::shared_ptr<Export> e, std::string what) {
    std::optional<TimedMutex::Guard> guard = co_await e->ops.lock_for(options_.op_wait);
    if (!guard) {
        co_return make_error(EBUSY,
                             "{}: {} gave up after {} ms: another operation on the image did not "
                             "finish",
                             e->name, what, options_.op_wait.count());
    }
    if (e->removed) {
        co_return make_error(ENODEV, "{} is no longer exported", e->name);
    }
    co_return std::move(*guard);
}

Task<Status> ImageSet::claim_writes(std::shared_ptr<Export> e, std::string op) {
    CO_TRY_ASSIGN(TimedMutex::Guard guard, co_await lock_export(e, op));
    CO_TRY(co_await e->backend->claim_writes(std::move(op)));
    co_return Status{};
}

Task<Status> ImageSet::verify_chain(std::shared_ptr<Export> e) {
    std::vector<ServedLayer> layers = served_layers(*e);
    Store* store = store_.get();
    const bool external = options_.allow_external_backing;
    std::function<std::string()> check = [store, external, layers] {
        return check_served_chain(store, external, layers);
    };
    std::string why = co_await offloader_.run<std::string>(std::move(check));
    if (why.empty()) {
        e->chain_mismatch.clear();  // mended on disk since: status stops reporting it
        co_return Status{};
    }
    e->chain_mismatch = why;
    co_return make_error(EIO,
                         "{}: the chain on disk differs from the one served ({}); nothing was "
                         "changed",
                         e->name, why);
}

void ImageSet::fence(Export* e, const std::string& reason) {
    e->backend->fence(reason);
    e->last_error = "failed: " + reason;
    env_.log->error("{}.raw is failed and refuses I/O until a rescan reopens it (once closed): {}",
                    e->name, reason);
}

// ---- Scan ----

// Every export's lock, in ascending id order; exports whose lock is held too long are left
// out (and as they are).
struct ImageSet::Locked {
    std::vector<std::shared_ptr<Export>> exports;
    std::vector<TimedMutex::Guard> guards;
    std::vector<std::shared_ptr<Export>> busy;
};

Task<ImageSet::Locked> ImageSet::lock_all() {
    Locked out;
    std::vector<std::shared_ptr<Export>> all = exports_;
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
    const auto deadline = std::chrono::steady_clock::now() + options_.op_wait;
    for (auto& e : all) {
        auto left = std::max<std::chrono::nanoseconds>(deadline - std::chrono::steady_clock::now(),
                                                       std::chrono::nanoseconds(0));
        std::optional<TimedMutex::Guard> g = co_await e->ops.lock_for(left);
        if (g) {
            out.guards.push_back(std::move(*g));
            out.exports.push_back(std::move(e));
        } else {
            out.busy.push_back(std::move(e));
        }
    }
    co_return out;
}

Task<Status> ImageSet::scan(std::chrono::milliseconds lock_grace) {
    const auto lock_deadline = std::chrono::steady_clock::now() + lock_grace;
    std::optional<TimedMutex::Guard> scanning = co_await scan_lock_.lock_for(options_.op_wait);
    if (!scanning) {
        co_return make_error(EBUSY, "{}: another rescan did not finish within {} ms", dir_path(),
                             options_.op_wait.count());
    }
    Locked locked = co_await lock_all();
    ScanInput in;
    in.store = store_.get();
    in.allow_external_backing = options_.allow_external_backing;
    // Held locks exclude chain edits on those images; a busy one may be in the middle of one.
    in.remove_leftovers = !options_.read_only && locked.busy.empty() && edits_in_flight_ == 0;
    for (const auto& e : locked.exports) {
        in.served[e->id] = served_layers(*e);
    }
    std::function<ScanPlan()> planner = [in] { return plan_scan(in); };
    ScanPlan plan = co_await offloader_.run<ScanPlan>(std::move(planner));
    if (!plan.failed && !plan.interrupted.empty()) {
        // Finished first, then looked at again: the names have changed.
        for (const std::string& referrer : plan.interrupted) {
            if (Status st = co_await finish_interrupted_edit(this, referrer); !st) {
                env_.log->error("{}: cannot finish the chain edit a crash interrupted: {}",
                                referrer, st.error().message());
            }
        }
        std::function<ScanPlan()> again = [in] { return plan_scan(in); };
        plan = co_await offloader_.run<ScanPlan>(std::move(again));
    }
    if (plan.failed) {
        co_return std::move(*plan.failed);
    }
    for (const std::string& r : plan.removed) {
        env_.log->info("{}: removed {}", dir_path(), r);
    }
    for (const auto& e : locked.busy) {
        plan.wanted.erase(e->name);
        plan.problems.push_back(
            {e->chain.layers.front().file,
             fmt::format("{}.raw was not rescanned: another operation on it did not finish in time",
                         e->name)});
    }
    co_await apply_scan(std::move(plan), std::move(locked.exports), lock_deadline);
    co_return Status{};
}

// Keeps, reports or removes each locked export by the plan, then opens the new roots.
Task<void> ImageSet::apply_scan(ScanPlan plan, std::vector<std::shared_ptr<Export>> locked,
                                std::chrono::steady_clock::time_point lock_deadline) {
    problems_ = std::move(plan.problems);
    std::map<std::string, std::string> wanted = std::move(plan.wanted);
    for (auto& e : locked) {
        auto mismatch = plan.mismatches.find(e->id);
        e->chain_mismatch = mismatch != plan.mismatches.end() ? mismatch->second : std::string();
        if (!e->chain_mismatch.empty()) {
            problems_.push_back(
                {e->chain.layers.front().file,
                 fmt::format("{}.raw: the chain on disk differs from the one served: {}", e->name,
                             e->chain_mismatch)});
        }
        auto it = wanted.find(e->name);
        bool keep = it != wanted.end() && it->second == e->chain.layers.front().file;
        // A failed image, or one whose top layer refuses writes since its storage failed a
        // flush, is opened afresh from the directory once nothing uses it.
        bool reopen = e->backend->fenced() ||
                      (!e->chain.layers.empty() &&
                       !e->chain.layers.front().node->layer_refusing_writes().empty());
        bool in_use = e->backend->open_count() > 0 || job_running(*e);
        if ((!keep || reopen) && in_use) {
            problems_.push_back(
                {e->chain.layers.front().file,
                 fmt::format("{}.raw is {}; keeping it although {}", e->name,
                             job_running(*e) ? "busy with a job" : "open",
                             reopen ? "it is failed" : e->chain.layers.front().file + " changed")});
            keep = true;
            reopen = false;
        }
        if (keep && !reopen) {
            wanted.erase(e->name);
            continue;
        }
        co_await remove_export(e);
    }
    for (const auto& [name, root] : wanted) {
        Status st = co_await open_export(root, name, lock_deadline);
        if (!st) {
            problems_.push_back({root, st.error().message()});
        }
    }
    log_problems();
}

void ImageSet::log_problems() {
    for (const ScanProblem& p : problems_) {
        env_.log->warn("{}: {}", dir_path(), p.reason);
    }
}

// Another process's image lock refuses a layer with EBUSY (FileNode::check_perm), when the
// chain opens or when the backend attaches. So can a conflict inside the graph, which waiting
// does not end; the wait is bounded, and only the scan at mount time asks for one, where such a
// conflict is rare and costs no more than the wait.
Task<Status> ImageSet::open_export(std::string root, std::string name,
                                   std::chrono::steady_clock::time_point lock_deadline) {
    bool told = false;
    for (;;) {
        Status st = co_await try_open_export(root, name);
        auto left = lock_deadline - std::chrono::steady_clock::now();
        if (st || st.error().errnum != EBUSY || left <= std::chrono::nanoseconds{0}) {
            co_return st;
        }
        if (!told) {
            told = true;
            env_.log->info(
                "{}; trying again for up to {} ms, in case a process that just ended "
                "holds it (the kernel drops its locks once its I/O is done)",
                st.error().message(), std::chrono::ceil<std::chrono::milliseconds>(left).count());
        }
        co_await env_.loop->sleep(std::min<std::chrono::nanoseconds>(left, kLockRetryPause));
    }
}

// Opens root's chain and exports it as `name`, or closes what it opened and says why not.
Task<Status> ImageSet::try_open_export(std::string root, std::string name) {
    ChainOptions co;
    co.read_only = options_.read_only;
    co.allow_external_backing = options_.allow_external_backing;
    co.direct = options_.direct;
    co.qcow2 = options_.qcow2;
    co.faults = options_.faults;
    co.wrap_file = options_.wrap_file;
    CO_TRY_ASSIGN(Chain chain, co_await open_chain(env_, store_.get(), root, co, &cache_));
    for (const Layer& l : chain.layers) {
        auto changing = changing_.find(l.id);
        if (l.id != FileId{} && changing != changing_.end()) {
            std::string why = fmt::format("{}: not exported while {}", root, changing->second);
            co_await retire_layers(std::move(chain.layers), nullptr);
            co_return make_error(EBUSY, "{}", why);
        }
    }
    auto e = std::make_shared<Export>(next_id_++, name, env_.loop, &timers_);
    e->chain = std::move(chain);
    e->backend = std::make_unique<BlockBackend>(env_.loop, name);
    Perms perm = perm::kConsistentRead;
    if (!options_.read_only) {
        perm |= perm::kWrite | perm::kResize;
    }
    Transaction tx(env_.graph);
    e->backend->attach(&tx, e->chain.top(), perm, perm::kConsistentRead | perm::kWriteUnchanged);
    if (Status st = tx.commit(); !st) {
        std::vector<Layer> layers = std::move(e->chain.layers);
        co_await retire_layers(std::move(layers), nullptr);
        co_return make_error(st.error().errnum, "{}: {}", root, st.error().message());
    }
    env_.log->info("exporting {}.raw ({} layer{}, top {})", name, e->chain.layers.size(),
                   e->chain.layers.size() == 1 ? "" : "s", root);
    exports_.push_back(std::move(e));
    co_return Status{};
}

// The caller holds e->ops (and the scan lock).
Task<void> ImageSet::remove_export(std::shared_ptr<Export> e) {
    env_.log->info("no longer exporting {}.raw", e->name);
    e->removed = true;
    if (e->backend->root() != nullptr) {
        // Requests in flight finish first; those that come later find no image (ENODEV).
        std::vector<std::shared_ptr<Node>> nodes{e->backend->root()->node_ref()};
        DrainGuard drained = co_await drain(nodes);
        Transaction tx(env_.graph);
        tx.detach(e->backend->root());
        if (Status st = tx.commit_removal(); !st) {
            env_.log->warn("{}: permissions not refreshed after its removal: {}", e->name,
                           st.error().message());
        }
    }
    auto it = std::find(exports_.begin(), exports_.end(), e);
    if (it != exports_.end()) {
        exports_.erase(it);
    }
    std::vector<Layer> layers = std::move(e->chain.layers);
    e->chain.layers.clear();
    co_await retire_layers(std::move(layers), e.get());
}

Task<void> ImageSet::retire_layers(std::vector<Layer> layers, const Export* e) {
    for (Layer& l : layers) {
        const bool node_in_use = std::any_of(exports_.begin(), exports_.end(), [&](const auto& x) {
            return x.get() != e && std::any_of(x->chain.layers.begin(), x->chain.layers.end(),
                                               [&](const Layer& o) { return o.node == l.node; });
        });
        if (node_in_use) {
            continue;  // a base another export still uses
        }
        // Out of the cache before the close suspends: a scan meanwhile must not attach a new
        // chain to a node being closed. (The cache would also keep the node, and its file,
        // open for a chain that may never come.)
        const Node* gone = l.node.get();
        for (auto it = cache_.chains.begin(); it != cache_.chains.end();) {
            bool holds = std::any_of(it->second.begin(), it->second.end(),
                                     [gone](const Layer& c) { return c.node.get() == gone; });
            it = holds ? cache_.chains.erase(it) : std::next(it);
        }
        Status st = co_await l.node->close();
        if (!st) {
            env_.log->error("closing {}: {}", l.file, st.error().message());
            ++failed_closes_;
        }
    }
    layers.clear();
    forget_unused_layers();
}

void ImageSet::forget_unused_layers() {
    for (auto it = cache_.chains.begin(); it != cache_.chains.end();) {
        const Layer& top = it->second.front();
        bool used = false;
        for (const auto& e : exports_) {
            for (const Layer& l : e->chain.layers) {
                used = used || l.node == top.node;
            }
        }
        it = used ? std::next(it) : cache_.chains.erase(it);
    }
}

Task<Status> ImageSet::close_all() {
    const uint64_t failed_before = failed_closes_;
    store_->begin_closing();
    {
        TimedMutex::Guard scanning = co_await scan_lock_.lock();
        while (!exports_.empty()) {
            std::shared_ptr<Export> e = exports_.back();
            TimedMutex::Guard guard = co_await e->ops.lock();
            co_await remove_export(e);
        }
    }
    co_await timers_.join();
    if (uint64_t failed = failed_closes_ - failed_before; failed > 0) {
        co_return make_error(EIO, "{} layer{} did not flush or close cleanly (logged above)",
                             failed, failed == 1 ? "" : "s");
    }
    co_return Status{};
}

namespace {

std::string utc_time(int64_t unix_s) {
    std::time_t t = static_cast<std::time_t>(unix_s);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

}  // namespace

// The last failed request of NAME.raw (null if none): a full or failing disk shows here, and
// "ongoing" turns false after a quiet period without failures.
void write_io_error(JsonWriter* w, const IoFailure& f) {
    w->key("io_error");
    if (f.errnum == 0) {
        w->null();
        return;
    }
    w->begin_object();
    const char* name = ::strerrorname_np(f.errnum);
    w->field("errno", name != nullptr ? std::string(name) : std::to_string(f.errnum));
    w->field("op", f.op);
    w->field("message", f.message);
    w->field("failed_requests", f.failed);
    w->field("since", utc_time(f.since_unix_s));
    w->field("last", utc_time(f.last_unix_s));
    w->field("ongoing", f.ongoing(static_cast<int64_t>(std::time(nullptr))));
    w->end_object();
}

void CallerErrors::set(uint32_t caller, std::string reason) {
    if (caller == 0) {
        return;  // a writer outside the daemon's pid namespace: no name to file it under
    }
    std::erase_if(entries_, [caller](const auto& entry) { return entry.first == caller; });
    if (reason.empty()) {
        return;
    }
    if (entries_.size() >= kKept) {
        entries_.pop_front();
    }
    entries_.emplace_back(caller, std::move(reason));
}

void CallerErrors::write_json(JsonWriter* w) const {
    w->begin_object();
    for (const auto& [caller, reason] : entries_) {
        w->field(std::to_string(caller), reason);
    }
    w->end_object();
}

Task<std::string> ImageSet::info_json(std::shared_ptr<Export> e) {
    JsonWriter w;
    w.begin_object();
    w.field("name", e->name);
    // A copy: a snapshot may change the chain while the layers are described below.
    std::vector<Layer> layers = e->chain.layers;
    w.field("file", layers.empty() ? std::string() : layers.front().file);
    w.field("virtual_size", e->backend->size());
    w.field("open_count", e->backend->open_count());
    // The most requests that were in flight on NAME.raw at once since it was exported.
    w.field("max_requests_in_flight", e->backend->max_in_flight());
    if (transport_) {
        w.field("transport", transport_());
    }
    w.field("requests_in_flight", e->backend->in_flight());
    w.field("last_error", e->last_error);
    w.key("caller_errors");
    e->caller_errors.write_json(&w);
    w.key("failed");
    if (e->backend->fenced()) {
        w.value(e->backend->fence_reason());
    } else {
        w.null();
    }
    // The top layer's storage failed a flush: NAME.raw still reads, every write gets EIO
    // until the image is reopened (a rescan once NAME.raw is closed, or a remount).
    w.key("writes_refused");
    if (std::string why =
            layers.empty() ? std::string() : layers.front().node->layer_refusing_writes();
        !why.empty()) {
        w.value(why);
    } else {
        w.null();
    }
    w.key("chain_mismatch");
    if (!e->chain_mismatch.empty()) {
        w.value(e->chain_mismatch);
    } else {
        w.null();
    }
    write_io_error(&w, e->backend->io_failure());
    w.key("job");
    if (e->job != nullptr) {
        w.raw(e->job->status_json());
    } else {
        w.null();
    }
    w.key("layers");
    w.begin_array();
    for (const Layer& l : layers) {
        co_await write_layer_json(&w, &l);
    }
    w.end_array();
    w.end_object();
    co_return w.take();
}

}  // namespace imgfs
