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
// chain under other names or the final chain; leftover hidden files that no header names are
// deleted by the next scan. A step that fails before the visible names go is undone at once.
//
// A Ceph pool has no second names. There each leaving layer is renamed to its hidden name, and
// then the referrer is pointed past them. A crash between the two leaves a header naming an
// image that is gone while its hidden name exists; the next writable scan renames it back
// before it opens any chain (the edit is undone), and a read-only mount reports that chain as
// broken until then. No state has two roots wanting one name: hidden names are never exported.
//
// The caller holds the export's `ops` lock. Directory calls run on the ImageSet's offloader and
// directory fsyncs through the event loop's io_uring: none blocks the loop.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/result.h"
#include "core/task.h"
#include "jobs/image_set.h"

namespace imgfs {

/// Makes new or removed names in the image directory durable (on the offload thread), telling
/// ImageSetOptions::sync_dir_observer before and after (the crash harness's seam: directory
/// syncs are not requests that a node filter sees).
Task<Status> sync_image_dir(ImageSet* images);

/// Makes a layer read-only again that an operation made writable, and refreshes the graph's
/// permissions: until the refresh, its file keeps QEMU's write lock, and a QEMU process (a
/// backup of the frozen snapshot) could not open it. If the refresh fails, the writable
/// layer's permissions stay in force until the next one (logged).
Task<Status> back_to_read_only(ImageSet* images, Node* node);

/// Runs a blocking directory call on the set's offloader.
Task<Status> dir_call(ImageSet* images, std::function<Status()> call);

/// Removes each name from `store` (blocking; a name already gone is no error). Tries them all
/// and returns the first failure.
Status unlink_names(Store* store, const std::vector<std::string>& names);

/// The hidden name a layer gets while it is taken out of a chain.
std::string removing_name(const std::string& file);
/// True for names removing_name() produces.
bool is_removing_name(const std::string& file);
/// The name a removing_name() came from.
std::string visible_name_of(const std::string& hidden);
/// ".imgfs-FILE.creating": where a new overlay is written before it is renamed to FILE.
std::string creating_name(const std::string& file);
/// True for names creating_name() produces.
bool is_creating_name(const std::string& file);

/// Takes layers [first, last] of `e`'s chain out of it: afterwards the layer at `first - 1`
/// (the referrer) has `last + 1` as its backing file, or none if `last` is the bottom or
/// `drop_rest` is set. In a directory the layers' files are deleted; in a store whose files
/// have one name (a Ceph pool) they are renamed to their hidden names, and the caller deletes
/// them with remove_spliced() once it has closed them. Their nodes stay in the chain (the
/// caller detaches and closes them). The caller holds a drained section on the chain and
/// guarantees the referrer's new chain shows the same content as the old one.
Task<Status> splice_out(ImageSet* images, std::shared_ptr<Export> e, size_t first, size_t last,
                        bool drop_rest);

/// After splice_out() and the close of the layers it took out (`files`, their visible names):
/// deletes what the store still holds of them. Failures are logged; the next scan deletes what
/// is left.
Task<void> remove_spliced(ImageSet* images, std::vector<std::string> files);

/// Finishes a splice a crash interrupted after `referrer`'s header was pointed at hidden names
/// (steps 2 to 4 above): the visible names of those layers go (if still there), the referrer is
/// pointed at the first layer below them, and the hidden names go. Content stays the same: a
/// splice starts only once the referrer's new chain shows what the old one did. For chains no
/// export serves (the caller checks).
Task<Status> finish_interrupted_edit(ImageSet* images, std::string referrer);

/// Deletes a layer file that nothing references any more, durably.
Task<Status> remove_file(ImageSet* images, std::string file);

/// Removes what drop_top_file() hid; if that fails, a later scan removes it (logged).
Task<void> remove_hidden(ImageSet* images, std::string file);

/// What drop_top_file() did with a top leaving its chain.
enum class DroppedTop {
    kHidden,   // under its hidden name: remove_hidden() once it is closed
    kRemoved,  // gone already (hiding failed, removing worked)
    kKept,     // still there: nothing may write the layer below it (see drop_top_file)
};
/// Takes a top that stops being its chain's root out of the directory, durably, before
/// anything writes the layer below, while it may still be open: renamed to its hidden name
/// (from then on no scan serves it, and any scan may remove it), or if that fails, removed.
/// kKept if neither is durable, with the reasons in `why_kept`: a crash or a rescan would
/// then serve the top over the layer below again, so the caller must keep writes from
/// reaching that layer (fence the image) while the two still show the same bytes.
Task<DroppedTop> drop_top_file(ImageSet* images, std::string file, std::string* why_kept);

}  // namespace imgfs
