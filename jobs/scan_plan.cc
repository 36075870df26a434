#include "jobs/scan_plan.h"

#include <algorithm>
#include <cerrno>
#include <map>
#include <optional>
#include <set>
#include <unistd.h>

#include <sys/stat.h>

#include "drivers/backing_probe.h"
#include "drivers/chain_walk.h"
#include "drivers/image_chain.h"
#include "jobs/chain_edit.h"
#include "jobs/image_set.h"

namespace imgfs {

namespace {

// Whether a `.creating` file is another host's snapshot under way. One that is listed but
// cannot be opened is not removed: in a pool that is also an image between the steps of its
// creation (listed before its header exists), and a crash there leaves it so for good, which
// the scan reports for an operator.
Result<bool> creating_in_use(Store* store, const std::string& name) {
    TRY_ASSIGN(bool elsewhere, store->open_elsewhere(name));
    if (elsewhere) {
        return true;
    }
    return store->may_be_in_creation(name);
}

struct Candidate {
    std::string file;
    FileId id;
    bool broken = false;
    // Broken by the storage (see storage_failed), not by what the file is: a served root
    // stays exported, since the next read may well succeed.
    bool unreadable = false;
};

struct Listing {
    std::vector<Candidate> images;
    std::vector<std::string> hidden;    // ".imgfs-*.removing"
    std::vector<std::string> creating;  // ".imgfs-*.creating"
};

// Whether an image that cannot be opened is simply not a layer of any chain: it went since
// the listing, or the store refuses it to every mount alike (a link out of the directory).
// Any other failure (an I/O error, a cluster past its deadline) leaves open whether it is one.
bool cannot_be_a_layer(int errnum) {
    return errnum == ENOENT || errnum == EPERM || errnum == ELOOP || errnum == EXDEV ||
           errnum == ENOTDIR;
}

// What a walk of every candidate's backing chain found.
struct Layers {
    std::set<FileId> ids;                // every file some image uses as backing
    std::set<std::string> referenced;    // the names headers use for them
    std::set<std::string> hidden_users;  // images whose header names a hidden file
    std::set<std::string> missing;       // backing names headers use that the store lacks
    // The first image that could not be read (an I/O error, a cluster past its deadline):
    // what its chain uses is unknown, so nothing may be removed as unused.
    std::optional<std::string> unread;
    // The same, where the failure was the storage's (an I/O error, a timeout), not the file's
    // (not an image, a malformed header): the file may well be a chain that a later read finds.
    std::optional<std::string> read_failed;
};

// Whether a failure to open or probe an image is the storage's, which a later attempt may not
// meet, rather than something the file is (not a regular file, a header imgfs refuses).
bool storage_failed(int errnum) {
    switch (errnum) {
        case EIO:
        case ETIMEDOUT:
        case ENOMEM:
        case EMFILE:  // the daemon's descriptors, or the host's, not the file
        case ENFILE:
        case ENOBUFS:
        case EAGAIN:
        case EINTR:
        case ESHUTDOWN:
        case ENOTCONN:
        case ECONNREFUSED:
        case ECONNRESET:
        case ENETUNREACH:
        case EHOSTUNREACH:
        case ESTALE:
            return true;
        default:
            return false;
    }
}

// Records in `layers` that `file` could not be read (see Layers::unread); returns `error`.
Error note_unread(Layers* layers, const std::string& file, Error error) {
    if (!layers->unread && !cannot_be_a_layer(error.errnum)) {
        layers->unread = fmt::format("{} could not be read ({})", file, error.message());
    }
    if (!layers->read_failed && storage_failed(error.errnum)) {
        layers->read_failed = fmt::format("{} could not be read ({})", file, error.message());
    }
    return error;
}

Result<Listing> list_directory(const ScanInput& in) {
    TRY_ASSIGN(std::vector<StoreEntry> entries, in.store->list());
    Listing out;
    for (StoreEntry& e : entries) {
        if (is_removing_name(e.name)) {
            out.hidden.push_back(std::move(e.name));
        } else if (is_creating_name(e.name)) {
            out.creating.push_back(std::move(e.name));
        } else if (is_image_file_name(e.name)) {
            out.images.push_back(Candidate{std::move(e.name), e.id, false});
        }
    }
    return out;  // sorted: the store lists names in order
}

// Follows the chain below `file` and records every layer's inode and the names headers use. A
// layer may be referenced under another name (a hard link made while a chain is being edited),
// so inodes, not names, decide what is a layer. The walk stops quietly at the depth limit:
// it also stops at layers an earlier walk recorded, so its count is not the chain's depth, and
// opening the chain reports a chain that is too deep.
Status collect_layers(const ScanInput& in, const std::string& file, Layers* layers) {
    std::string current = file;
    std::string previous;
    std::optional<Error> header_error;  // the first layer's whose header imgfs cannot use
    auto walked = [&header_error]() -> Status {
        return header_error ? Status(*header_error) : Status{};
    };
    ChainWalk walk(file);
    while (walk.room_for_more()) {
        const bool top = walk.depth() == 0;
        Result<std::unique_ptr<StoreFile>> opened = in.store->open(current, true, false);
        if (!opened) {
            Error error = note_unread(layers, current, std::move(opened).error());
            if (top) {
                return error;
            }
            if (error.errnum == ENOENT) {
                layers->missing.insert(current);
            }
            return walked();  // a missing backing file: the top reports it
        }
        Result<ImageProbe> probed = probe_file(opened->get(), current);
        if (!probed) {
            return note_unread(layers, current, std::move(probed).error());
        }
        ImageProbe probe = std::move(*probed);
        if (Status st = walk.enter(current, probe.id); !st) {
            return std::move(st).error().wrap(file);
        }
        if (!top) {
            layers->referenced.insert(current);
            if (is_removing_name(current) && !is_removing_name(previous)) {
                layers->hidden_users.insert(previous);
            }
            // A layer shared with a chain already walked (or served) ends the walk, unless it
            // is a hidden name: a failed splice leaves several of them in a row, and each one
            // below must count as used too, or the scan would delete it.
            if (!layers->ids.insert(probe.id).second && !is_removing_name(current)) {
                return walked();
            }
        }
        // A header imgfs cannot use still names the backing file it uses (an encrypted image
        // QEMU may open): the layers below count as used, and the error is reported when
        // the walk ends. Without this its base was exported writable, or removed as unused.
        if (probe.header_error && !header_error) {
            header_error = probe.header_error;
        }
        if (probe.backing.empty()) {
            return walked();
        }
        Result<std::string> next =
            resolve_backing_in(in.store, current, probe.backing, in.allow_external_backing);
        if (!next || is_external_layer(*next)) {
            return walked();  // outside the directory: not one of our layers
        }
        previous = current;
        current = *next;
    }
    return walked();
}

// A store without second names (a Ceph pool) takes a layer out of a chain by renaming it to
// its hidden name first (chain_edit.h). A header that still names the visible name, which is
// gone, means the crash came before the referrer was pointed past it: renaming it back undoes
// the edit. Returns true if it renamed anything (the caller plans again with the new names).
bool restore_renamed(const ScanInput& in, const Listing& listing, const Layers& layers,
                     ScanPlan* plan) {
    if (in.store->caps().second_names) {
        return false;
    }
    bool renamed = false;
    for (const std::string& h : listing.hidden) {
        std::string visible = visible_name_of(h);
        if (layers.missing.count(visible) == 0) {
            continue;
        }
        // Another host in the middle of the edit has the layer open (it is in its chain): the
        // edit is not interrupted, it is under way. A host that died is listed until its
        // watch times out; a later scan restores the name then.
        Result<bool> elsewhere = in.store->open_elsewhere(h);
        if (!elsewhere || *elsewhere) {
            plan->problems.push_back(
                {visible,
                 fmt::format("{} is named by a header but is missing; its hidden name {} "
                             "{}: left as it is",
                             visible, h,
                             elsewhere ? "is open on another host (an edit under way)"
                                       : "cannot be checked: " + elsewhere.error().message())});
            continue;
        }
        Status back = in.store->rename_noreplace(h, visible);
        if (!back) {
            // Tried again by the next scan; said here, or the chain would just be broken.
            plan->problems.push_back(
                {visible, fmt::format("{} is named by a header but is missing; renaming its "
                                      "hidden name {} back failed: {}",
                                      visible, h, back.error().message())});
            continue;
        }
        plan->removed.push_back(fmt::format(
            "the hidden name {}: renamed back to {}, which a header still names (a chain "
            "edit a crash interrupted, now undone)",
            h, visible));
        renamed = true;
    }
    return renamed;
}

void remove_leftovers(const ScanInput& in, const Listing& listing, const Layers& layers,
                      ScanPlan* plan) {
    // A hidden name no header uses: a chain edit made it and was interrupted (a crash, or a
    // failed step) before it was needed or after it no longer was. The visible name, if any,
    // is the file's real one.
    for (const std::string& h : listing.hidden) {
        // A header that names the visible name, which is missing, still needs this one: the
        // rename back was declined (an edit under way elsewhere, or it could not be checked),
        // and a later scan makes it.
        if (layers.referenced.count(h) == 0 && layers.missing.count(visible_name_of(h)) == 0 &&
            in.store->remove(h)) {
            plan->removed.push_back(h + ", left over from an interrupted chain edit");
        }
    }
    // A snapshot overlay a crash caught before its rename: never part of any chain. In a pool
    // it may be another host's snapshot under way instead: left to a later scan.
    for (const std::string& c : listing.creating) {
        if (Result<bool> busy = creating_in_use(in.store, c); !busy || *busy) {
            if (!busy) {
                plan->problems.push_back(
                    {c, fmt::format("{} is left over from a snapshot, but cannot be checked: {}; "
                                    "left as it is (remove it by hand if no snapshot is under "
                                    "way on another host)",
                                    c, busy.error().message())});
            }
            continue;
        }
        if (in.store->remove(c)) {
            plan->removed.push_back(c + ", left over from an interrupted snapshot");
        }
    }
    if (!plan->removed.empty()) {
        (void)in.store->sync();  // best effort: a crash before it only brings the garbage back
    }
}

namespace {

// Why `name` cannot be an export, or "". The mount shows NAME.raw and .control/NAME/, so a
// name must be non-empty, leave room for ".raw" in a file name, and not be one of the files
// .control has for the whole mount (the contract's global control files).
std::string unusable_export_name(const std::string& name, char separator) {
    static const char* const kGlobalControlFiles[] = {"snapshot", "rescan", "jobs", "skipped"};
    if (name.empty()) {
        return fmt::format("its export name is empty (the file name starts with '{}')", separator);
    }
    if (name.size() + 4 > 255) {  // only a pool's names are long enough
        return fmt::format("its export name is {} bytes long; NAME.raw allows at most 251",
                           name.size());
    }
    for (const char* reserved : kGlobalControlFiles) {
        if (name == reserved) {
            return fmt::format("its export name '{}' is taken by the mount's own .control/{}", name,
                               name);
        }
    }
    return {};
}

}  // namespace

// The roots of the served chains, by file name, where the name is still that file.
std::set<std::string> served_roots(const ScanInput& in) {
    std::set<std::string> roots;
    for (const auto& [id, chain] : in.served) {
        if (chain.empty() || chain.front().id == FileId{}) {
            continue;
        }
        Result<FileId> named = in.store->id_of(chain.front().file, true);
        if (named && *named == chain.front().id) {
            roots.insert(chain.front().file);
        }
    }
    return roots;
}

// An image counts as a root when no chain walked uses it. While the storage failed to give some
// image (Layers::read_failed), its chain may use any of them: exported writable, such a "root"
// would change what that image shows. So only the roots served already are kept then; new ones
// wait for a scan that can read every header. A file that is no image (malformed, not a regular
// file) does not hold them back: QEMU cannot open it either, so it uses nothing.
void choose_roots(const std::vector<Candidate>& images, const Layers& layers,
                  const std::set<std::string>& served, char separator, ScanPlan* plan) {
    std::map<std::string, std::vector<std::string>> roots_by_name;
    for (const Candidate& c : images) {
        // A served root that the storage failed to give this time is kept: dropping it would
        // take a working disk away for an I/O error or a descriptor shortage in this scan.
        bool kept_unread = c.broken && c.unreadable && served.count(c.file) != 0;
        if ((c.broken && !kept_unread) || layers.ids.count(c.id) != 0) {
            continue;
        }
        if (layers.read_failed && served.count(c.file) == 0) {
            plan->problems.push_back(
                {c.file, fmt::format("not exported for now: {}, so whether its chain uses {} is "
                                     "unknown; a rescan exports it once it can be read",
                                     *layers.read_failed, c.file)});
            continue;
        }
        roots_by_name[export_name_of(c.file, separator)].push_back(c.file);
    }
    for (auto& [name, roots] : roots_by_name) {
        if (std::string why = unusable_export_name(name, separator); !why.empty()) {
            for (const auto& r : roots) {
                plan->problems.push_back({r, why + "; rename the file to export it"});
            }
            continue;
        }
        if (roots.size() > 1) {
            std::string list;
            for (const auto& r : roots) {
                list += list.empty() ? r : ", " + r;
            }
            for (const auto& r : roots) {
                plan->problems.push_back(
                    {r, fmt::format("export name '{}' is wanted by {}; none of them is exported",
                                    name, list)});
            }
            continue;
        }
        plan->wanted[name] = roots.front();
    }
}

// A served chain whose root is still the same file keeps its lower layers layers, even if a
// header on disk no longer says so (a middle layer deleted under the mount): otherwise the
// orphaned base would turn into a second root wanting the same name, and the export would be
// dropped instead of reported.
void keep_served_layers(const ScanInput& in, Layers* layers) {
    for (const auto& [id, chain] : in.served) {
        if (chain.empty() || chain.front().id == FileId{}) {
            continue;
        }
        Result<FileId> named = in.store->id_of(chain.front().file, true);
        if (!named || *named != chain.front().id) {
            continue;  // the root went or changed: the scan decides about the export afresh
        }
        for (size_t i = 1; i < chain.size(); ++i) {
            if (chain[i].id != FileId{}) {
                layers->ids.insert(chain[i].id);
            }
            // A layer served under its hidden name (a chain edit that failed past its point of
            // no return) is in use whatever the headers say: a walk that stops at a layer it
            // shares with this chain never reaches it, and it would be taken for a leftover.
            if (is_removing_name(chain[i].file)) {
                layers->referenced.insert(chain[i].file);
            }
        }
    }
}

// What walks found from a layer down (that layer included): the first file of `ids`, or none.
// Images in one store often share their lower layers (a golden base under every VM), so each
// such layer is read once per search instead of once per image above it.
using ReachMemo = std::map<std::string, std::optional<FileId>>;

// The first file of `ids` the chain below `file` reaches, if any; `file` itself is not one of
// `ids` (the caller's guarantee), so what the memo knows of it holds for its chain. Stops at
// headers that are not a chain (invalid, a name outside the store); fails if a file could not be
// read, since then nobody can say where its chain goes. Verdicts go into `memo` for every layer
// walked, except where the walk stopped at a loop or the depth limit: from a layer further down,
// the same chain may well reach a file within the limit.
Result<std::optional<FileId>> chain_reaches(Store* store, bool allow_external,
                                            const std::string& file, const std::set<FileId>& ids,
                                            ReachMemo* memo) {
    std::vector<std::string> walked;  // the verdict is theirs as well
    auto settle = [&](std::optional<FileId> verdict) {
        for (const std::string& name : walked) {
            memo->emplace(name, verdict);
        }
        return verdict;
    };
    std::string current = file;
    ChainWalk walk(file);
    while (walk.room_for_more()) {
        if (auto known = memo->find(current); known != memo->end()) {
            return settle(known->second);
        }
        walked.push_back(current);
        Result<std::unique_ptr<StoreFile>> opened = store->open(current, true, false);
        if (!opened) {
            if (cannot_be_a_layer(opened.error().errnum)) {
                return settle(std::nullopt);
            }
            return make_error(opened.error().errnum, "cannot open {}: {}", current,
                              opened.error().message());
        }
        TRY_ASSIGN(ImageProbe probe, probe_file(opened->get(), current));
        if (!walk.enter(current, probe.id)) {
            return std::optional<FileId>{};  // a loop: no verdict for the layers walked
        }
        if (walk.depth() > 1 && ids.count(probe.id) != 0) {
            return settle(probe.id);
        }
        if (probe.backing.empty()) {  // (a header imgfs cannot use may still name one)
            return settle(std::nullopt);
        }
        Result<std::string> next =
            resolve_backing_in(store, current, probe.backing, allow_external);
        if (!next || next->empty() || is_external_layer(*next)) {
            return settle(std::nullopt);
        }
        current = *next;
    }
    return std::optional<FileId>{};
}

}  // namespace

Result<std::vector<UnservedUser>> unserved_users(Store* store, bool allow_external_backing,
                                                 const std::set<FileId>& ids,
                                                 const std::set<std::string>& served) {
    std::vector<UnservedUser> users;
    ReachMemo memo;
    TRY_ASSIGN(std::vector<StoreEntry> entries, store->list());
    for (const StoreEntry& e : entries) {
        if (!is_image_file_name(e.name) || is_removing_name(e.name) || is_creating_name(e.name) ||
            served.count(e.name) != 0 || ids.count(e.id) != 0) {
            continue;
        }
        TRY_ASSIGN(std::optional<FileId> reached,
                   chain_reaches(store, allow_external_backing, e.name, ids, &memo));
        if (reached) {
            users.push_back(UnservedUser{e.name, *reached});
        }
    }
    return users;
}

ScanPlan plan_scan(const ScanInput& in) {
    ScanPlan plan;
    Result<Listing> listing = list_directory(in);
    if (!listing) {
        plan.failed = std::move(listing).error();
        return plan;
    }
    Layers layers;
    keep_served_layers(in, &layers);
    for (Candidate& c : listing->images) {
        if (Status st = collect_layers(in, c.file, &layers); !st) {
            c.broken = true;
            c.unreadable = storage_failed(st.error().errnum);
            plan.problems.push_back({c.file, st.error().message()});
        }
    }
    if (in.remove_leftovers && restore_renamed(in, *listing, layers, &plan)) {
        // Planned again with the names restored: the chains are whole now. Each round renames
        // at least one hidden name back, so this ends.
        ScanInput again = in;
        ScanPlan replanned = plan_scan(again);
        replanned.removed.insert(replanned.removed.begin(), plan.removed.begin(),
                                 plan.removed.end());
        return replanned;
    }
    if (in.remove_leftovers && layers.unread) {
        // A hidden name that header uses must not go; the next scan decides.
        for (const std::string& h : listing->hidden) {
            if (layers.referenced.count(h) != 0) {
                continue;  // in use by a chain that was read: kept anyway
            }
            plan.problems.push_back(
                {h, fmt::format("kept for now: {}, so whether a chain uses it is unknown",
                                *layers.unread)});
        }
    }
    if (in.remove_leftovers) {
        if (!layers.unread) {
            remove_leftovers(in, *listing, layers, &plan);
        }
        std::set<std::string> served;
        for (const auto& [id, chain] : in.served) {
            for (const ServedLayer& l : chain) {
                served.insert(l.file);
                // A layer served under its hidden name (an edit left unfinished) may still
                // have its visible name, whose header an unfinished edit may have changed too.
                if (is_removing_name(l.file)) {
                    served.insert(visible_name_of(l.file));
                }
            }
        }
        for (const std::string& user : layers.hidden_users) {
            if (served.count(user) == 0) {
                plan.interrupted.push_back(user);
            }
        }
    }
    choose_roots(listing->images, layers, served_roots(in), in.store->caps().snapshot_separator,
                 &plan);
    for (const auto& [id, chain] : in.served) {
        std::string why = check_served_chain(in.store, in.allow_external_backing, chain);
        if (!why.empty()) {
            plan.mismatches[id] = why;
        }
    }
    return plan;
}

std::string check_served_chain(Store* store, bool allow_external_backing,
                               const std::vector<ServedLayer>& layers) {
    for (size_t i = 0; i < layers.size(); ++i) {
        const ServedLayer& l = layers[i];
        if (l.id == FileId{} || is_external_layer(l.file)) {
            continue;  // not a file of the directory: nothing to compare
        }
        // Links followed, as the open that made the served layer did: a link inside the
        // directory names its target, and a link pointed elsewhere shows as another file.
        Result<FileId> named = store->id_of(l.file, true);
        if (!named) {
            return fmt::format("{} is missing on disk", l.file);
        }
        if (*named != l.id) {
            return fmt::format("{} on disk is another file than the one served", l.file);
        }
        // The same file as the one served (just checked), so its header is the served one's.
        Result<std::unique_ptr<StoreFile>> opened = store->open(l.file, true, false);
        if (!opened) {
            return opened.error().message();
        }
        Result<std::string> backing = read_backing_field(opened->get(), l.file);
        if (!backing) {
            return backing.error().message();
        }
        std::string below = i + 1 < layers.size() ? layers[i + 1].file : std::string();
        std::string named_below;
        if (!backing->empty()) {
            Result<std::string> r =
                resolve_backing_in(store, l.file, *backing, allow_external_backing);
            named_below = r ? *r : *backing;
        }
        if (named_below != below) {
            return fmt::format("{} names {} as its backing file, but {} is served below it", l.file,
                               named_below.empty() ? "none" : "'" + named_below + "'",
                               below.empty() ? "nothing" : below);
        }
    }
    return {};
}

}  // namespace imgfs
