// Snapshot (single and group) and revert: short operations done within the control write, each
// under the `ops` lock of every image it changes (a group snapshot takes them in ascending id
// order, so two group snapshots, or one and a rescan, cannot deadlock).
//
// Snapshot order (each step durable before the next one can depend on it):
//   drain the images, flush their active layers, create NAME@SNAP.qcow2 (written and fsynced)
//   with the active layer as backing, fsync the directory, open it, freeze the old active layer
//   (read-only), then switch every export to its new layer in one graph transaction.
// A crash before the switch leaves the new overlay on disk: it shows the old layer's content, so
// the directory opens as after. A failure undoes everything it did.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "core/drain.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "core/transaction.h"
#include "drivers/file.h"
#include "drivers/qcow2/create.h"
#include "drivers/qcow2/qcow2_node.h"
#include "jobs/chain_edit.h"
#include "jobs/job_manager.h"

namespace imgfs {

namespace {

struct SnapshotTarget {
    std::shared_ptr<Export> e;
    std::string snap;
    std::string file;  // NAME@SNAP.qcow2
    bool created = false;
    FileId id{};  // the new file's identity in the store
    Layer layer;  // the new top, once open
};

qcow2::CreateOptions overlay_options(const Store* store, const Layer& top) {
    qcow2::CreateOptions o;
    o.size = top.node->size();
    o.backing_file = store->recorded_name(top.file);
    o.backing_format = top.format;
    // The overlay is laid out as its backing is: a user who chose a cluster size, or left
    // extended L2 off so that QEMU before 5.2 can open the images, gets the same in every
    // snapshot. Over a raw backing, qemu-img's defaults (64 KiB, no extended L2).
    Qcow2Node::inherit_layout(*top.node, &o);
    return o;
}

// Writes a new overlay under its hidden name and renames it into place once durable (the
// directory entry can reach the disk before the content, and an empty or half-written
// NAME@SNAP.qcow2 left by a crash would be taken for a second root wanting NAME).
Task<Result<std::shared_ptr<Node>>> write_overlay(ImageSet* images, SnapshotTarget* t) {
    Store* store = images->store();
    const NodeEnv& env = images->env();
    const std::string tmp = creating_name(t->file);
    // The offloader's results are copyable: the new file crosses back as a shared pointer.
    std::function<Result<std::shared_ptr<StoreFile>>()> open_tmp =
        [store, tmp]() -> Result<std::shared_ptr<StoreFile>> {
        // A leftover of an earlier crash; if it cannot go, create_exclusive fails (EEXIST).
        (void)store->remove(tmp);
        TRY_ASSIGN(std::unique_ptr<StoreFile> f, store->create_exclusive(tmp));
        return std::shared_ptr<StoreFile>(std::move(f));
    };
    Result<std::shared_ptr<StoreFile>> opened =
        co_await images->offloader()->run<Result<std::shared_ptr<StoreFile>>>(std::move(open_tmp));
    CO_TRY(opened);
    FileOptions fo;
    fo.direct = images->options().direct;
    Result<std::shared_ptr<Node>> file = (*opened)->into_node(env, t->file + " (file)", fo);
    Status created = file ? Status{} : Status(file.error());
    if (created) {
        t->id = (*opened)->id();
        created = co_await qcow2::create_image(file->get(),
                                               overlay_options(store, t->e->chain.layers.front()));
        if (!created) {
            // The reason reaches the user as the context alone: name the errno in it.
            const int err = created.error().errnum;
            created =
                make_error(err, "cannot write the new overlay {}: {}", t->file, std::strerror(err));
        }
    }
    if (created) {
        std::function<Status()> rename = [store, tmp, file = t->file]() -> Status {
            if (Status st = store->rename_noreplace(tmp, file); !st) {
                return make_error(st.error().errnum, "cannot create {}", file);
            }
            return {};
        };
        created = co_await dir_call(images, std::move(rename));
    }
    if (!created) {
        if (file) {
            // Closed and let go before it is removed: a pool refuses to remove an image this
            // client still has open (and locked), and the .creating image would stay behind.
            // A file node keeps its descriptor until it is destroyed, hence the reset.
            std::shared_ptr<Node> closing = std::move(*file);
            (void)co_await closing->close();
            closing.reset();
        }
        std::vector<std::string> names{tmp};
        std::function<Status()> unlink = [store, names] { return unlink_names(store, names); };
        // The snapshot fails with the creation's error; a .creating leftover is never exported.
        if (Status st = co_await dir_call(images, std::move(unlink)); !st) {
            images->env().log->warn("{}: {}", t->e->name, st.error().message());
        }
        co_return std::move(created).error();
    }
    t->created = true;
    co_return std::move(*file);
}

// Creates and opens one new overlay (the export does not use it yet).
Task<Status> create_overlay(ImageSet* images, SnapshotTarget* t) {
    const NodeEnv& env = images->env();
    CO_TRY_ASSIGN(std::shared_ptr<Node> file, co_await write_overlay(images, t));
    qcow2::Options q = images->options().qcow2;
    Transaction tx(env.graph);
    std::shared_ptr<Node> storage = file;
    if (images->options().wrap_file) {
        storage = images->options().wrap_file(env, &tx, storage, t->file);
    }
    // A snapshot overlay is always qcow2, whatever the layer below, so the job names that driver
    // itself: there is no format choice for a generic "open a new layer" call to make.
    auto node = Qcow2Node::create(env, t->file, &tx, storage, q);
    CO_TRY(tx.commit());
    CO_TRY(co_await node->load());
    t->layer = Layer{t->file, "qcow2", false, t->id, node};
    co_return Status{};
}

// One entry of a (group) snapshot, checked against the entries before it.
Result<SnapshotTarget> make_target(std::shared_ptr<Export> e, const std::string& snap,
                                   char separator, const std::vector<SnapshotTarget>& earlier) {
    if (!valid_snapshot_name(snap)) {
        return make_error(EINVAL,
                          "{}: invalid snapshot name '{}' (letters, digits, '.', '_', '-'; up to "
                          "64, starting with a letter or digit)",
                          e->name, snap);
    }
    for (const auto& t : earlier) {
        if (t.e == e) {
            return make_error(EINVAL, "{} is listed twice", e->name);
        }
    }
    SnapshotTarget t;
    t.snap = snap;
    t.file = e->name + separator + snap + ".qcow2";
    // The file and the helper names made for it (chain_edit.h) must fit in a directory entry,
    // else the creation fails half way with ENAMETOOLONG.
    constexpr size_t kNameMax = 255;
    const size_t longest = std::max(creating_name(t.file).size(), removing_name(t.file).size());
    if (longest > kNameMax) {
        return make_error(EINVAL,
                          "{}: the snapshot's file name {} is too long: with the names a "
                          "snapshot uses while it is made ({}) it takes {} bytes, and a name "
                          "holds {}",
                          e->name, t.file, creating_name(t.file), longest, kNameMax);
    }
    t.e = std::move(e);
    return t;
}

// EEXIST for a target whose file name is taken (checked off the loop, under the locks).
Task<Status> check_names_free(ImageSet* images, const std::vector<SnapshotTarget>* ts) {
    Store* store = images->store();
    std::vector<std::pair<std::string, std::string>> names;  // image, file
    for (const auto& t : *ts) {
        names.emplace_back(t.e->name, t.file);
    }
    std::function<Status()> check = [store, names]() -> Status {
        for (const auto& [image, file] : names) {
            if (store->id_of(file, false)) {
                return make_error(EEXIST, "{}: {} already exists", image, file);
            }
        }
        return {};
    };
    co_return co_await dir_call(images, std::move(check));
}

// Undoes a group snapshot that failed before its switch: the frozen layers are writable again,
// and the new overlays are closed and deleted. A layer that cannot be made writable again
// leaves its image failed.
Task<void> undo_snapshot(ImageSet* images, std::vector<SnapshotTarget*> frozen,
                         std::vector<SnapshotTarget>* ts) {
    for (SnapshotTarget* t : frozen) {
        Status st = co_await t->e->chain.top()->set_writable(true);
        if (!st) {
            images->fence(t->e.get(),
                          fmt::format("a failed snapshot could not make {} writable "
                                      "again: {}",
                                      t->e->chain.layers.front().file, st.error().message()));
        }
    }
    // The snapshot reports its own error; what goes wrong while undoing it is logged.
    Logger* log = images->env().log;
    std::vector<std::string> created;
    for (auto& t : *ts) {
        if (t.layer.node) {
            if (Status st = co_await t.layer.node->close(); !st) {
                log->warn("{}: closing {} of a failed snapshot: {}", t.e->name, t.file,
                          st.error().message());
            }
            t.layer.node.reset();
        }
        if (t.created) {
            created.push_back(t.file);
        }
    }
    Store* store = images->store();
    std::function<Status()> unlink = [store, created] { return unlink_names(store, created); };
    if (Status st = co_await dir_call(images, std::move(unlink)); !st) {
        // An overlay left behind shows its backing's content: the directory opens as before.
        log->error("undoing a failed snapshot: {}", st.error().message());
    }
    if (Status st = co_await sync_image_dir(images); !st) {
        log->warn("undoing a failed snapshot: {}", st.error().message());
    }
}

// The snapshot proper, with every target's lock held: drain, flush, new overlays made durable,
// old tops frozen, then one transaction switches every export to its overlay.
Task<Status> switch_to_overlays(ImageSet* images, std::vector<SnapshotTarget>* ts) {
    std::vector<std::shared_ptr<Node>> tops;
    for (const auto& t : *ts) {
        tops.push_back(t.e->chain.top());
    }
    DrainGuard drained = co_await drain(tops);
    Status st;
    for (auto& top : tops) {
        if (st) {
            st = co_await top->flush();
        }
    }
    {
        ImageSet::EditGuard creating(images);  // a rescan must not take them for garbage
        for (auto& t : *ts) {
            if (st) {
                st = co_await create_overlay(images, &t);
            }
        }
    }
    if (st) {
        st = co_await sync_image_dir(images);  // the new entries are durable before the switch
    }
    std::vector<SnapshotTarget*> frozen;
    for (size_t i = 0; i < ts->size() && st; ++i) {
        st = co_await tops[i]->set_writable(false);
        if (st) {
            frozen.push_back(&(*ts)[i]);
        }
    }
    if (st) {
        Transaction tx(images->env().graph);
        for (size_t i = 0; i < ts->size(); ++i) {
            tx.append_overlay(tops[i], (*ts)[i].layer.node);
        }
        st = tx.commit();
    }
    if (!st) {
        co_await undo_snapshot(images, std::move(frozen), ts);
        co_return st;
    }
    for (auto& t : *ts) {
        t.e->chain.layers.insert(t.e->chain.layers.begin(), t.layer);
        images->share_backing_layers(t.e->chain);
    }
    co_return Status{};
}

}  // namespace

bool valid_snapshot_name(std::string_view name) {
    if (name.empty() || name.size() > 64) {
        return false;
    }
    auto alnum = [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    };
    if (!alnum(name[0])) {
        return false;
    }
    for (char c : name) {
        if (!alnum(c) && c != '.' && c != '_' && c != '-') {
            return false;
        }
    }
    return true;
}

Task<Status> JobManager::snapshot(std::shared_ptr<Export> e, std::string snap) {
    std::vector<std::pair<std::shared_ptr<Export>, std::string>> one;
    one.emplace_back(std::move(e), std::move(snap));
    co_return co_await group_snapshot(std::move(one));
}

Task<Status> JobManager::group_snapshot(
    std::vector<std::pair<std::shared_ptr<Export>, std::string>> targets) {
    std::vector<SnapshotTarget> ts;
    for (auto& [e, snap] : targets) {
        CO_TRY_ASSIGN(SnapshotTarget t,
                      make_target(e, snap, images()->store()->caps().snapshot_separator, ts));
        ts.push_back(std::move(t));
    }
    if (ts.empty()) {
        co_return make_error(EINVAL, "no image to snapshot");
    }
    // The fixed order in which every operation takes several images' locks.
    std::sort(ts.begin(), ts.end(),
              [](const SnapshotTarget& a, const SnapshotTarget& b) { return a.e->id < b.e->id; });
    std::vector<TimedMutex::Guard> guards;
    for (auto& t : ts) {
        CO_TRY_ASSIGN(TimedMutex::Guard g, co_await images_->lock_export(t.e, "snapshot"));
        guards.push_back(std::move(g));
    }
    for (auto& t : ts) {
        CO_TRY(refuse_if_busy(t.e.get()));
        // A chain a mount could not open again is not made (a snapshot loop without commits).
        if (t.e->chain.layers.size() >= ChainOptions{}.max_depth) {
            co_return make_error(EPERM,
                                 "{}: the chain has {} layers, the most a mount opens; commit "
                                 "or stream it first",
                                 t.e->name, t.e->chain.layers.size());
        }
    }
    CO_TRY(co_await check_names_free(images_, &ts));
    // All or nothing for the locks too: a group refused at its third image gives back the
    // claims it took for the first two.
    std::vector<std::pair<std::shared_ptr<Export>, bool>> claimed;
    Status st;
    for (auto& t : ts) {
        Result<bool> fresh = co_await claim_and_verify(t.e);
        if (!fresh) {
            st = std::move(fresh).error();
            break;
        }
        claimed.emplace_back(t.e, *fresh);
    }
    if (st) {
        st = co_await switch_to_overlays(images_, &ts);
    }
    if (!st) {
        for (auto& [e, fresh] : claimed) {
            co_await give_back(e, fresh);
        }
        co_return st;
    }
    for (auto& t : ts) {
        log_->info("{}: snapshot {}: {} is now the active layer", t.e->name, t.snap, t.file);
        auto job = std::make_shared<RecordJob>(images_->env().loop, next_id_++, "snapshot", t.e, 0);
        record(job);
        co_await job->run();
    }
    co_return Status{};
}

Task<Status> JobManager::revert(std::shared_ptr<Export> e) {
    CO_TRY_ASSIGN(TimedMutex::Guard guard, co_await images_->lock_export(e, "revert"));
    co_return co_await revert_locked(std::move(e));
}

namespace {

// The kernel sends RELEASE for NAME.raw after close() has returned, in the background, and
// with FUSE over io_uring on the queue of whichever CPU closed it: a revert written right
// after the last close (losetup -d; echo > revert) can arrive first. It waits this long for
// the count to reach 0 before it refuses.
constexpr auto kReleaseGrace = std::chrono::seconds(1);

Task<void> wait_for_close(EventLoop* loop, std::shared_ptr<Export> e) {
    const auto deadline = std::chrono::steady_clock::now() + kReleaseGrace;
    while (e->backend->open_count() > 0 && std::chrono::steady_clock::now() < deadline) {
        co_await loop->sleep(std::chrono::milliseconds(10));
    }
}

}  // namespace

Task<Status> JobManager::revert_locked(std::shared_ptr<Export> e) {
    CO_TRY(refuse_if_busy(e.get()));
    // Dropping the top first removes any file under the top's hidden name: after a snapshot
    // that reused a name an unfinished edit hid, that is a layer this chain still serves.
    CO_TRY(refuse_unfinished_edit(e.get()));
    co_await wait_for_close(images_->env().loop, e);
    std::vector<Layer>& layers = e->chain.layers;
    if (e->backend->open_count() > 0) {
        co_return make_error(EBUSY, "{}.raw is open ({} time{}); close it before reverting",
                             e->name, e->backend->open_count(),
                             e->backend->open_count() == 1 ? "" : "s");
    }
    if (layers.size() < 2) {
        co_return make_error(EINVAL, "{}: no snapshot to revert to ({} has no backing file)",
                             e->name, layers.front().file);
    }
    const Layer& below = layers[1];
    if (export_name_of(below.file, images()->store()->caps().snapshot_separator) != e->name) {
        co_return make_error(EBUSY, "{}: the layer below, {}, is not one of {}'s own snapshots",
                             e->name, below.file, e->name);
    }
    // The top is deleted, the layer below becomes writable: no other image may use either.
    const Layer* const changed[] = {&layers.front(), &below};
    for (const Layer* l : changed) {
        if (std::vector<Export*> others = images_->users_of(*l, e.get()); !others.empty()) {
            co_return make_error(EBUSY, "{}: {} is also used by {}", e->name, l->file,
                                 others.front()->name);
        }
    }
    // The layer below becomes the image's active layer: another host's chain on it would
    // change under that host.
    CO_TRY(co_await refuse_unserved_users(images_, e, 1, "reverting"));
    CO_TRY_ASSIGN(bool fresh, co_await claim_and_verify(e));
    std::shared_ptr<Node> top = layers.front().node;
    std::shared_ptr<Node> back = layers[1].node;
    // Moved in: a copy kept here would hold the dropped layer open until the revert returns.
    // `back` as well: the image's edge moves to it, and must stay drained through the hide.
    std::vector<std::shared_ptr<Node>> drained_nodes{top, back};
    DrainGuard drained = co_await drain(std::move(drained_nodes));
    if (e->backend->open_count() > 0) {
        // Opened while the checks above waited: its writes would go to the dropped layer.
        drained.end();
        co_await give_back(e, fresh);
        co_return make_error(EBUSY, "{}.raw was opened; close it before reverting", e->name);
    }
    if (Status writable = co_await back->set_writable(true); !writable) {
        drained.end();
        co_await give_back(e, fresh);  // a refused revert leaves the lock as it found it
        co_return writable;
    }
    if (e->backend->open_count() > 0) {
        // Opened while set_writable waited (an open does not wait for a drained section).
        if (Status back_ro = co_await back_to_read_only(images_, back.get()); !back_ro) {
            log_->warn("{}: {} stays writable after a refused revert: {}", e->name, back->name(),
                       back_ro.error().message());
        }
        drained.end();
        co_await give_back(e, fresh);
        co_return make_error(EBUSY, "{}.raw was opened; close it before reverting", e->name);
    }
    Transaction tx(images_->env().graph);
    tx.replace_node(top.get(), back);
    tx.detach(top->backing());
    if (Status st = tx.commit(); !st) {
        // The revert fails with the transaction's error; the layer below merely stays writable.
        if (Status back_ro = co_await back_to_read_only(images_, back.get()); !back_ro) {
            log_->warn("{}: {} stays writable after a failed revert: {}", e->name, back->name(),
                       back_ro.error().message());
        }
        drained.end();
        co_await give_back(e, fresh);
        co_return st;
    }
    // As for a commit: the dropped layer's name goes before writes reach the layer below, or a
    // crash would bring it back over them.
    std::string file = layers.front().file;
    std::string why_kept;
    const DroppedTop dropped = co_await drop_top_file(images_, file, &why_kept);
    std::string fenced_why;
    if (dropped == DroppedTop::kKept) {
        // Inside the drain nothing has written the layer below yet: fenced now, a crash or a
        // remount serves the image as it was before the revert.
        fenced_why = fmt::format(
            "{}: reverted, but {}; the image refuses I/O until a rescan reopens it (once "
            "closed)",
            e->name, why_kept);
        images_->fence(e.get(), fenced_why);
    }
    drained.end();
    // The dropped layer's file is closed (and its lock released) before it is removed.
    std::vector<Layer> gone(layers.begin(), layers.begin() + 1);
    layers.erase(layers.begin());
    top.reset();
    back.reset();
    co_await images_->retire_layers(std::move(gone), e.get());
    if (dropped == DroppedTop::kHidden) {
        co_await remove_hidden(images_, file);
    }
    if (!fenced_why.empty()) {
        co_return make_error(EIO, "{}", fenced_why);
    }
    log_->info("{}: reverted: {} removed, {} is the active layer", e->name, file,
               layers.front().file);
    auto job = std::make_shared<RecordJob>(images_->env().loop, next_id_++, "revert", e, 0);
    record(job);
    co_await job->run();
    co_return Status{};
}

}  // namespace imgfs
