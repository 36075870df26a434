// The rules every walk down a backing chain obeys, wherever it runs (opening a chain on the
// event loop, a scan of the image directory on the offload thread): a chain holds at most
// kMaxChainDepth layers, and no file appears twice in one chain. Files are told apart by
// device and inode, not by name, because a layer may be reached under a second name (a hard
// link a chain edit made, a symlink inside the directory).
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <utility>

#include <sys/types.h>

#include "core/result.h"

namespace imgfs {

/// A file's identity: device and inode.
using FileId = std::pair<dev_t, ino_t>;

/// The deepest chain imgfs opens (QEMU's own limit is far higher; a deeper chain is almost
/// always a mistake, and every layer costs a file descriptor and a read on every miss).
inline constexpr uint32_t kMaxChainDepth = 64;

/// One walk from a top image downwards. Not thread-safe; one per walk.
class ChainWalk {
  public:
    explicit ChainWalk(std::string top, uint32_t max_depth = kMaxChainDepth);

    /// Whether the chain may take one more layer.
    [[nodiscard]] bool room_for_more() const { return depth_ < max_depth_; }
    /// ELOOP naming the top image if the chain may take no more layers, else success.
    [[nodiscard]] Status check_depth() const;
    /// Records the next layer down (the top first). ELOOP if the file is already in this
    /// chain; the message shows the walk so far ("a -> b -> a") but not the top image's name,
    /// which the caller puts in front as its context requires.
    [[nodiscard]] Status enter(const std::string& file, FileId id);
    /// Layers entered so far.
    [[nodiscard]] uint32_t depth() const { return depth_; }

  private:
    std::string top_;
    std::string path_;  // the walk so far, for the loop message
    std::set<FileId> ids_;
    uint32_t max_depth_;
    uint32_t depth_ = 0;
};

}  // namespace imgfs
