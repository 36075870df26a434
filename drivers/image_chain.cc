#include "drivers/image_chain.h"

#include <fcntl.h>
#include <unistd.h>
#include <utility>

#include <sys/stat.h>

#include "core/buffer.h"
#include "core/log.h"
#include "core/transaction.h"
#include "drivers/backing_probe.h"
#include "drivers/file.h"
#include "drivers/local_store.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "drivers/raw.h"

namespace imgfs {

namespace {

std::string dirname_of(const std::string& path) {
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// Lexically normalises a relative path; fails if it climbs above its root.
Result<std::string> normalise(const std::string& path) {
    std::vector<std::string> parts;
    size_t pos = 0;
    while (pos <= path.size()) {
        size_t slash = path.find('/', pos);
        std::string part =
            path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
        if (part == "..") {
            if (parts.empty()) {
                return make_error(EPERM, "'{}' escapes the image directory", path);
            }
            parts.pop_back();
        } else if (!part.empty() && part != ".") {
            parts.push_back(part);
        }
        if (slash == std::string::npos) {
            break;
        }
        pos = slash + 1;
    }
    std::string out;
    for (const auto& p : parts) {
        out += out.empty() ? "" : "/";
        out += p;
    }
    if (out.empty()) {
        return make_error(EINVAL, "'{}' names no file", path);
    }
    return out;
}

bool has_protocol_prefix(const std::string& name) {
    size_t colon = name.find(':');
    if (colon == std::string::npos || colon == 0) {
        return false;
    }
    size_t slash = name.find('/');
    if (slash != std::string::npos && slash < colon) {
        return false;  // "dir/a:b" is a file name
    }
    for (size_t i = 0; i < colon; ++i) {
        char c = name[i];
        if (!(isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.')) {
            return false;
        }
    }
    return true;
}

std::string layer_name(const std::string& file) {
    return file;
}

}  // namespace

Result<std::string> resolve_backing(const std::string& overlay, const std::string& backing,
                                    const std::string& dir_real, bool allow_external) {
    if (backing.rfind("json:", 0) == 0) {
        return make_error(EPERM, "{}: json: backing file names are refused", overlay);
    }
    if (has_protocol_prefix(backing)) {
        return make_error(EPERM, "{}: protocol backing file names ('{}') are refused", overlay,
                          backing);
    }
    if (!backing.empty() && backing[0] == '/' && dir_real.empty()) {
        // A store without a host path (a pool) can open nothing by a local path.
        return make_error(EPERM,
                          "{}: backing file '{}' is a host path, outside the image directory",
                          overlay, backing);
    }
    if (!backing.empty() && backing[0] == '/') {
        if (allow_external) {
            return backing;
        }
        std::string prefix = dir_real + "/";
        if (backing.rfind(prefix, 0) != 0) {
            return make_error(EPERM,
                              "{}: backing file '{}' is outside the image directory "
                              "(mount with allow_external_backing to allow it)",
                              overlay, backing);
        }
        return normalise(backing.substr(prefix.size()));
    }
    std::string dir = dirname_of(overlay);
    Result<std::string> r = normalise(dir.empty() ? backing : dir + "/" + backing);
    if (!r) {
        if (allow_external && !dir_real.empty()) {
            return dir_real + "/" + (dir.empty() ? backing : dir + "/" + backing);
        }
        return make_error(EPERM, "{}: backing file '{}' escapes the image directory", overlay,
                          backing);
    }
    return r;
}

bool is_external_layer(const std::string& file) {
    return (!file.empty() && file[0] == '/') || file.rfind("rbd:", 0) == 0;
}

Result<std::string> resolve_backing_in(const Store* store, const std::string& overlay,
                                       const std::string& backing, bool allow_external) {
    std::string own = store->own_name(backing);
    if (!own.empty()) {
        return own;
    }
    std::string external = store->external_name(backing);
    if (!external.empty()) {
        if (!allow_external) {
            return make_error(EPERM,
                              "{}: backing file '{}' is outside the image directory (mount "
                              "with allow_external_backing to allow it)",
                              overlay, backing);
        }
        return external;
    }
    return resolve_backing(overlay, backing, store->real_path(), allow_external);
}

namespace {

struct LayerSpec {
    std::string file;
    std::optional<std::string> recorded_format;  // from the overlay's header
};

// The errnos of an open for writing that an open for reading may not meet.
bool refuses_writing(int err) {
    return err == EACCES || err == EPERM || err == EROFS || err == ETXTBSY;
}

// Fault rules (mount option faults=FILE): does this one apply to the layer stored in `name`?
bool fault_applies(const ChainFault& f, const std::string& name, bool top) {
    return (top || f.all_layers) && (f.file.empty() || f.file == name);
}

FileOptions file_options(const ChainOptions& opts, const std::string& name, bool top) {
    FileOptions fo{opts.read_only, opts.direct};
    fo.exclusive = top && !opts.read_only;
    for (const ChainFault& f : opts.faults) {
        if (f.fdatasync && fault_applies(f, name, top)) {
            fo.fail_fdatasync_errno = f.rule.errnum;
            fo.fail_fdatasync_nth = f.rule.nth;
            fo.fail_fdatasync_once = f.rule.once;
        }
    }
    return fo;
}

// The file node itself, or a FaultNode above it holding the filter rules for this layer.
std::shared_ptr<Node> with_faults(NodeEnv env, Transaction* tx, std::shared_ptr<Node> file,
                                  const std::string& name, const ChainOptions& opts, bool top) {
    std::shared_ptr<FaultNode> fault;
    for (const ChainFault& f : opts.faults) {
        if (f.fdatasync || !fault_applies(f, name, top)) {
            continue;
        }
        if (fault == nullptr) {
            fault = FaultNode::open(env, layer_name(name) + " (fault)", tx, file);
        }
        fault->add_rule(f.rule);
    }
    if (fault == nullptr) {
        return file;
    }
    if (env.log != nullptr) {
        env.log->warn("{}: injecting faults by rule (debug option faults=)", name);
    }
    return fault;
}

Task<Result<Layer>> open_layer(NodeEnv env, Store* store, LayerSpec spec, ChainOptions opts,
                               bool top, ChainWalk* walk) {
    const bool host_path = !spec.file.empty() && spec.file[0] == '/';
    FileOptions fo = file_options(opts, spec.file, top);
    std::unique_ptr<StoreFile> opened;
    if (host_path) {
        CO_TRY_ASSIGN(opened, open_host_file(spec.file, opts.read_only, opts.direct));
    } else if (is_external_layer(spec.file)) {
        // Another pool's image: a shared base this mount never writes.
        fo.read_only = true;
        fo.exclusive = false;
        CO_TRY_ASSIGN(opened, co_await store->open_from_loop(spec.file, fo));
    } else {
        Result<std::unique_ptr<StoreFile>> rw = co_await store->open_from_loop(spec.file, fo);
        if (!rw && !top && !fo.read_only && refuses_writing(rw.error().errnum)) {
            // A backing layer is opened for writing only so that a commit can later write it
            // without reopening; one the daemon may not write (an immutable or read-only
            // golden base) is served read-only, as QEMU would, and a commit into it is
            // refused.
            if (env.log != nullptr) {
                env.log->info("{}: opened read-only ({}); a commit cannot write into it", spec.file,
                              rw.error().message());
            }
            fo.read_only = true;
            rw = co_await store->open_from_loop(spec.file, fo);
        }
        CO_TRY_ASSIGN(opened, std::move(rw));
    }
    const FileId id = opened->id();
    if (Status entered = walk->enter(spec.file, id); !entered) {
        opened->close_off_loop();  // (an RBD image's close is a round trip)
        co_return std::move(entered).error();
    }
    CO_TRY_ASSIGN(std::shared_ptr<Node> file,
                  opened->into_node(env, layer_name(spec.file) + " (file)", fo));
    // The probe's verdict on the header is not used here: a file recorded as raw is raw
    // whatever it holds, and a qcow2 layer's load() parses the same header with the same parser
    // and reports what is wrong with it.
    CO_TRY_ASSIGN(ImageProbe probe, co_await probe_node(file.get(), id, spec.file));
    const std::string& content = probe.format;
    Layer layer;
    layer.file = spec.file;
    layer.id = id;
    if (spec.recorded_format) {
        const std::string& f = *spec.recorded_format;
        if (f != "raw" && f != "qcow2") {
            co_return make_error(ENOTSUP, "'{}': backing format '{}' is not supported", spec.file,
                                 f);
        }
        if (f == "qcow2" && content != "qcow2") {
            co_return make_error(EINVAL, "'{}' is recorded as qcow2 but is not a qcow2 image",
                                 spec.file);
        }
        layer.format = f;
    } else if (!top && content == "qcow2") {
        co_return make_error(EPERM,
                             "'{}': backing file has no recorded format and looks like "
                             "qcow2; refusing to guess (record it with qemu-img rebase -u "
                             "-F qcow2)",
                             spec.file);
    } else {
        layer.format = content;
        layer.probed = true;
    }
    bool node_read_only = opts.read_only || !top;
    Transaction tx(env.graph);
    std::shared_ptr<Node> storage = with_faults(env, &tx, file, spec.file, opts, top);
    if (opts.wrap_file) {
        storage = opts.wrap_file(env, &tx, storage, spec.file);
    }
    if (layer.format == "qcow2") {
        qcow2::Options q = opts.qcow2;
        q.read_only = node_read_only;
        auto node = Qcow2Node::create(env, layer_name(spec.file), &tx, storage, q);
        CO_TRY(tx.commit());
        CO_TRY(co_await node->load());
        layer.node = node;
    } else {
        layer.node = RawNode::open(env, layer_name(spec.file), &tx, storage,
                                   RawOptions{layer.probed, node_read_only});
        CO_TRY(tx.commit());
    }
    co_return layer;
}

// Closes what open_chain opened before it failed. The open's error is what the caller reports;
// a close failing as well is only logged.
Task<void> close_after_failure(NodeEnv env, Chain* chain) {
    Status st = co_await close_chain(chain);
    if (!st && env.log != nullptr) {
        env.log->warn("closing a chain that failed to open: {}", st.error().message());
    }
}

}  // namespace

Task<Result<Chain>> open_chain(NodeEnv env, Store* store, std::string file, ChainOptions options,
                               LayerCache* cache) {
    Chain chain;
    ChainWalk walk(file, options.max_depth);
    LayerSpec spec{std::move(file), std::nullopt};
    for (uint32_t depth = 0;; ++depth) {
        if (Status st = walk.check_depth(); !st) {
            co_await close_after_failure(env, &chain);
            co_return st.error();
        }
        if (depth > 0 && cache != nullptr) {
            auto hit = cache->chains.find(spec.file);
            if (hit != cache->chains.end()) {
                // The shared layers count towards this chain's depth as if opened here.
                if (chain.layers.size() + hit->second.size() > options.max_depth) {
                    co_await close_after_failure(env, &chain);
                    co_return make_error(ELOOP, "backing chain of '{}' is deeper than {} layers",
                                         chain.layers.front().file, options.max_depth);
                }
                Transaction tx(env.graph);
                tx.attach(chain.layers.back().node.get(), hit->second.front().node,
                          ChildRole::kBacking, "backing");
                Status st = tx.commit();
                if (!st) {
                    co_await close_after_failure(env, &chain);
                    co_return st.error();
                }
                chain.layers.insert(chain.layers.end(), hit->second.begin(), hit->second.end());
                break;
            }
        }
        Result<Layer> opened = co_await open_layer(env, store, spec, options, depth == 0, &walk);
        if (!opened) {
            Error err = std::move(opened).error();
            if (!chain.layers.empty()) {
                // Name the image whose backing file failed, not only the backing file.
                err = std::move(err).wrap(chain.layers.front().file + ": backing file");
            }
            co_await close_after_failure(env, &chain);
            co_return err;
        }
        Layer layer = std::move(*opened);
        if (!chain.layers.empty()) {
            Transaction tx(env.graph);
            tx.attach(chain.layers.back().node.get(), layer.node, ChildRole::kBacking, "backing");
            Status st = tx.commit();
            if (!st) {
                chain.layers.push_back(std::move(layer));  // closed with the rest, top first
                co_await close_after_failure(env, &chain);
                co_return st.error();
            }
        }
        std::string next = layer.node->backing_file_name();
        std::optional<std::string> next_format = layer.node->backing_format();
        chain.layers.push_back(std::move(layer));
        if (next.empty()) {
            break;
        }
        Result<std::string> resolved = resolve_backing_in(store, chain.layers.back().file, next,
                                                          options.allow_external_backing);
        if (!resolved) {
            co_await close_after_failure(env, &chain);
            co_return std::move(resolved).error();
        }
        spec = LayerSpec{std::move(*resolved), next_format};
    }
    if (cache != nullptr) {
        for (size_t i = 1; i < chain.layers.size(); ++i) {
            cache->chains.emplace(
                chain.layers[i].file,
                std::vector<Layer>(chain.layers.begin() + static_cast<std::ptrdiff_t>(i),
                                   chain.layers.end()));
        }
    }
    co_return chain;
}

Task<Status> close_chain(Chain* chain) {
    Status first;
    for (Layer& l : chain->layers) {
        Status st = co_await l.node->close();
        if (!st && first.ok()) {
            first = std::move(st);
        }
    }
    co_return first;
}

Task<void> write_layer_json(JsonWriter* w, const Layer* layer) {
    w->begin_object();
    w->field("file", layer->file);
    w->field("format", layer->format);
    w->field("virtual_size", layer->node->size());
    Result<uint64_t> allocated = co_await layer->node->allocated_bytes();
    if (allocated) {
        w->field("allocated_size", *allocated);
    }
    layer->node->describe(w);
    if (std::string why = layer->node->layer_refusing_writes(); !why.empty()) {
        w->field("writes_refused", why);  // a commit into this layer fails until it reopens
    }
    w->end_object();
}

}  // namespace imgfs
