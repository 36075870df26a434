// imgfs create / info / io: offline work on image files.
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <libgen.h>
#include <memory>
#include <optional>
#include <unistd.h>

#include <sys/stat.h>

#include "core/backend.h"
#include "core/chain_status.h"
#include "core/event_loop.h"
#include "core/graph.h"
#include "core/json.h"
#include "core/transaction.h"
#include "drivers/image_chain.h"
#include "drivers/qcow2/create.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "fuse/cli.h"
#include "fuse/cli_offline.h"
#include "fuse/cli_store.h"

namespace imgfs::cli {

namespace {

Result<bool> on_off(const std::string& key, const std::string& v) {
    if (v == "on" || v == "true" || v == "yes") {
        return true;
    }
    if (v == "off" || v == "false" || v == "no") {
        return false;
    }
    return make_error(EINVAL, "{}={}: expected on or off", key, v);
}

Result<uint64_t> size_of_option(const std::string& key, const std::string& v) {
    Result<uint64_t> n = parse_size(v);
    if (!n) {
        return make_error(EINVAL, "{}={}: {}", key, v, n.error().context);
    }
    return n;
}

Status apply_create_option(const std::string& o, qcow2::CreateOptions* c) {
    size_t eq = o.find('=');
    std::string key = o.substr(0, eq);
    std::string v = eq == std::string::npos ? "" : o.substr(eq + 1);
    if (key == "cluster_size") {
        TRY_ASSIGN(uint64_t n, size_of_option(key, v));
        if (n > UINT32_MAX) {  // not cut to 32 bits into a size that happens to be valid
            return make_error(EINVAL, "cluster_size={}: at most 2M", v);
        }
        c->cluster_size = static_cast<uint32_t>(n);
    } else if (key == "extended_l2") {
        TRY_ASSIGN(c->extended_l2, on_off(key, v));
    } else if (key == "lazy_refcounts") {
        TRY_ASSIGN(c->lazy_refcounts, on_off(key, v));
    } else if (key == "refcount_bits") {
        TRY_ASSIGN(uint64_t n, size_of_option(key, v));
        if (n > 64) {
            return make_error(EINVAL, "refcount_bits={}: a power of two up to 64", v);
        }
        c->refcount_bits = static_cast<uint32_t>(n);
    } else if (key == "compat") {
        if (v == "0.10" || v == "v2") {
            c->version = 2;
        } else if (v == "1.1" || v == "v3") {
            c->version = 3;
        } else {
            return make_error(EINVAL, "compat={}: expected 0.10 or 1.1", v);
        }
    } else if (key == "compression_type") {
        if (v == "zlib") {
            c->compression_type = qcow2::CompressionType::kZlib;
        } else if (v == "zstd") {
            c->compression_type = qcow2::CompressionType::kZstd;
        } else {
            return make_error(EINVAL, "compression_type={}: expected zlib or zstd", v);
        }
    } else if (key == "preallocation") {
        if (v != "off") {
            return make_error(ENOTSUP, "preallocation={} is not supported (only off)", v);
        }
    } else {
        return make_error(EINVAL, "unknown option '{}'", key);
    }
    return {};
}

// Format and virtual size of an existing image (for a new image's backing).
// What a backing file is: its format, the size of the disk it holds, and its own size.
struct Probed {
    std::string format;
    uint64_t disk_size;
    uint64_t file_bytes;
};

Result<Probed> probe_image(const std::string& path) {
    // O_NONBLOCK: a FIFO named as the backing file must not hold the command up.
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd.valid()) {
        return make_error(errno, "cannot open backing file {}", path);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        return make_error(errno, "cannot stat backing file {}", path);
    }
    if (!S_ISREG(st.st_mode)) {
        return make_error(EINVAL, "backing file {} is not a regular file", path);
    }
    std::vector<uint8_t> head(std::min<uint64_t>(static_cast<uint64_t>(st.st_size), 2ULL << 20));
    if (::pread(fd.get(), head.data(), head.size(), 0) < 0) {
        return make_error(errno, "cannot read {}", path);
    }
    if (head.size() >= 4 && qcow2::load_be32(head.data()) == qcow2::kMagic) {
        TRY_ASSIGN(qcow2::Header h,
                   qcow2::parse_header(head, static_cast<uint64_t>(st.st_size), path));
        return Probed{"qcow2", h.size, static_cast<uint64_t>(st.st_size)};
    }
    return Probed{"raw", static_cast<uint64_t>(st.st_size), static_cast<uint64_t>(st.st_size)};
}

// The same through a store (a pool image).
Result<Probed> probe_store_image(StoreFile* f, const std::string& name) {
    TRY_ASSIGN(uint64_t bytes, f->size());
    AlignedBuffer head(std::min<uint64_t>(bytes, 2ULL << 20) / 4096 * 4096 + 4096);
    TRY_ASSIGN(size_t got, f->read_at(head.span(), 0));
    std::vector<uint8_t> bytes_read(head.data(), head.data() + got);
    if (got >= 4 && qcow2::load_be32(bytes_read.data()) == qcow2::kMagic) {
        TRY_ASSIGN(qcow2::Header h, qcow2::parse_header(bytes_read, bytes, name));
        return Probed{"qcow2", h.size, bytes};
    }
    return Probed{"raw", bytes, bytes};
}

}  // namespace

namespace {

// "-o a=1,b=2": each comma-separated option in turn.
Status apply_create_options(const std::string& opts, qcow2::CreateOptions* c) {
    size_t pos = 0;
    while (pos <= opts.size()) {
        size_t comma = opts.find(',', pos);
        std::string o =
            opts.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        if (!o.empty()) {
            TRY(apply_create_option(o, c));
        }
        if (comma == std::string::npos) {
            break;
        }
        pos = comma + 1;
    }
    return {};
}

// In a pool the backing image is one of the same pool and namespace, named either way, and is
// recorded in QEMU's form (rbd:POOL/IMAGE), which QEMU can open. Its format and size.
Result<Probed> probe_pool_backing(Store* pool, qcow2::CreateOptions* c) {
    std::string own = pool->own_name(c->backing_file);
    if (own.empty()) {
        own = c->backing_file;
    }
    if (own.find_first_of("/:@") != std::string::npos) {
        return make_error(EINVAL,
                          "backing image '{}' is not an image of {} (a pool image's "
                          "backing is in the same pool and namespace)",
                          c->backing_file, pool->display_name());
    }
    auto opened = pool->open(own, true, false);
    if (!opened) {
        return make_error(opened.error().errnum, "cannot open backing image {}: {}", own,
                          opened.error().message());
    }
    c->backing_file = pool->recorded_name(own);
    return probe_store_image(opened->get(), own);
}

// Takes the backing file's format (unless -F forces raw) and its size as the default size.
// `pool`: the store of a pool image, else null (a path).
Status resolve_backing(const std::string& file, const std::string& backing_format,
                       qcow2::CreateOptions* c, Store* pool) {
    std::string path =
        c->backing_file[0] == '/' ? c->backing_file : dir_of(file) + "/" + c->backing_file;
    auto probed = pool != nullptr ? probe_pool_backing(pool, c) : probe_image(path);
    if (!probed) {
        // The caller prints only the context: keep the system's reason in it.
        return make_error(probed.error().errnum, "{}", probed.error().message());
    }
    if (!backing_format.empty() && backing_format != "raw" && backing_format != "qcow2") {
        return make_error(EINVAL, "-F {}: a backing file is raw or qcow2", backing_format);
    }
    if (!backing_format.empty() && backing_format != probed->format && backing_format != "raw") {
        return make_error(EINVAL, "{} is {}, not {}", path, probed->format, backing_format);
    }
    c->backing_format = backing_format.empty() ? probed->format : backing_format;
    // Read as raw, a file is a disk of its own size, whatever its content says.
    c->size = c->backing_format == "raw" ? probed->file_bytes : probed->disk_size;
    return {};
}

struct CreateRequest {
    qcow2::CreateOptions options;
    std::string file;
    std::optional<std::string> size;
    std::string backing_format;
    bool help = false;
};

Result<CreateRequest> parse_create_args(const Args& args) {
    CreateRequest r;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--help" || a == "-h") {
            r.help = true;
            return r;
        }
        if ((a == "-b" || a == "-F" || a == "-o" || a == "-f") && i + 1 >= args.size()) {
            return make_error(EINVAL, "{} needs an argument", a);
        }
        if (a == "-b") {
            r.options.backing_file = args[++i];
            if (r.options.backing_file.empty()) {
                return make_error(EINVAL, "-b needs a file name, not an empty one");
            }
        } else if (a == "-F") {
            r.backing_format = args[++i];
        } else if (a == "-f") {
            if (args[++i] != "qcow2") {
                return make_error(EINVAL, "only qcow2 images are created");
            }
        } else if (a == "-o") {
            TRY(apply_create_options(args[++i], &r.options));
        } else if (a.size() > 1 && a[0] == '-' &&
                   (std::isdigit(static_cast<unsigned char>(a[1])) != 0 || a[1] == '.')) {
            return make_error(EINVAL, "invalid size '{}': a size is not negative", a);
        } else if (!a.empty() && a[0] == '-') {
            return make_error(EINVAL, "unknown option {}", a);
        } else {
            positional.push_back(a);
        }
    }
    if (positional.empty() || positional.size() > 2) {
        return make_error(EINVAL, "usage: imgfs create [-b BACKING] [-o OPTS] FILE.qcow2 [SIZE]");
    }
    r.file = positional[0];
    if (positional.size() == 2) {
        r.size = positional[1];
    }
    return r;
}

// The options, completed from the backing file and the size argument, and checked.
Status complete_create_options(CreateRequest* r, Store* pool) {
    qcow2::CreateOptions& c = r->options;
    if (!c.backing_file.empty()) {
        TRY(resolve_backing(r->file, r->backing_format, &c, pool));
    } else if (!r->backing_format.empty()) {
        return make_error(EINVAL, "-F needs -b");
    }
    if (r->size) {
        TRY_ASSIGN(c.size, parse_size(*r->size));
    } else if (c.backing_file.empty()) {
        return make_error(EINVAL, "a size is needed when there is no backing file");
    }
    if (c.size > UINT64_MAX - 511) {
        // Rounded up below, it would wrap to 0 and make an empty disk.
        return make_error(EINVAL, "{}: size {} is too large", r->file, c.size);
    }
    c.size = (c.size + 511) / 512 * 512;  // whole sectors, rounded up as qemu-img does
    // Formats are told by content, but a qcow2 named .raw misleads people and other tools
    // (libvirt, a later 'qemu-img -f raw') into treating its metadata as disk data.
    const std::string& f = r->file;
    if (f.size() >= 4 && f.compare(f.size() - 4, 4, ".raw") == 0) {
        return make_error(EINVAL,
                          "{}: imgfs create makes qcow2 images; give it a .qcow2 name (a .raw "
                          "name would pass its metadata off as disk data)",
                          f);
    }
    return qcow2::validate_create_options(c);
}

// A qcow2 file at a path (O_EXCL: never over an existing file).
Status create_file(CreateRequest* r) {
    TRY(complete_create_options(r, nullptr));
    const std::string& file = r->file;
    UniqueFd fd(::open(file.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644));
    if (!fd.valid()) {
        return make_error(errno, "cannot create {}: {}", file, strerror(errno));
    }
    if (Status st = qcow2::create_image_sync(fd.get(), r->options); !st) {
        ::unlink(file.c_str());
        return make_error(st.error().errnum, "{}: {}", file, st.error().message());
    }
    return {};
}

// Writes the image through an RBD node, then closes it (which also trims the room the image
// grew ahead).
Task<Status> write_pool_image(std::shared_ptr<Node> node, qcow2::CreateOptions options) {
    Status written = co_await qcow2::create_image(node.get(), std::move(options));
    Status closed = co_await node->close();
    co_return written ? closed : written;
}

// An RBD image rbd:POOL[/NS]/IMAGE (created exclusively: never over an existing image; removed
// again if it cannot be written).
Status create_in_pool(CreateRequest* r) {
    TRY_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::create());
    StderrLogger log;
    Graph graph;
    Result<ImageLocation> located = locate_image(r->file, loop.get());
    if (!located) {
        return make_error(located.error().errnum, "{}", located.error().message());
    }
    ImageLocation& where = *located;
    if (Status st = complete_create_options(r, where.store.get()); !st) {
        return make_error(st.error().errnum, "{}", st.error().context);
    }
    auto made = where.store->create_exclusive(where.name);
    if (!made) {
        return make_error(made.error().errnum, "cannot create {}: {}", r->file,
                          made.error().message());
    }
    Status written;
    {
        auto node =
            (*made)->into_node(NodeEnv{loop.get(), &log, &graph}, where.name, FileOptions{});
        written = node ? sync_wait(loop.get(), write_pool_image(std::move(*node), r->options))
                       : Status(node.error());
    }
    made->reset();
    if (!written) {
        (void)where.store->remove(where.name);
        return make_error(written.error().errnum, "{}: {}", r->file, written.error().message());
    }
    return {};
}

}  // namespace

int create(const Args& args) {
    // Errors of the arguments are printed without strerror: the context says it all.
    auto req = parse_create_args(args);
    if (!req) {
        return fail(req.error().context);
    }
    if (req->help) {
        std::puts(
            "usage: imgfs create [-f qcow2] [-b BACKING [-F raw|qcow2]] [-o OPTS] FILE.qcow2 "
            "[SIZE]\n"
            "\n"
            "Creates a qcow2 image (v3; v2 with -o compat=0.10); -f takes only qcow2. FILE is a\n"
            "path, or rbd:POOL[/NAMESPACE]/IMAGE for an RBD image (Ceph's configuration from\n"
            "$CEPH_CONF, else /etc/ceph/ceph.conf; the client from $CEPH_ID, else admin), whose\n"
            "BACKING is an image of the same pool and namespace, recorded as\n"
            "rbd:POOL[/NAMESPACE]/IMAGE. OPTS: cluster_size=, extended_l2=on|off,\n"
            "lazy_refcounts=on|off, refcount_bits=1..64, compat=0.10|1.1,\n"
            "compression_type=zlib|zstd, preallocation=off. SIZE takes qemu-img's syntax (1.5G,\n"
            "512M, 10240k) and is rounded up to whole 512-byte sectors; it may be left out with\n"
            "a backing file (its size is taken). qemu-img create's other options (-u, -q, -o\n"
            "backing_file=...) are refused: give the backing file with -b and -F.");
        return 0;
    }
    Status made = names_pool_image(req->file) ? create_in_pool(&*req) : create_file(&*req);
    if (!made) {
        return fail(made.error().context);
    }
    const qcow2::CreateOptions& c = req->options;
    const std::string& file = req->file;
    std::printf("created %s: qcow2 v%u, %llu bytes, cluster size %u%s%s%s\n", file.c_str(),
                c.version, static_cast<unsigned long long>(c.size), c.cluster_size,
                c.extended_l2 ? ", extended L2" : "", c.lazy_refcounts ? ", lazy refcounts" : "",
                c.backing_file.empty()
                    ? ""
                    : fmt::format(", backing {} ({})", c.backing_file, *c.backing_format).c_str());
    return 0;
}

namespace {

// Guest-visible allocation of the whole chain.
Result<uint64_t> chain_data_bytes(Offline* s) {
    uint64_t data = 0;
    Node* top = s->chain.top().get();
    for (uint64_t off = 0; off < top->size();) {
        TRY_ASSIGN(ChainStatus st,
                   sync_wait(s->loop.get(), block_status_above(top, off, top->size() - off)));
        data += st.data ? st.bytes : 0;
        off += st.bytes;
    }
    return data;
}

std::string info_json(Offline* s, const std::string& file, uint64_t data_bytes) {
    JsonWriter w;
    w.begin_object();
    w.field("file", file);
    w.field("virtual_size", s->chain.top()->size());
    w.field("data_bytes", data_bytes);
    w.key("layers");
    w.begin_array();
    for (const Layer& l : s->chain.layers) {
        sync_wait(s->loop.get(), write_layer_json(&w, &l));
    }
    w.end_array();
    w.end_object();
    return w.str();
}

void print_info_text(Offline* s, const std::string& file, uint64_t data_bytes) {
    std::printf("image: %s\nvirtual size: %llu bytes\nallocated in the chain: %llu bytes\n",
                file.c_str(), static_cast<unsigned long long>(s->chain.top()->size()),
                static_cast<unsigned long long>(data_bytes));
    for (size_t i = 0; i < s->chain.layers.size(); ++i) {
        const Layer& l = s->chain.layers[i];
        std::printf("layer %zu: %s (%s%s)\n", i, l.file.c_str(), l.format.c_str(),
                    l.probed ? ", format from content" : "");
        Result<uint64_t> allocated = sync_wait(s->loop.get(), l.node->allocated_bytes());
        std::printf("  virtual size %llu bytes, %s\n",
                    static_cast<unsigned long long>(l.node->size()),
                    allocated ? fmt::format("{} bytes on disk", *allocated).c_str()
                              : "size on disk unknown");
        auto* q = dynamic_cast<Qcow2Node*>(l.node.get());
        if (q == nullptr) {
            continue;
        }
        const qcow2::Header& h = q->header();
        std::printf("  qcow2 v%u, cluster size %llu, refcount bits %u, %s compression%s%s\n",
                    h.version, static_cast<unsigned long long>(h.cluster_size()),
                    1U << h.refcount_order,
                    h.compression_type == qcow2::CompressionType::kZstd ? "zstd" : "zlib",
                    h.extended_l2() ? ", extended L2" : "",
                    (h.compatible & qcow2::kCompatLazyRefcounts) != 0 ? ", lazy refcounts" : "");
        if (h.nb_snapshots > 0) {
            std::printf("  internal snapshots: %u\n", h.nb_snapshots);
        }
        if ((h.incompatible & (qcow2::kIncompatDirty | qcow2::kIncompatCorrupt)) != 0) {
            std::printf("  flags:%s%s\n",
                        (h.incompatible & qcow2::kIncompatDirty) != 0 ? " DIRTY" : "",
                        (h.incompatible & qcow2::kIncompatCorrupt) != 0 ? " CORRUPT" : "");
        }
        if (!h.backing_file.empty()) {
            std::printf("  backing file: %s (%s)\n", h.backing_file.c_str(),
                        h.backing_format ? h.backing_format->c_str() : "format not recorded");
        }
    }
}

}  // namespace

int info(const Args& args) {
    bool json = false;
    std::string file;
    for (const auto& a : args) {
        if (a == "--help" || a == "-h") {
            std::puts(
                "usage: imgfs info FILE [--json]\n\nShows the image's chain (top first): "
                "format, sizes, allocation, flags.\nFILE is a path or rbd:POOL[/NAMESPACE]/IMAGE "
                "(see imgfs create --help).");
            return 0;
        }
        if (a == "--json") {
            json = true;
        } else if (file.empty()) {
            file = a;
        } else {
            return fail("usage: imgfs info FILE [--json]");
        }
    }
    if (file.empty()) {
        return fail("usage: imgfs info FILE [--json]");
    }
    Offline s;
    if (Status st = s.open(file, true); !st) {
        return fail(st.error().message());
    }
    auto data = chain_data_bytes(&s);
    if (!data) {
        return fail(data.error().message());
    }
    if (json) {
        std::printf("%s\n", info_json(&s, file, *data).c_str());
    } else {
        print_info_text(&s, file, *data);
    }
    if (Status st = s.close(); !st) {
        // What was printed stands (the image was opened read-only); the caller still learns.
        std::fprintf(stderr, "imgfs: warning: closing %s: %s\n", file.c_str(),
                     st.error().message().c_str());
    }
    return 0;
}

}  // namespace imgfs::cli
