// raw: the raw format over a storage node. A pass-through, except for one guard: a write that
// would put a known image magic into the first sector is refused, so a guest cannot turn its
// disk into, say, a qcow2 with a backing file of its choosing on the next open. QEMU guards only
// images whose format it guessed; here every raw layer is guarded, because a raw layer whose
// format an overlay records becomes a root again after a commit into it or once the overlay is
// deleted, and a root's format is always guessed.
#pragma once

#include <memory>
#include <string>

#include "core/node.h"

namespace imgfs {

class Transaction;

struct RawOptions {
    bool probed = false;  // the format was guessed (shown by describe())
    bool read_only = false;
};

class RawNode final : public Node {
  public:
    /// Creates the node and attaches `file` as its storage in `tx`.
    static std::shared_ptr<RawNode> open(NodeEnv env, std::string name, Transaction* tx,
                                         std::shared_ptr<Node> file, RawOptions options);
    RawNode(NodeEnv env, std::string name, RawOptions options);

    [[nodiscard]] const char* driver_name() const override { return "raw"; }
    void describe(JsonWriter* out) const override;
    Task<Status> set_writable(bool writable) override;
    /// Claims the file, and takes its size again if newly claimed (another host may have
    /// resized it).
    Task<Result<bool>> claim_writes() override;
    void child_perm(const Child& child, Perms node_perm, Perms node_shared, Perms* perm,
                    Perms* shared) const override;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    void init_from_file();

    RawOptions options_;
};

/// The name of the image format whose magic starts `sector`, or null. Used by the raw guard and
/// by format detection.
const char* detect_image_magic(ConstBuf sector);

}  // namespace imgfs
