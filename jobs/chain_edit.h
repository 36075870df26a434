// Chain edits on disk that stay crash-safe: every intermediate state of the directory opens with
// the same guest-visible content and without two roots wanting one name.
//
// Taking layers out of a chain (stream makes the top stand alone; a commit across several layers
// points the top straight at the base) is done so that no layer file ever becomes an unreferenced
// image while it still has its name: each is first given a second, hidden name (a hard link,
// ".imgfs-FILE.removing", which a scan never exports), the headers above are pointed at the
// hidden names, the visible names are removed, then the referrer is pointed past them, and only
// then are the hidden names removed. A scan recognises layers by inode, so a file that is
// reachable under a hidden name is still a layer. A crash at any step leaves either the same
// chain under other names or the final chain; leftover hidden files that no chain uses are
// deleted by the next scan.
#pragma once

#include <string>
#include <vector>

#include "core/result.h"
#include "core/task.h"
#include "jobs/image_set.h"

namespace imgfs {

/// Makes new or removed names in the directory durable.
Status sync_dir(int dir_fd);

/// sync_dir of the image directory, telling ImageSetOptions::sync_dir_observer (the crash
/// harness's seam: directory fsyncs are plain syscalls that no node filter sees).
Status sync_image_dir(ImageSet* images);

/// The hidden name a layer gets while it is taken out of a chain.
std::string removing_name(const std::string& file);
/// True for names removing_name() produces.
bool is_removing_name(const std::string& file);
/// ".imgfs-FILE.creating": where a new overlay is written before it is renamed to FILE.
std::string creating_name(const std::string& file);
/// True for names creating_name() produces.
bool is_creating_name(const std::string& file);

/// Takes layers [first, last] of `e`'s chain out of it: afterwards the layer at `first - 1`
/// (the referrer) has `last + 1` as its backing file, or none if `last` is the bottom or
/// `drop_rest` is set. The layers' files are deleted; their nodes stay in the chain (the caller
/// detaches and closes them). The caller holds a drained section on the chain and guarantees
/// the referrer's new chain shows the same content as the old one.
Task<Status> splice_out(ImageSet* images, Export* e, size_t first, size_t last, bool drop_rest);

/// Deletes a layer file that nothing references any more, durably.
Status remove_file(ImageSet* images, const std::string& file);

}  // namespace imgfs
