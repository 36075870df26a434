#include "jobs/chain_edit.h"

#include <cstring>

#include "core/event_loop.h"
#include "core/log.h"
#include "core/transaction.h"

namespace imgfs {

Task<Status> back_to_read_only(ImageSet* images, Node* node) {
    Status back = co_await node->set_writable(false);
    Transaction tx(images->env().graph);
    if (Status refreshed = tx.commit(); !refreshed) {
        images->env().log->warn(
            "{}: permissions not refreshed after rewriting its backing "
            "name: {}",
            node->name(), refreshed.error().message());
    }
    co_return back;
}

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

// Rewrites the backing name recorded in a layer (making it writable for the purpose if it is a
// read-only backing layer, and read-only again afterwards, whatever happens in between).
Task<Status> rewrite_backing(ImageSet* images, Node* node, std::string name,
                             std::optional<std::string> format) {
    if (!node->caps().backing_name) {
        co_return make_error(EINVAL, "{} is not qcow2: it has no backing file to rewrite",
                             node->name());
    }
    bool was_read_only = node->read_only();
    if (was_read_only) {
        CO_TRY(co_await node->set_writable(true));
        Transaction tx(images->env().graph);
        if (Status granted = tx.commit(); !granted) {
            // Another user of the layer does not let it be written: it stays read-only.
            Status back = co_await back_to_read_only(images, node);
            if (!back) {
                images->env().log->warn("{}: {}", node->name(), back.error().message());
            }
            co_return granted;
        }
    }
    // The header records the name the way the store's other users open it: "rbd:POOL/IMAGE"
    // in a pool (QEMU looks for a bare name as a local file), the bare name in a directory.
    std::string recorded = name.empty() ? name : images->store()->recorded_name(name);
    Status st = co_await node->set_backing_name(recorded, format);
    if (was_read_only) {
        Status back = co_await back_to_read_only(images, node);
        if (st) {
            st = std::move(back);
        }
    }
    co_return st;
}

Status link_hidden(Store* store, const std::string& file) {
    std::string hidden = removing_name(file);
    // A leftover of an earlier crash; if it cannot go, add_name below fails with EEXIST.
    (void)store->remove(hidden);
    return store->add_name(file, hidden);
}

// Step 1: a hidden name for each file, all or none.
Status link_all_hidden(Store* store, const std::vector<std::string>& files) {
    for (size_t i = 0; i < files.size(); ++i) {
        if (Status st = link_hidden(store, files[i]); !st) {
            std::vector<std::string> made;
            for (size_t j = 0; j < i; ++j) {
                made.push_back(removing_name(files[j]));
            }
            // This runs off the loop, where nothing logs: the link's error also carries the
            // undo's. A hidden name no header uses is harmless until a scan removes it.
            if (Status undone = unlink_names(store, made); !undone) {
                Error err = std::move(st).error();
                err.context += fmt::format(" (undoing: {}; the next scan removes what is left)",
                                           undone.error().message());
                return err;
            }
            return st;
        }
    }
    return {};
}

// Steps 1 and 2 undone: the headers that were pointed at hidden names (layers[i - 1] for i in
// `repointed`) name the visible files again, and the hidden names go. Best effort: if a header
// cannot be put back, its hidden name stays (the chain on disk is still whole through it).
Task<void> undo_hidden(ImageSet* images, std::shared_ptr<Export> e, size_t first, size_t last,
                       std::vector<size_t> repointed) {
    std::vector<Layer>& layers = e->chain.layers;
    std::vector<std::string> hidden;
    for (size_t i = first; i <= last; ++i) {
        bool still_named = false;
        for (size_t r : repointed) {
            if (r == i) {
                Status st = co_await rewrite_backing(images, layers[i - 1].node.get(),
                                                     layers[i].file, layers[i].format);
                still_named = !st;
            }
        }
        if (!still_named) {
            hidden.push_back(removing_name(layers[i].file));
        }
    }
    Store* store = images->store();
    std::function<Status()> unlink = [store, hidden] { return unlink_names(store, hidden); };
    // The edit's own error is what the caller reports; these only leave hidden names, which no
    // header uses, for the next scan to remove.
    Logger* log = images->env().log;
    if (Status st = co_await dir_call(images, std::move(unlink)); !st) {
        log->warn("{}: undoing a chain edit: {}", e->name, st.error().message());
    }
    if (Status st = co_await sync_image_dir(images); !st) {
        log->warn("{}: undoing a chain edit: {}", e->name, st.error().message());
    }
}

// Undoes step 0 of splice_out: the lowest layer leaving the chain names the layer below it
// again, as the served chain still has it.
Task<void> undo_cut(ImageSet* images, std::shared_ptr<Export> e, size_t last) {
    const std::string below = e->chain.layers[last + 1].file;
    const std::string format = e->chain.layers[last + 1].format;
    Status st = co_await rewrite_backing(images, e->chain.layers[last].node.get(), below, format);
    if (!st) {
        images->env().log->warn(
            "{}: undoing a chain edit: {} (the chain on disk differs from "
            "the one served until a remount)",
            e->name, st.error().message());
    }
}

}  // namespace

Task<Status> sync_image_dir(ImageSet* images) {
    const auto& observer = images->options().sync_dir_observer;
    if (observer) {
        observer(false);
    }
    Store* store = images->store();
    std::function<Status()> sync = [store] { return store->sync(); };
    CO_TRY(co_await dir_call(images, std::move(sync)));
    if (observer) {
        observer(true);
    }
    co_return Status{};
}

Task<Status> dir_call(ImageSet* images, std::function<Status()> call) {
    co_return co_await images->offloader()->run<Status>(std::move(call));
}

Status unlink_names(Store* store, const std::vector<std::string>& names) {
    Status first;
    for (const std::string& n : names) {
        Status st = store->remove(n);
        if (!st && st.error().errnum != ENOENT && first) {
            first = std::move(st);
        }
    }
    return first;
}

std::string removing_name(const std::string& file) {
    return std::string(kRemovingPrefix) + file + kRemovingSuffix;
}

bool is_removing_name(const std::string& file) {
    return has_prefix_and_suffix(file, kRemovingPrefix, kRemovingSuffix);
}

std::string visible_name_of(const std::string& hidden) {
    return hidden.substr(
        std::strlen(kRemovingPrefix),
        hidden.size() - std::strlen(kRemovingPrefix) - std::strlen(kRemovingSuffix));
}

std::string creating_name(const std::string& file) {
    return std::string(kRemovingPrefix) + file + kCreatingSuffix;
}

bool is_creating_name(const std::string& file) {
    return has_prefix_and_suffix(file, kRemovingPrefix, kCreatingSuffix);
}

namespace {

// The visible name of a hidden one, removed if it is still the same file (a crash before step 3).
Status unlink_visible_twins(Store* store, const std::vector<std::string>& hidden) {
    for (const std::string& h : hidden) {
        std::string visible = visible_name_of(h);
        Result<FileId> a = store->id_of(h, true);
        Result<FileId> b = store->id_of(visible, true);
        if (a && b && *a == *b) {
            TRY(store->remove(visible));
        }
    }
    return {};
}

}  // namespace

Task<Status> finish_interrupted_edit(ImageSet* images, std::string referrer) {
    ImageSet::EditGuard editing(images);
    ChainOptions co;
    co.allow_external_backing = images->options().allow_external_backing;
    co.qcow2 = images->options().qcow2;
    CO_TRY_ASSIGN(Chain chain, co_await open_chain(images->env(), images->store(), referrer, co));
    size_t below = 1;
    std::vector<std::string> hidden;
    while (below < chain.layers.size() && is_removing_name(chain.layers[below].file)) {
        hidden.push_back(chain.layers[below].file);
        ++below;
    }
    Store* store = images->store();
    std::function<Status()> drop_visible = [store, hidden] {
        return unlink_visible_twins(store, hidden);
    };
    Status st = co_await dir_call(images, std::move(drop_visible));
    if (st) {
        st = co_await sync_image_dir(images);
    }
    // Named, not conditionals inside the co_await (GCC 12 destroys those temporaries twice).
    std::string next;
    std::optional<std::string> format;
    if (below < chain.layers.size()) {
        next = chain.layers[below].file;
        format = chain.layers[below].format;
    }
    if (st) {
        st = co_await rewrite_backing(images, chain.top().get(), next, format);
    }
    Status closed = co_await close_chain(&chain);
    CO_TRY(std::move(st));
    CO_TRY(std::move(closed));
    std::function<Status()> drop_hidden = [store, hidden] { return unlink_names(store, hidden); };
    CO_TRY(co_await dir_call(images, std::move(drop_hidden)));
    images->env().log->info("{}: finished a chain edit a crash interrupted: it now uses {}",
                            referrer, next.empty() ? "no backing file" : next);
    co_return co_await sync_image_dir(images);
}

namespace {

// Removes `file`. Returns "" once it is gone, or why it could only be hidden (see below).
Result<std::string> remove_or_hide(Store* store, const std::string& file) {
    const std::string hidden = removing_name(file);
    std::string target = file;
    if (!store->caps().second_names) {
        // Removing an RBD image takes several steps, and a crash between them can leave a
        // name whose header is gone: nothing opens or checks it. Under the hidden name, what a
        // crash leaves is a leftover the next scan removes. (A directory's unlink is one step.)
        (void)store->remove(hidden);
        if (Status st = store->rename_noreplace(file, hidden); !st) {
            if (st.error().errnum == ENOENT) {
                return std::string();
            }
            return std::move(st).error();
        }
        target = hidden;
    }
    Status st = store->remove(target);
    if (st || st.error().errnum == ENOENT) {
        return std::string();
    }
    // A pool refuses to remove an image another client still has open. Left visible, the
    // next scan would serve it again as the top of a chain; hidden, no scan serves it, and
    // the first scan after it is closed removes it.
    if (target == file) {
        if (Status hide = store->rename_noreplace(file, hidden); !hide) {
            return make_error(st.error().errnum, "{}; hiding it failed too: {}",
                              st.error().message(), hide.error().message());
        }
    }
    return fmt::format("{} not removed ({}); left as {} for a later scan to remove", file,
                       st.error().message(), hidden);
}

}  // namespace

Task<Status> remove_file(ImageSet* images, std::string file) {
    Store* store = images->store();
    std::function<Result<std::string>()> remove = [store, file] {
        return remove_or_hide(store, file);
    };
    CO_TRY_ASSIGN(std::string hidden_why, co_await images->offloader()->run(std::move(remove)));
    if (!hidden_why.empty()) {
        images->env().log->warn("{}", hidden_why);
    }
    co_return co_await sync_image_dir(images);
}

Task<DroppedTop> drop_top_file(ImageSet* images, std::string file, std::string* why_kept) {
    Store* store = images->store();
    std::function<Status()> hide = [store, file] {
        (void)store->remove(removing_name(file));  // a leftover of an earlier crash
        return store->rename_noreplace(file, removing_name(file));
    };
    Status renamed = co_await images->offloader()->run(std::move(hide));
    if (renamed) {
        // Renamed: removing the visible name can no longer help, only making it durable can.
        Status synced = co_await sync_image_dir(images);
        if (synced) {
            co_return DroppedTop::kHidden;
        }
        *why_kept = fmt::format(
            "{} was renamed to its hidden name, but the directory could "
            "not be synced ({})",
            file, synced.error().message());
        co_return DroppedTop::kKept;
    }
    Status removed = co_await remove_file(images, file);
    if (removed) {
        images->env().log->warn("{} could not be hidden ({}), so it was removed at once", file,
                                renamed.error().message());
        co_return DroppedTop::kRemoved;
    }
    *why_kept = fmt::format("{} could be neither hidden ({}) nor removed ({})", file,
                            renamed.error().message(), removed.error().message());
    co_return DroppedTop::kKept;
}

Task<void> remove_hidden(ImageSet* images, std::string file) {
    Store* store = images->store();
    const std::string hidden = removing_name(file);
    std::function<Status()> remove = [store, hidden] { return store->remove(hidden); };
    Status st = co_await images->offloader()->run(std::move(remove));
    if (!st && st.error().errnum != ENOENT) {
        images->env().log->warn("{} not removed ({}); a later scan removes it", hidden,
                                st.error().message());
        co_return;
    }
    (void)co_await sync_image_dir(images);  // a leftover hidden name is harmless
}

namespace {

// Renames `files` back from their hidden names, as far as it can; the first failure, if any.
Status rename_back(Store* store, const std::vector<std::string>& files) {
    Status first;
    for (const std::string& f : files) {
        Status st = store->rename_noreplace(removing_name(f), f);
        if (!st && first) {
            first = std::move(st);
        }
    }
    return first;
}

// Step 1 of a splice by renaming: every file to its hidden name, all or none. A leftover hidden
// image of an earlier crash is removed first (no header names it: a scan would have restored it).
Status rename_all_hidden(Store* store, const std::vector<std::string>& files) {
    for (size_t i = 0; i < files.size(); ++i) {
        (void)store->remove(removing_name(files[i]));
        if (Status st = store->rename_noreplace(files[i], removing_name(files[i])); !st) {
            std::vector<std::string> done(files.begin(), files.begin() + static_cast<long>(i));
            if (Status undone = rename_back(store, done); !undone) {
                Error err = std::move(st).error();
                err.context += fmt::format(" (undoing: {}; the next scan renames them back)",
                                           undone.error().message());
                return err;
            }
            return st;
        }
    }
    return {};
}

// A splice in a store whose files have one name only (a Ceph pool: no hard links).
//   1. Each layer leaving the chain is renamed to its hidden name. The header above it still
//      names the visible one, which is gone: a scan that finds a header naming a missing image
//      whose hidden name exists renames it back (scan_plan.cc, restore_renamed), which undoes
//      the edit. A scan never exports a hidden name, so no second root wants the export's name.
//   2. The referrer is pointed past them. From here on nothing names the hidden images, and a
//      scan deletes them as leftovers.
//   3. The caller deletes them once their nodes are closed (remove_spliced): a pool does not
//      delete an image that is still open.
Task<Status> splice_out_renaming(ImageSet* images, std::shared_ptr<Export> e, size_t first,
                                 size_t last, bool drop_rest) {
    // Everything needed is copied out of the chain first: nothing below holds a reference
    // into it across a suspension.
    const std::vector<Layer>& layers = e->chain.layers;
    std::vector<std::string> files;
    for (size_t i = first; i <= last; ++i) {
        files.push_back(layers[i].file);
    }
    std::shared_ptr<Node> referrer = layers[first - 1].node;
    bool to_rest = !drop_rest && last + 1 < layers.size();
    std::string next = to_rest ? layers[last + 1].file : std::string();
    std::optional<std::string> fmt =
        to_rest ? std::optional<std::string>(layers[last + 1].format) : std::nullopt;
    Store* store = images->store();
    std::function<Status()> rename = [store, files] { return rename_all_hidden(store, files); };
    CO_TRY(co_await dir_call(images, std::move(rename)));
    CO_TRY(co_await sync_image_dir(images));
    Status st = co_await rewrite_backing(images, referrer.get(), next, fmt);
    if (!st) {
        std::function<Status()> undo = [store, files] { return rename_back(store, files); };
        if (Status undone = co_await dir_call(images, std::move(undo)); !undone) {
            images->env().log->warn(
                "{}: undoing a chain edit: {} (the next scan renames them back)", e->name,
                undone.error().message());
        }
        co_return st;
    }
    for (const std::string& f : files) {
        images->env().log->info("{}: removed {} from the chain", e->name, f);
    }
    co_return co_await sync_image_dir(images);
}

}  // namespace

Task<void> remove_spliced(ImageSet* images, std::vector<std::string> files) {
    Store* store = images->store();
    if (store->caps().second_names || files.empty()) {
        co_return;  // splice_out removed them already
    }
    std::vector<std::string> hidden;
    for (const std::string& f : files) {
        hidden.push_back(removing_name(f));
    }
    std::function<Status()> unlink = [store, hidden] { return unlink_names(store, hidden); };
    if (Status gone = co_await dir_call(images, std::move(unlink)); !gone) {
        images->env().log->warn("{} (left for the next scan)", gone.error().message());
    }
}

Task<Status> splice_out(ImageSet* images, std::shared_ptr<Export> e, size_t first, size_t last,
                        bool drop_rest) {
    ImageSet::EditGuard editing(images);  // a scan meanwhile must not take hidden names for garbage
    std::vector<Layer>& layers = e->chain.layers;
    Store* store = images->store();
    if (!store->caps().second_names) {
        co_return co_await splice_out_renaming(images, std::move(e), first, last, drop_rest);
    }
    // 0. With drop_rest and a layer kept below, the bottom layer leaving the chain is cut off
    // from it first. A crash after step 2 is finished forwards onto the first visible layer
    // below the hidden ones (finish_interrupted_edit), which must then be none: the referrer's
    // content no longer depends on what lies below (drop_rest's premise), so cutting it off
    // changes nothing the referrer shows, while the kept layer's data would show through
    // wherever the dropped layers read zeros.
    const bool cut = drop_rest && last + 1 < layers.size();
    if (cut) {
        CO_TRY(co_await rewrite_backing(images, layers[last].node.get(), "", std::nullopt));
    }
    // 1. A hidden second name for every layer leaving the chain.
    std::vector<std::string> files;
    for (size_t i = first; i <= last; ++i) {
        files.push_back(layers[i].file);
    }
    std::function<Status()> link = [store, files] { return link_all_hidden(store, files); };
    Status st = co_await dir_call(images, std::move(link));
    std::vector<size_t> repointed;
    if (st) {
        st = co_await sync_image_dir(images);
        // 2. Headers above them use the hidden names (bottom-most first; same files, same
        // content).
        for (size_t i = last + 1; st && i-- > first;) {
            st = co_await rewrite_backing(images, layers[i - 1].node.get(),
                                          removing_name(layers[i].file), layers[i].format);
            if (st) {
                repointed.push_back(i);
            }
        }
        if (!st) {
            co_await undo_hidden(images, e, first, last, std::move(repointed));
        }
    }
    if (!st) {
        if (cut) {
            co_await undo_cut(images, e, last);
        }
        co_return st;
    }
    // 3. The visible names go. From here on the edit goes forwards only: a failure leaves the
    // chain whole under the hidden names, which the headers use.
    std::function<Status()> unlink_visible = [store, files] { return unlink_names(store, files); };
    Status forward = co_await dir_call(images, std::move(unlink_visible));
    if (forward) {
        forward = co_await sync_image_dir(images);
    }
    // 4. The referrer skips them.
    if (forward) {
        bool to_rest = !drop_rest && last + 1 < layers.size();
        std::string next = to_rest ? layers[last + 1].file : std::string();
        std::optional<std::string> fmt =
            to_rest ? std::optional<std::string>(layers[last + 1].format) : std::nullopt;
        forward = co_await rewrite_backing(images, layers[first - 1].node.get(), next, fmt);
    }
    if (!forward) {
        // The served chain takes the hidden names the headers use (step 2), so it still matches
        // the disk and the image goes on working; the next mount finishes the edit
        // (finish_interrupted_edit), as after a crash here. Before, every later operation on
        // the image failed with EIO until a remount. Commits and streams are refused until
        // then (refuse_unfinished_edit). A cut (step 0) stays: undone, the next mount would
        // finish the edit onto the kept layer, whose data would show where the dropped layers
        // read zeros. The served chain then still names that layer, so operations on the image
        // get EIO (a chain mismatch) until the next mount; its I/O goes on.
        std::string names;
        for (size_t i = first; i <= last; ++i) {
            layers[i].file = removing_name(layers[i].file);
            names += (names.empty() ? "" : ", ") + layers[i].file;
        }
        images->env().log->warn(
            "{}: a chain edit failed after its point of no return ({}); the chain is served "
            "under the hidden names {} until the next mount finishes the edit",
            e->name, forward.error().message(), names);
        co_return forward;
    }
    // 5. Nothing references the hidden names any more.
    std::vector<std::string> hidden;
    for (const std::string& f : files) {
        hidden.push_back(removing_name(f));
        images->env().log->info("{}: removed {} from the chain", e->name, f);
    }
    std::function<Status()> unlink_hidden = [store, hidden] { return unlink_names(store, hidden); };
    // The edit is done: a hidden name left behind is unused, and the next scan removes it. So
    // is one a crash brings back because this sync failed: the edit still succeeded.
    if (Status gone = co_await dir_call(images, std::move(unlink_hidden)); !gone) {
        images->env().log->warn("{}: {} (left for the next scan)", e->name, gone.error().message());
    } else if (Status synced = co_await sync_image_dir(images); !synced) {
        images->env().log->warn("{}: {} (a crash may bring hidden names back for the next scan)",
                                e->name, synced.error().message());
    }
    co_return Status{};
}

}  // namespace imgfs
