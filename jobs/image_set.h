// ImageSet: the images of one image directory and which of them are exported. A scan finds the
// image files (.qcow2 .qcow .img .raw, not in subfolders), works out which are layers (some other
// image uses them as backing) and which are roots, names each root's export (file name without
// extension, cut at the first '@'), refuses names two roots want, and opens every exported chain
// with shared layers. Broken images are reported and skipped; the others are exported.
//
// Control-plane rule (docs/contributing.md, "Graph changes"): every operation that changes an
// image's graph or its files holds that image's `Export::ops` lock for the change; a scan holds
// the directory lock and then every export's lock, taken in ascending id order (as a group
// snapshot takes its images), so no two such operations interleave on one image and no two of
// them can deadlock. Exports are shared: a request or operation holds its Export alive until it
// is done, and one that waited for the lock checks `removed` before it acts.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/backend.h"
#include "core/json.h"
#include "core/offload.h"
#include "core/task_scope.h"
#include "core/timed_mutex.h"
#include "drivers/image_chain.h"
#include "jobs/scan_plan.h"

namespace imgfs {

struct ImageSetOptions {
    bool read_only = false;
    bool allow_external_backing = false;
    bool direct = false;
    qcow2::Options qcow2;
    std::vector<ChainFault> faults;  // debug: fault rules for every chain opened (see ChainOptions)
    /// Tests: wraps every image's storage node, also of new snapshot overlays (see ChainOptions).
    decltype(ChainOptions::wrap_file) wrap_file;
    /// Tests: called right before (`done` false) and after (`done` true) every fsync of the
    /// image directory, so a crash harness can take a crash point there.
    std::function<void(bool done)> sync_dir_observer;
    /// How long a snapshot, revert or rescan waits for another operation on the same image (or
    /// another rescan) before it gives up with EBUSY.
    std::chrono::milliseconds op_wait{10000};
};

class Job;
struct ScanPlan;

/// The reason each recent writer of a control file was refused, by the caller's thread id as
/// FUSE names it, newest last. Clients that race each other each find their own reason here,
/// where the image's last error is whoever failed last (and a success clears it).
class CallerErrors {
  public:
    static constexpr size_t kKept = 16;  // writers remembered; the oldest is forgotten first
    /// A refusal of `caller`, or with `reason` empty, its success (its entry goes).
    void set(uint32_t caller, std::string reason);
    void write_json(JsonWriter* w) const;  // {"PID":"reason",...}

  private:
    std::deque<std::pair<uint32_t, std::string>> entries_;
};

/// One exported chain: NAME.raw and its control files.
struct Export {
    Export(uint64_t export_id, std::string export_name, EventLoop* loop, TaskScope* timers)
        : id(export_id), name(std::move(export_name)), ops(loop, timers) {}

    const uint64_t id;       // unique for the lifetime of the set (inode numbers derive from it)
    const std::string name;  // NAME in NAME.raw
    Chain chain;             // top layer first; chain.layers[0].file is the root file
    std::unique_ptr<BlockBackend> backend;
    std::string last_error;      // the last refused or failed control operation, for info
    CallerErrors caller_errors;  // the last refusal of each recent writer, for info
    std::shared_ptr<Job> job;    // the running or last job on this image
    /// Held by every graph change of this image (see the rule above).
    TimedMutex ops;
    /// Set under `ops` when the export is taken away.
    bool removed = false;
    /// What the last scan found wrong with the chain on disk (a layer missing or replaced, a
    /// header naming another backing file), or "".
    std::string chain_mismatch;
};

class ImageSet {
  public:
    /// The images of `store` (the image directory), which the set owns.
    ImageSet(NodeEnv env, std::unique_ptr<Store> store, ImageSetOptions options);
    ImageSet(const ImageSet&) = delete;
    ImageSet& operator=(const ImageSet&) = delete;
    /// close_all() must have run (it joins the lock timers).
    ~ImageSet();

    /// Scans the directory (again): exports new roots, drops exports whose root is gone (unless
    /// open or busy with a job), reports chains that differ on disk from what is served, and
    /// removes what an interrupted chain edit left behind. Fails if the directory cannot be
    /// read, or with EBUSY if another scan did not finish in time.
    ///
    /// `lock_grace` is how long an image that another process's lock keeps from being exported
    /// is tried again before it is reported in use. The scan at mount time gives one (see
    /// kMountLockGrace): a daemon killed a moment before still holds its locks until the kernel
    /// has finished the I/O it left in flight. A rescan a user asks for gives none.
    Task<Status> scan(std::chrono::milliseconds lock_grace = std::chrono::milliseconds{0});
    static constexpr std::chrono::milliseconds kMountLockGrace{2000};
    /// Flushes and closes every chain (shutdown; the store is told: Store::begin_closing).
    /// Fails (EIO) if a layer did not flush or close cleanly: each one is logged, and writes
    /// not acknowledged by fsync may be lost.
    Task<Status> close_all();

    [[nodiscard]] const std::vector<std::shared_ptr<Export>>& exports() const { return exports_; }
    [[nodiscard]] std::shared_ptr<Export> find(std::string_view name) const;
    [[nodiscard]] std::shared_ptr<Export> find_id(uint64_t id) const;
    /// What the last scan could not export or found wrong (.control/skipped, imgfs status).
    [[nodiscard]] const std::vector<ScanProblem>& problems() const { return problems_; }
    /// The image directory. Its calls block: run them on offloader(), except where the Store
    /// interface says otherwise.
    [[nodiscard]] Store* store() const { return store_.get(); }
    [[nodiscard]] const std::string& dir_path() const { return store_->display_name(); }
    [[nodiscard]] const ImageSetOptions& options() const { return options_; }
    [[nodiscard]] const NodeEnv& env() const { return env_; }
    [[nodiscard]] LayerCache* layer_cache() { return &cache_; }
    /// Where blocking directory calls run.
    [[nodiscard]] Offloader* offloader() { return &offloader_; }

    /// `e`'s lock for a short operation (bounded by options().op_wait): EBUSY naming `what`
    /// if another operation keeps it too long, ENODEV if the export went away meanwhile.
    Task<Result<TimedMutex::Guard>> lock_export(std::shared_ptr<Export> e, std::string what);
    /// Makes this host the writer of `e`'s chain before a write (BlockBackend::claim_writes),
    /// under the export's lock so that no graph change runs meanwhile. `op` names the write.
    Task<Status> claim_writes(std::shared_ptr<Export> e, std::string op);
    /// Checks, off the event loop, that the files on disk still form the chain `e` serves.
    /// Fails with EIO and the reason if not: an operation then stops before it touches anything.
    Task<Status> verify_chain(std::shared_ptr<Export> e);
    /// Layers that left `e`'s chain: closes each that no other export uses, forgets them, and
    /// drops the references, so their files are closed and their image locks released now.
    Task<void> retire_layers(std::vector<Layer> layers, const Export* e);
    /// Marks `e` failed (its I/O gets EIO with `reason`), logs it; every other export serves on.
    void fence(Export* e, const std::string& reason);

    /// The info JSON of an export (docs/design.md §3.2).
    Task<std::string> info_json(std::shared_ptr<Export> e);
    /// What info reports as the mount's transport (set by the layer that serves the mount).
    void set_transport(std::function<std::string()> describe) { transport_ = std::move(describe); }

    /// Held while a chain edit has names in the directory that a scan would take for leftovers
    /// (a new overlay under its creating_name(), hidden .removing links): with any held, a scan
    /// leaves those names alone.
    class EditGuard {
      public:
        explicit EditGuard(ImageSet* set) : set_(set) { ++set_->edits_in_flight_; }
        EditGuard(const EditGuard&) = delete;
        EditGuard& operator=(const EditGuard&) = delete;
        ~EditGuard() { --set_->edits_in_flight_; }

      private:
        ImageSet* set_;
    };

    /// Every export (other than `except`) whose chain contains the layer: its node, or
    /// another node opened on the same file.
    [[nodiscard]] std::vector<Export*> users_of(const Layer& layer, const Export* except) const;
    /// Offers the backing layers of `chain` to chains opened later, so that they share these
    /// nodes (a snapshot made the old top one).
    void share_backing_layers(const Chain& chain);
    /// While a commit runs, the layers between its top and its base read differently from one
    /// moment to the next (the base below them takes in the layers above): no chain opened
    /// later may go through them. Nor through the layers a finishing stream deletes. `why`
    /// names the job in the refusal.
    void mark_changing(FileId id, std::string why) { changing_[id] = std::move(why); }
    void unmark_changing(FileId id) { changing_.erase(id); }
    /// The images of the store no export serves whose chains reach one of the files `ids`
    /// (another host's chain in a pool, an image a scan could not export), from their headers,
    /// on the offload thread. Fails if one of them cannot be read: a user might go unseen.
    Task<Result<std::vector<UnservedUser>>> unserved_users_of(std::set<FileId> ids);

  private:
    struct Locked;
    Task<Locked> lock_all();
    Task<void> apply_scan(ScanPlan plan, std::vector<std::shared_ptr<Export>> locked,
                          std::chrono::steady_clock::time_point lock_deadline);
    Task<Status> open_export(std::string root, std::string name,
                             std::chrono::steady_clock::time_point lock_deadline);
    // One attempt of open_export, which repeats it while a lock refuses it until
    // `lock_deadline`.
    Task<Status> try_open_export(std::string root, std::string name);
    Task<void> remove_export(std::shared_ptr<Export> e);
    void forget_unused_layers();
    void log_problems();

    NodeEnv env_;
    std::unique_ptr<Store> store_;
    ImageSetOptions options_;
    LayerCache cache_;
    std::vector<std::shared_ptr<Export>> exports_;
    std::vector<ScanProblem> problems_;
    std::map<FileId, std::string> changing_;  // see mark_changing()
    int edits_in_flight_ = 0;
    uint64_t next_id_ = 1;
    uint64_t failed_closes_ = 0;  // layers whose close() failed (see close_all())
    std::function<std::string()> transport_;
    // Declared after nothing that uses them: exports' locks run their timers in timers_.
    TaskScope timers_;
    TimedMutex scan_lock_;
    Offloader offloader_;
};

/// Export name of a root file: without extension, cut at the first `snapshot_separator`
/// (StoreCaps: '@' in a directory, '~' in a pool).
std::string export_name_of(const std::string& file, char snapshot_separator);
/// True for the file names a scan considers (.qcow2 .qcow .img .raw).
bool is_image_file_name(const std::string& file);

/// Writes "io_error": the last failed request of an export (null if none), for info.
void write_io_error(JsonWriter* w, const IoFailure& failure);

}  // namespace imgfs
