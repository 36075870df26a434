// ImageSet: the images of one image directory and which of them are exported. A scan finds the
// image files (.qcow2 .qcow .img .raw, not in subfolders), works out which are layers (some other
// image uses them as backing) and which are roots, names each root's export (file name without
// extension, cut at the first '@'), refuses names two roots want, and opens every exported chain
// with shared layers. Broken images are reported and skipped; the others are exported.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <sys/types.h>

#include "core/backend.h"
#include "core/json.h"
#include "drivers/image_chain.h"

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
    std::function<void(int dir_fd, bool done)> sync_dir_observer;
};

class Job;

/// One exported chain: NAME.raw and its control files.
struct Export {
    uint64_t id = 0;   // unique for the lifetime of the set (inode numbers derive from it)
    std::string name;  // NAME in NAME.raw
    Chain chain;       // top layer first; chain.layers[0].file is the root file
    std::unique_ptr<BlockBackend> backend;
    std::string last_error;  // the last refused or failed control operation, for info
    Job* job = nullptr;      // the running or last job on this image (owned by the job manager)
};

class ImageSet {
  public:
    /// `dir_fd` stays open for the set's lifetime; `dir_path` is for messages.
    ImageSet(NodeEnv env, UniqueFd dir_fd, std::string dir_path, ImageSetOptions options);
    ImageSet(const ImageSet&) = delete;
    ImageSet& operator=(const ImageSet&) = delete;
    ~ImageSet();

    /// Scans the directory (again): exports new roots, drops exports whose root is gone (unless
    /// open). Fails only if the directory cannot be read.
    Task<Status> scan();
    /// Flushes and closes every chain (shutdown).
    Task<Status> close_all();

    [[nodiscard]] const std::vector<std::unique_ptr<Export>>& exports() const { return exports_; }
    [[nodiscard]] Export* find(std::string_view name) const;
    [[nodiscard]] Export* find_id(uint64_t id) const;
    /// What the last scan could not export, one line each.
    [[nodiscard]] const std::vector<std::string>& problems() const { return problems_; }
    [[nodiscard]] int dir_fd() const { return dir_fd_.get(); }
    [[nodiscard]] const std::string& dir_path() const { return dir_path_; }
    [[nodiscard]] const ImageSetOptions& options() const { return options_; }
    [[nodiscard]] const NodeEnv& env() const { return env_; }
    [[nodiscard]] LayerCache* layer_cache() { return &cache_; }

    /// The info JSON of an export (DESIGN.md §2.2).
    Task<std::string> info_json(Export* e);
    /// Held while a new overlay is written under its creating_name(): a scan then leaves such
    /// names alone. With none held, a scan of a writable set removes them as crash leftovers.
    class CreatingGuard {
      public:
        explicit CreatingGuard(ImageSet* set) : set_(set) { ++set_->creating_in_flight_; }
        CreatingGuard(const CreatingGuard&) = delete;
        CreatingGuard& operator=(const CreatingGuard&) = delete;
        ~CreatingGuard() { --set_->creating_in_flight_; }

      private:
        ImageSet* set_;
    };

    /// Every export whose chain contains the node (other than `except`).
    [[nodiscard]] std::vector<Export*> users_of(const Node* node, const Export* except) const;

  private:
    struct Candidate;
    Result<std::vector<Candidate>> list_candidates();
    Status collect_layers(const std::string& file, std::set<std::pair<dev_t, ino_t>>* layers);
    Task<Status> open_export(std::string root, std::string name);
    Task<void> remove_export(Export* e);
    void forget_unused_layers();
    void remove_leftovers(const std::set<std::pair<dev_t, ino_t>>& layers);

    NodeEnv env_;
    UniqueFd dir_fd_;
    std::string dir_path_;
    std::string dir_real_;
    ImageSetOptions options_;
    LayerCache cache_;
    std::vector<std::unique_ptr<Export>> exports_;
    std::vector<std::string> problems_;
    std::vector<std::string> hidden_;    // ".imgfs-*.removing" names seen by the last listing
    std::vector<std::string> creating_;  // ".imgfs-*.creating" names seen by the last listing
    int creating_in_flight_ = 0;
    uint64_t next_id_ = 1;
};

/// Export name of a root file: without extension, cut at the first '@'.
std::string export_name_of(const std::string& file);
/// True for the file names a scan considers (.qcow2 .qcow .img .raw).
bool is_image_file_name(const std::string& file);

}  // namespace imgfs
