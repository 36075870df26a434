#include "jobs/chain_edit.h"

#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include "core/log.h"
#include "core/transaction.h"
#include "drivers/qcow2/qcow2_node.h"

namespace imgfs {

namespace {

constexpr const char* kRemovingPrefix = ".imgfs-";
constexpr const char* kRemovingSuffix = ".removing";
constexpr const char* kCreatingSuffix = ".creating";

bool has_prefix_and_suffix(const std::string& file, const char* prefix, const char* suffix) {
    const size_t p = std::strlen(prefix);
    const size_t s = std::strlen(suffix);
    return file.size() > p + s && file.compare(0, p, prefix) == 0 &&
           file.compare(file.size() - s, s, suffix) == 0;
}

// Rewrites the backing name recorded in a qcow2 layer (making it writable for the purpose if it
// is a read-only backing layer, and read-only again afterwards).
Task<Status> rewrite_backing(ImageSet* images, Node* node, std::string name,
                             std::optional<std::string> format) {
    auto* q = dynamic_cast<Qcow2Node*>(node);
    if (q == nullptr) {
        co_return make_error(EINVAL, "{} is not qcow2: it has no backing file to rewrite",
                             node->name());
    }
    bool was_read_only = q->read_only();
    if (was_read_only) {
        CO_TRY(co_await q->set_writable(true));
        Transaction tx(images->env().graph);
        CO_TRY(tx.commit());
    }
    Status st = co_await q->set_backing_name(name, format);
    if (was_read_only) {
        Status back = co_await q->set_writable(false);
        Transaction tx(images->env().graph);
        (void)tx.commit();
        if (st) {
            st = std::move(back);
        }
    }
    co_return st;
}

}  // namespace

Status sync_dir(int dir_fd) {
    if (::fsync(dir_fd) != 0) {
        return make_error(errno, "fsync of the image directory");
    }
    return {};
}

Status sync_image_dir(ImageSet* images) {
    const auto& observer = images->options().sync_dir_observer;
    if (observer) {
        observer(images->dir_fd(), false);
    }
    TRY(sync_dir(images->dir_fd()));
    if (observer) {
        observer(images->dir_fd(), true);
    }
    return {};
}

std::string removing_name(const std::string& file) {
    return std::string(kRemovingPrefix) + file + kRemovingSuffix;
}

bool is_removing_name(const std::string& file) {
    return has_prefix_and_suffix(file, kRemovingPrefix, kRemovingSuffix);
}

std::string creating_name(const std::string& file) {
    return std::string(kRemovingPrefix) + file + kCreatingSuffix;
}

bool is_creating_name(const std::string& file) {
    return has_prefix_and_suffix(file, kRemovingPrefix, kCreatingSuffix);
}

Status remove_file(ImageSet* images, const std::string& file) {
    if (::unlinkat(images->dir_fd(), file.c_str(), 0) != 0 && errno != ENOENT) {
        return make_error(errno, "cannot remove {}", file);
    }
    return sync_image_dir(images);
}

Task<Status> splice_out(ImageSet* images, Export* e, size_t first, size_t last, bool drop_rest) {
    std::vector<Layer>& layers = e->chain.layers;
    const int dir = images->dir_fd();
    Logger* log = images->env().log;
    // 1. A hidden second name for every layer leaving the chain.
    for (size_t i = first; i <= last; ++i) {
        std::string hidden = removing_name(layers[i].file);
        ::unlinkat(dir, hidden.c_str(), 0);  // a leftover of an earlier crash
        if (::linkat(dir, layers[i].file.c_str(), dir, hidden.c_str(), 0) != 0) {
            co_return make_error(errno, "cannot link {} to {}", layers[i].file, hidden);
        }
    }
    CO_TRY(sync_image_dir(images));
    // 2. Headers above them use the hidden names (bottom-most first; same files, same content).
    for (size_t i = last + 1; i-- > first;) {
        CO_TRY(co_await rewrite_backing(images, layers[i - 1].node.get(),
                                        removing_name(layers[i].file), layers[i].format));
    }
    // 3. The visible names go.
    for (size_t i = first; i <= last; ++i) {
        if (::unlinkat(dir, layers[i].file.c_str(), 0) != 0 && errno != ENOENT) {
            co_return make_error(errno, "cannot remove {}", layers[i].file);
        }
    }
    CO_TRY(sync_image_dir(images));
    // 4. The referrer skips them.
    bool to_rest = !drop_rest && last + 1 < layers.size();
    std::string next = to_rest ? layers[last + 1].file : std::string();
    std::optional<std::string> fmt =
        to_rest ? std::optional<std::string>(layers[last + 1].format) : std::nullopt;
    CO_TRY(co_await rewrite_backing(images, layers[first - 1].node.get(), next, fmt));
    // 5. Nothing references the hidden names any more.
    for (size_t i = first; i <= last; ++i) {
        ::unlinkat(dir, removing_name(layers[i].file).c_str(), 0);
        log->info("{}: removed {} from the chain", e->name, layers[i].file);
    }
    co_return sync_image_dir(images);
}

}  // namespace imgfs
