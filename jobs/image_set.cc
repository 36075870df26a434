#include "jobs/image_set.h"

#include <algorithm>
#include <dirent.h>
#include <fcntl.h>
#include <map>
#include <set>
#include <unistd.h>

#include <sys/stat.h>

#include "core/event_loop.h"
#include "core/log.h"
#include "core/transaction.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "jobs/chain_edit.h"
#include "jobs/job.h"

namespace imgfs {

namespace {

constexpr const char* kExtensions[] = {".qcow2", ".qcow", ".img", ".raw"};

bool ends_with(const std::string& s, const char* suffix) {
    size_t n = std::strlen(suffix);
    return s.size() > n && s.compare(s.size() - n, n, suffix) == 0;
}

// The backing file name recorded in a qcow2 header, or "" (also for raw images).
Result<std::string> recorded_backing(int fd, const std::string& file) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return make_error(errno, "stat {}", file);
    }
    std::vector<uint8_t> buf(std::min<uint64_t>(static_cast<uint64_t>(st.st_size), 2ULL << 20));
    ssize_t n = ::pread(fd, buf.data(), buf.size(), 0);
    if (n < 0) {
        return make_error(errno, "reading {}", file);
    }
    buf.resize(static_cast<size_t>(n));
    if (buf.size() < 4 || qcow2::load_be32(buf.data()) != qcow2::kMagic) {
        return std::string();
    }
    TRY_ASSIGN(qcow2::Header h, qcow2::parse_header(buf, static_cast<uint64_t>(st.st_size), file));
    return h.backing_file;
}

}  // namespace

struct ImageSet::Candidate {
    std::string file;
    dev_t dev = 0;
    ino_t ino = 0;
    bool broken = false;
};

std::string export_name_of(const std::string& file) {
    std::string base = file;
    for (const char* ext : kExtensions) {
        if (ends_with(base, ext)) {
            base.resize(base.size() - std::strlen(ext));
            break;
        }
    }
    size_t at = base.find('@');
    return at == std::string::npos ? base : base.substr(0, at);
}

bool is_image_file_name(const std::string& file) {
    if (file.empty() || file[0] == '.') {
        return false;
    }
    return std::any_of(std::begin(kExtensions), std::end(kExtensions),
                       [&file](const char* e) { return ends_with(file, e); });
}

ImageSet::ImageSet(NodeEnv env, UniqueFd dir_fd, std::string dir_path, ImageSetOptions options)
    : env_(env), dir_fd_(std::move(dir_fd)), dir_path_(std::move(dir_path)), options_(options) {
    char real[PATH_MAX];
    if (::realpath(fmt::format("/proc/self/fd/{}", dir_fd_.get()).c_str(), real) != nullptr) {
        dir_real_ = real;
    }
}

ImageSet::~ImageSet() = default;

Export* ImageSet::find(std::string_view name) const {
    for (const auto& e : exports_) {
        if (e->name == name) {
            return e.get();
        }
    }
    return nullptr;
}

Export* ImageSet::find_id(uint64_t id) const {
    for (const auto& e : exports_) {
        if (e->id == id) {
            return e.get();
        }
    }
    return nullptr;
}

std::vector<Export*> ImageSet::users_of(const Node* node, const Export* except) const {
    std::vector<Export*> out;
    for (const auto& e : exports_) {
        if (e.get() == except) {
            continue;
        }
        for (const Layer& l : e->chain.layers) {
            if (l.node.get() == node) {
                out.push_back(e.get());
                break;
            }
        }
    }
    return out;
}

Result<std::vector<ImageSet::Candidate>> ImageSet::list_candidates() {
    int dup = ::dup(dir_fd_.get());
    if (dup < 0) {
        return make_error(errno, "{}", dir_path_);
    }
    DIR* d = ::fdopendir(dup);
    if (d == nullptr) {
        int err = errno;
        ::close(dup);
        return make_error(err, "cannot read {}", dir_path_);
    }
    ::rewinddir(d);
    std::vector<Candidate> out;
    hidden_.clear();
    creating_.clear();
    while (dirent* ent = ::readdir(d)) {
        std::string name = ent->d_name;
        struct stat st {};
        if (is_removing_name(name)) {
            hidden_.push_back(name);
            continue;
        }
        if (is_creating_name(name)) {
            creating_.push_back(name);
            continue;
        }
        if (!is_image_file_name(name)) {
            continue;
        }
        if (::fstatat(dir_fd_.get(), name.c_str(), &st, 0) != 0 || !S_ISREG(st.st_mode)) {
            continue;  // subfolders, dangling links and devices are not images here
        }
        out.push_back(Candidate{name, st.st_dev, st.st_ino, false});
    }
    ::closedir(d);
    std::sort(out.begin(), out.end(),
              [](const Candidate& a, const Candidate& b) { return a.file < b.file; });
    return out;
}

// Follows the chain below `file` and records every layer's inode. A layer may be referenced
// under another name (a hard link made while a chain is being edited), so inodes, not names,
// decide what is a layer.
Status ImageSet::collect_layers(const std::string& file,
                                std::set<std::pair<dev_t, ino_t>>* layers) {
    std::string current = file;
    std::string path = file;                      // the walk so far, for the loop message
    std::set<std::pair<dev_t, ino_t>> this_walk;  // a loop returns to one of these
    for (int depth = 0; depth < 64; ++depth) {
        Result<UniqueFd> fd = open_beneath(dir_fd_.get(), current, true, false);
        if (!fd) {
            return depth == 0 ? std::move(fd).error()
                              : Status{};  // a missing backing file: the top reports it
        }
        struct stat st {};
        if (::fstat(fd->get(), &st) != 0) {
            return make_error(errno, "{}: stat", current);
        }
        if (!this_walk.insert({st.st_dev, st.st_ino}).second) {
            return make_error(ELOOP, "{}: the backing chain loops ({})", file, path);
        }
        if (depth > 0 && !layers->insert({st.st_dev, st.st_ino}).second) {
            return {};  // a layer shared with a chain already walked
        }
        TRY_ASSIGN(std::string backing, recorded_backing(fd->get(), current));
        if (backing.empty()) {
            return {};
        }
        Result<std::string> next =
            resolve_backing(current, backing, dir_real_, options_.allow_external_backing);
        if (!next || (!next->empty() && (*next)[0] == '/')) {
            return {};  // outside the directory: not one of our layers
        }
        current = *next;
        path += " -> " + current;
    }
    return {};
}

void ImageSet::remove_leftovers(const std::set<std::pair<dev_t, ino_t>>& layers) {
    // Hidden names left by a chain edit that a crash interrupted, used by no chain: garbage.
    for (const std::string& h : hidden_) {
        struct stat st {};
        if (::fstatat(dir_fd_.get(), h.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            layers.count({st.st_dev, st.st_ino}) == 0) {
            ::unlinkat(dir_fd_.get(), h.c_str(), 0);
            env_.log->info("{}: removed {}, left over from an interrupted chain edit", dir_path_,
                           h);
        }
    }
    // A snapshot overlay a crash caught before its rename: never part of any chain.
    if (creating_in_flight_ != 0) {
        return;
    }
    for (const std::string& c : creating_) {
        if (::unlinkat(dir_fd_.get(), c.c_str(), 0) == 0) {
            env_.log->info("{}: removed {}, left over from an interrupted snapshot", dir_path_, c);
        }
    }
}

Task<Status> ImageSet::scan() {
    problems_.clear();
    CO_TRY_ASSIGN(std::vector<Candidate> files, list_candidates());
    std::set<std::pair<dev_t, ino_t>> layers;
    for (Candidate& c : files) {
        if (Status st = collect_layers(c.file, &layers); !st) {
            c.broken = true;
            problems_.push_back(st.error().message());
        }
    }
    if (!options_.read_only) {
        remove_leftovers(layers);
    }
    std::map<std::string, std::vector<std::string>> roots_by_name;
    for (const Candidate& c : files) {
        if (!c.broken && layers.count({c.dev, c.ino}) == 0) {
            roots_by_name[export_name_of(c.file)].push_back(c.file);
        }
    }
    std::map<std::string, std::string> wanted;  // name -> root file
    for (auto& [name, roots] : roots_by_name) {
        if (roots.size() > 1) {
            std::string list;
            for (const auto& r : roots) {
                list += list.empty() ? r : ", " + r;
            }
            problems_.push_back(
                fmt::format("export name '{}' is wanted by {}; none of them is "
                            "exported",
                            name, list));
            continue;
        }
        wanted[name] = roots.front();
    }
    // Drop exports whose root went away or changed, unless they are in use.
    for (size_t i = 0; i < exports_.size();) {
        Export* e = exports_[i].get();
        auto it = wanted.find(e->name);
        bool keep = it != wanted.end() && it->second == e->chain.layers.front().file;
        bool job_running = e->job != nullptr && !e->job->finished();
        if (!keep && (e->backend->open_count() > 0 || job_running)) {
            problems_.push_back(fmt::format("{}.raw is {}; keeping it although {} changed", e->name,
                                            job_running ? "busy with a job" : "open",
                                            e->chain.layers.front().file));
            keep = true;
        }
        if (keep) {
            wanted.erase(e->name);
            ++i;
            continue;
        }
        co_await remove_export(e);
    }
    for (const auto& [name, root] : wanted) {
        Status st = co_await open_export(root, name);
        if (!st) {
            problems_.push_back(st.error().message());
        }
    }
    for (const std::string& p : problems_) {
        env_.log->warn("{}: {}", dir_path_, p);
    }
    co_return Status{};
}

Task<Status> ImageSet::open_export(std::string root, std::string name) {
    ChainOptions co;
    co.read_only = options_.read_only;
    co.allow_external_backing = options_.allow_external_backing;
    co.direct = options_.direct;
    co.qcow2 = options_.qcow2;
    co.faults = options_.faults;
    co.wrap_file = options_.wrap_file;
    CO_TRY_ASSIGN(Chain chain, co_await open_chain(env_, dir_fd_.get(), root, co, &cache_));
    auto e = std::make_unique<Export>();
    e->id = next_id_++;
    e->name = name;
    e->chain = std::move(chain);
    e->backend = std::make_unique<BlockBackend>(env_.loop, name);
    Perms perm = perm::kConsistentRead;
    if (!options_.read_only) {
        perm |= perm::kWrite | perm::kResize;
    }
    Transaction tx(env_.graph);
    e->backend->attach(&tx, e->chain.top(), perm, perm::kConsistentRead | perm::kWriteUnchanged);
    Status st = tx.commit();
    if (!st) {
        (void)co_await e->chain.top()->close();
        forget_unused_layers();
        co_return make_error(st.error().errnum, "{}: {}", root, st.error().message());
    }
    env_.log->info("exporting {}.raw ({} layer{}, top {})", name, e->chain.layers.size(),
                   e->chain.layers.size() == 1 ? "" : "s", root);
    exports_.push_back(std::move(e));
    co_return Status{};
}

Task<void> ImageSet::remove_export(Export* e) {
    env_.log->info("no longer exporting {}.raw", e->name);
    {
        Transaction tx(env_.graph);
        tx.detach(e->backend->root());
        (void)tx.commit();
    }
    // Close the layers nothing else uses any more (top first).
    for (Layer& l : e->chain.layers) {
        if (l.node->parents().empty() || users_of(l.node.get(), e).empty()) {
            Status st = co_await l.node->close();
            if (!st) {
                env_.log->error("closing {}: {}", l.file, st.error().message());
            }
        }
    }
    auto it =
        std::find_if(exports_.begin(), exports_.end(), [e](const auto& p) { return p.get() == e; });
    exports_.erase(it);
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
    Status first;
    while (!exports_.empty()) {
        Export* e = exports_.back().get();
        co_await remove_export(e);
    }
    co_return first;
}

Task<std::string> ImageSet::info_json(Export* e) {
    JsonWriter w;
    w.begin_object();
    w.field("name", e->name);
    w.field("file", e->chain.layers.front().file);
    w.field("virtual_size", e->backend->size());
    w.field("open_count", e->backend->open_count());
    // The most requests that were in flight on NAME.raw at once since it was exported.
    w.field("max_requests_in_flight", e->backend->max_in_flight());
    w.field("requests_in_flight", e->backend->in_flight());
    w.field("last_error", e->last_error);
    w.key("job");
    if (e->job != nullptr) {
        w.raw(e->job->status_json());
    } else {
        w.null();
    }
    w.key("layers");
    w.begin_array();
    for (const Layer& l : e->chain.layers) {
        co_await write_layer_json(&w, &l);
    }
    w.end_array();
    w.end_object();
    co_return w.take();
}

}  // namespace imgfs
