// Scan planning: what a scan of the image directory finds. Computed off the event loop (it is
// nothing but directory listings, stats and header reads) and without touching the graph; the
// scan then applies the plan on the loop. Also removes what an interrupted chain edit left
// behind, when the caller says no edit is in progress.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/result.h"
#include "drivers/store.h"

namespace imgfs {

/// One layer of a served chain: its file name and the identity of the file it is served from.
struct ServedLayer {
    std::string file;
    FileId id{};  // {0, 0}: not a file of a store (nothing to compare)
};

struct ScanInput {
    Store* store = nullptr;
    bool allow_external_backing = false;
    /// Remove leftovers of interrupted chain edits (writable mount, no edit in progress).
    bool remove_leftovers = false;
    /// The chains served now (whose exports the scan holds), by export id.
    std::map<uint64_t, std::vector<ServedLayer>> served;
};

/// An image file a scan could not export, or an export it found wrong, and why. `file` is the
/// image file concerned ("" when the problem is not one file's); `reason` is a full sentence.
struct ScanProblem {
    std::string file;
    std::string reason;
};

struct ScanPlan {
    std::optional<Error> failed;                 // the directory could not be read
    std::map<std::string, std::string> wanted;   // export name -> root file
    std::vector<ScanProblem> problems;           // images that cannot be exported, and why
    std::vector<std::string> removed;            // leftover names removed, with why
    std::map<uint64_t, std::string> mismatches;  // export id -> how the disk differs
    /// Images whose header names a hidden .removing file: a chain edit a crash interrupted
    /// after it pointed them there. Only those outside the served chains (those are reported).
    std::vector<std::string> interrupted;
};

/// Blocking: lists the directory, finds roots and layers, removes leftovers if allowed, and
/// compares every served chain with the files.
ScanPlan plan_scan(const ScanInput& in);

/// Blocking: the images of the store, other than the `served` names, whose backing chain
/// reaches a file in `ids`. These are users this mount cannot see in its exports: another host's
/// image in a pool (held under its RBD lock), or an image a scan could not export. Images whose
/// header is not a chain (invalid, a loop, a name outside the store) are left out. Fails if the
/// store cannot be listed or an image read: a user might then go unseen.
struct UnservedUser {
    std::string image;  // the image whose chain it is
    FileId layer;       // the file of `ids` its chain reaches
};
Result<std::vector<UnservedUser>> unserved_users(Store* store, bool allow_external_backing,
                                                 const std::set<FileId>& ids,
                                                 const std::set<std::string>& served);

/// Blocking: "" if the directory still holds `layers` (top first) as one chain — every name
/// present, the same file as the one served, each header naming the next layer as its backing
/// file — else what differs.
std::string check_served_chain(Store* store, bool allow_external_backing,
                               const std::vector<ServedLayer>& layers);

}  // namespace imgfs
