// imgfs create / info / io: offline work on image files.
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <libgen.h>
#include <memory>
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

Status apply_create_option(const std::string& o, qcow2::CreateOptions* c) {
    size_t eq = o.find('=');
    std::string key = o.substr(0, eq);
    std::string v = eq == std::string::npos ? "" : o.substr(eq + 1);
    if (key == "cluster_size") {
        TRY_ASSIGN(uint64_t n, parse_size(v));
        c->cluster_size = static_cast<uint32_t>(n);
    } else if (key == "extended_l2") {
        TRY_ASSIGN(c->extended_l2, on_off(key, v));
    } else if (key == "lazy_refcounts") {
        TRY_ASSIGN(c->lazy_refcounts, on_off(key, v));
    } else if (key == "refcount_bits") {
        TRY_ASSIGN(uint64_t n, parse_size(v));
        c->refcount_bits = static_cast<uint32_t>(n);
    } else if (key == "compat") {
        if (v == "0.10" || v == "v2") {
            c->version = 2;
        } else if (v == "1.1" || v == "v3") {
            c->version = 3;
        } else {
            return make_error(EINVAL, "compat={}: expected 0.10 or 1.1", v);
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
Result<std::pair<std::string, uint64_t>> probe_image(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
        return make_error(errno, "cannot open backing file {}", path);
    }
    struct stat st {};
    ::fstat(fd.get(), &st);
    std::vector<uint8_t> head(std::min<uint64_t>(static_cast<uint64_t>(st.st_size), 2ULL << 20));
    if (::pread(fd.get(), head.data(), head.size(), 0) < 0) {
        return make_error(errno, "cannot read {}", path);
    }
    if (head.size() >= 4 && qcow2::load_be32(head.data()) == qcow2::kMagic) {
        TRY_ASSIGN(qcow2::Header h,
                   qcow2::parse_header(head, static_cast<uint64_t>(st.st_size), path));
        return std::make_pair(std::string("qcow2"), h.size);
    }
    return std::make_pair(std::string("raw"), static_cast<uint64_t>(st.st_size));
}

}  // namespace

int create(const Args& args) {
    qcow2::CreateOptions c;
    std::vector<std::string> positional;
    std::string backing_format;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--help" || a == "-h") {
            std::puts(
                "usage: imgfs create [-b BACKING [-F raw|qcow2]] [-o OPTS] FILE.qcow2 [SIZE]\n\n"
                "Creates a qcow2 v3 image. OPTS: cluster_size=, extended_l2=on|off,\n"
                "lazy_refcounts=on|off, refcount_bits=1..64, compat=0.10|1.1. SIZE may be\n"
                "left out with a backing file (its size is taken).");
            return 0;
        }
        if ((a == "-b" || a == "-F" || a == "-o" || a == "-f") && i + 1 >= args.size()) {
            return fail(a + " needs an argument");
        }
        if (a == "-b") {
            c.backing_file = args[++i];
        } else if (a == "-F") {
            backing_format = args[++i];
        } else if (a == "-f") {
            if (args[++i] != "qcow2") {
                return fail("only qcow2 images are created");
            }
        } else if (a == "-o") {
            std::string opts = args[++i];
            size_t pos = 0;
            while (pos <= opts.size()) {
                size_t comma = opts.find(',', pos);
                std::string o =
                    opts.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
                if (!o.empty()) {
                    if (Status st = apply_create_option(o, &c); !st) {
                        return fail(st.error().context);
                    }
                }
                if (comma == std::string::npos) {
                    break;
                }
                pos = comma + 1;
            }
        } else if (!a.empty() && a[0] == '-') {
            return fail("unknown option " + a);
        } else {
            positional.push_back(a);
        }
    }
    if (positional.empty() || positional.size() > 2) {
        return fail("usage: imgfs create [-b BACKING] [-o OPTS] FILE.qcow2 [SIZE]");
    }
    const std::string& file = positional[0];
    if (!c.backing_file.empty()) {
        std::string path =
            c.backing_file[0] == '/' ? c.backing_file : dir_of(file) + "/" + c.backing_file;
        auto probed = probe_image(path);
        if (!probed) {
            return fail(probed.error().message());
        }
        if (!backing_format.empty() && backing_format != probed->first) {
            if (backing_format != "raw") {
                return fail(fmt::format("{} is {}, not {}", path, probed->first, backing_format));
            }
        }
        c.backing_format = backing_format.empty() ? probed->first : backing_format;
        c.size = probed->second;
    } else if (!backing_format.empty()) {
        return fail("-F needs -b");
    }
    if (positional.size() == 2) {
        auto size = parse_size(positional[1]);
        if (!size) {
            return fail(size.error().context);
        }
        c.size = *size;
    } else if (c.backing_file.empty()) {
        return fail("a size is needed when there is no backing file");
    }
    if (Status st = qcow2::validate_create_options(c); !st) {
        return fail(st.error().context);
    }
    UniqueFd fd(::open(file.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644));
    if (!fd.valid()) {
        return fail(fmt::format("cannot create {}: {}", file, strerror(errno)));
    }
    if (Status st = qcow2::create_image_sync(fd.get(), c); !st) {
        ::unlink(file.c_str());
        return fail(fmt::format("{}: {}", file, st.error().message()));
    }
    std::printf("created %s: qcow2 v%u, %llu bytes, cluster size %u%s%s%s\n", file.c_str(),
                c.version, static_cast<unsigned long long>(c.size), c.cluster_size,
                c.extended_l2 ? ", extended L2" : "", c.lazy_refcounts ? ", lazy refcounts" : "",
                c.backing_file.empty()
                    ? ""
                    : fmt::format(", backing {} ({})", c.backing_file, *c.backing_format).c_str());
    return 0;
}

int info(const Args& args) {
    bool json = false;
    std::string file;
    for (const auto& a : args) {
        if (a == "--help" || a == "-h") {
            std::puts(
                "usage: imgfs info FILE [--json]\n\nShows the image's chain (top first): "
                "format, sizes, allocation, flags.");
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
    JsonWriter w;
    w.begin_object();
    w.field("file", file);
    w.field("virtual_size", s.chain.top()->size());
    // Guest-visible allocation of the whole chain.
    uint64_t data = 0;
    Node* top = s.chain.top().get();
    for (uint64_t off = 0; off < top->size();) {
        auto st = sync_wait(s.loop.get(), block_status_above(top, off, top->size() - off));
        if (!st) {
            return fail(st.error().message());
        }
        data += st->data ? st->bytes : 0;
        off += st->bytes;
    }
    w.field("data_bytes", data);
    w.key("layers");
    w.begin_array();
    for (Layer& l : s.chain.layers) {
        w.begin_object();
        w.field("file", l.file);
        w.field("format", l.format);
        w.field("virtual_size", l.node->size());
        auto alloc = sync_wait(s.loop.get(), l.node->allocated_bytes());
        if (alloc) {
            w.field("allocated_size", *alloc);
        }
        l.node->describe(&w);
        w.end_object();
    }
    w.end_array();
    w.end_object();
    (void)s.close();
    if (json) {
        std::printf("%s\n", w.str().c_str());
        return 0;
    }
    std::printf("image: %s\nvirtual size: %llu bytes\nallocated in the chain: %llu bytes\n",
                file.c_str(), static_cast<unsigned long long>(top->size()),
                static_cast<unsigned long long>(data));
    for (size_t i = 0; i < s.chain.layers.size(); ++i) {
        const Layer& l = s.chain.layers[i];
        std::printf("layer %zu: %s (%s%s)\n", i, l.file.c_str(), l.format.c_str(),
                    l.probed ? ", format from content" : "");
        if (auto* q = dynamic_cast<Qcow2Node*>(l.node.get())) {
            const qcow2::Header& h = q->header();
            std::printf(
                "  qcow2 v%u, cluster size %llu, refcount bits %u%s%s\n", h.version,
                static_cast<unsigned long long>(h.cluster_size()), 1U << h.refcount_order,
                h.extended_l2() ? ", extended L2" : "",
                (h.compatible & qcow2::kCompatLazyRefcounts) != 0 ? ", lazy refcounts" : "");
            if (!h.backing_file.empty()) {
                std::printf("  backing file: %s (%s)\n", h.backing_file.c_str(),
                            h.backing_format ? h.backing_format->c_str() : "format not recorded");
            }
        }
    }
    return 0;
}

}  // namespace imgfs::cli
