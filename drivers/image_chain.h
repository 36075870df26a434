// Opening an image and its backing chain from an image directory, safely: backing files are
// resolved relative to the overlay and opened beneath the directory (openat2 RESOLVE_BENEATH),
// `json:` and protocol names are refused, loops and chains deeper than a limit are refused, and
// the format is taken from the overlay's record or, failing that, from the content.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/json.h"
#include "core/node.h"
#include "core/unique_fd.h"
#include "drivers/chain_walk.h"
#include "drivers/fault.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/store.h"

namespace imgfs {

class Transaction;

/// A fault rule for a chain (debug mount option faults=FILE): which layers get it.
struct ChainFault {
    FaultRule rule;
    bool all_layers = false;  // else only the top layer
    std::string file;         // only the layer with this file name ("" = any)
    /// Not a filter rule: the file node's own fdatasync fails (rule.errnum from rule.nth on),
    /// so its real failure handling runs.
    bool fdatasync = false;
};

struct ChainOptions {
    bool read_only = false;  // also the top layer
    bool allow_external_backing = false;
    bool direct = false;  // O_DIRECT for every file
    qcow2::Options qcow2;
    uint32_t max_depth = kMaxChainDepth;
    /// A layer that some of these rules apply to gets a FaultNode between its format node and
    /// its file node, holding those rules (tests and debugging only).
    std::vector<ChainFault> faults;
    /// Tests (crash harness): if set, every layer's storage node is passed through this, which
    /// may put a filter over it (attached in `tx`) and return the filter.
    std::function<std::shared_ptr<Node>(NodeEnv env, Transaction* tx, std::shared_ptr<Node> file,
                                        const std::string& name)>
        wrap_file;
};

struct Layer {
    std::string file;     // relative to the image directory (absolute only if external)
    std::string format;   // "qcow2" or "raw"
    bool probed = false;  // the format was guessed from the content
    FileId id{};          // the file's identity in its store (StoreFile::id)
    std::shared_ptr<Node> node;
};

/// An open chain, top layer first. Destroying it drops the nodes; close() them first.
struct Chain {
    std::vector<Layer> layers;
    [[nodiscard]] const std::shared_ptr<Node>& top() const { return layers.front().node; }
};

/// Backing layers already open, so that chains sharing a base share its node (and the graph's
/// permissions see both users of it). Keyed by file; each entry is the chain from that layer
/// down.
struct LayerCache {
    std::map<std::string, std::vector<Layer>> chains;
};

/// Opens `file` (a name in `store`) and its whole backing chain. The top layer is writable
/// unless `options.read_only`; backing layers are read-only nodes over writable files, so a
/// job can later make one writable without reopening it. With `cache`, backing layers found
/// there are reused and newly opened ones are added.
/// `store` is only used during the call; the nodes keep what they opened. (It calls
/// store->open() on the loop: for a local directory an openat2 that does not wait for data.)
Task<Result<Chain>> open_chain(NodeEnv env, Store* store, std::string file, ChainOptions options,
                               LayerCache* cache = nullptr);

/// Closes every layer, top first (the top flushes its metadata).
Task<Status> close_chain(Chain* chain);

/// Writes one layer as a JSON object: file, format, virtual size, allocated size (left out if
/// it cannot be read) and what its driver describes. Shared by `imgfs info` and the info file.
Task<void> write_layer_json(JsonWriter* w, const Layer* layer);

/// Resolves the backing name recorded in the image at `overlay` (both relative to the image
/// directory, whose real path is `dir_real`) to a path relative to the directory. Errors name
/// the reason (json:, protocol, absolute outside, escaping with ..).
Result<std::string> resolve_backing(const std::string& overlay, const std::string& backing,
                                    const std::string& dir_real, bool allow_external);

/// Whether a resolved layer name is outside the store: a host path (a directory store's
/// allow_external_backing) or an image of another pool ("rbd:POOL/IMAGE").
bool is_external_layer(const std::string& file);

/// resolve_backing for a layer of `store`: a name in the store's own URL form ("rbd:POOL/IMAGE"
/// in a pool) is that file; an image of another pool is that image's canonical name if
/// `allow_external` (EPERM otherwise); other names resolve as above against the store's path.
Result<std::string> resolve_backing_in(const Store* store, const std::string& overlay,
                                       const std::string& backing, bool allow_external);

}  // namespace imgfs
