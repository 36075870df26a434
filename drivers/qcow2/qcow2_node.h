// qcow2: the format driver. Glue only: the mapping core (Metadata) says where bytes are and
// plans allocations; this node does the data I/O, copy-on-write, decompression and backing reads,
// and serialises writes that allocate.
//
// Concurrency: every write holds a tracked range over the guest clusters it touches, in
// alloc_lock_. Writes that only rewrite clusters in place hold it non-serialising; writes that
// allocate, and zeroing or discarding, hold it serialising. So two writes to the same unallocated
// cluster never both allocate, and no cluster is freed or replaced under an in-place write.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "core/node.h"
#include "core/range_lock.h"
#include "drivers/qcow2/create.h"
#include "drivers/qcow2/metadata.h"

namespace imgfs {

class Transaction;

class Qcow2Node final : public Node {
  public:
    /// Creates the node with `file` as its storage (in `tx`). After the transaction commits,
    /// load() reads the image; nothing else may be called before it succeeds.
    static std::shared_ptr<Qcow2Node> create(NodeEnv env, std::string name, Transaction* tx,
                                             std::shared_ptr<Node> file, qcow2::Options options);
    Qcow2Node(NodeEnv env, std::string name, qcow2::Options options);
    ~Qcow2Node() override;

    Task<Status> load();

    [[nodiscard]] const char* driver_name() const override { return "qcow2"; }
    [[nodiscard]] const qcow2::Header& header() const { return meta_->header(); }
    [[nodiscard]] qcow2::Metadata* metadata() const { return meta_.get(); }
    /// The backing file name as the header records it (empty: none).
    [[nodiscard]] std::string backing_file_name() const override {
        return meta_->header().backing_file;
    }
    [[nodiscard]] std::optional<std::string> backing_format() const override {
        return meta_->header().backing_format;
    }

    /// Rewrites the header's backing file name and format (jobs: after a commit or stream).
    Task<Status> set_backing_name(std::string name, std::optional<std::string> format) override;

    /// The layout a new overlay over `backing` takes from it (cluster size, extended L2), so
    /// that a user's choice carries over to every snapshot. Over a raw layer, qemu-img's
    /// defaults. Here because only this driver knows what its layers' layout is.
    static void inherit_layout(const Node& backing, qcow2::CreateOptions* options);

    void describe(JsonWriter* out) const override;
    Task<Status> set_writable(bool writable) override;
    [[nodiscard]] bool claim_pending() const override {
        return meta_deferred_ || Node::claim_pending();
    }
    /// Claims the file, then rereads the metadata if the file was newly claimed or the node
    /// has only read it so far (see meta_deferred_).
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
    Task<Status> zero_before_growing(uint64_t old_size, uint64_t new_size);
    Task<Status> do_close() override;

  private:
    /// Recomputes the graph's permissions for this node's current state (read_only_).
    Status refresh_permissions();
    /// This layer's content (with backing data where it has none); zeros past the end.
    Task<Status> read_guest(uint64_t offset, MutBuf buf);
    Task<Status> read_compressed(qcow2::ReadExtent x, uint64_t offset, MutBuf buf);
    Task<Status> read_backing(uint64_t offset, MutBuf buf);
    /// Writes one piece within a single L2 table.
    Task<Result<uint64_t>> write_piece(uint64_t offset, ConstBuf buf);
    Task<Status> write_allocated(qcow2::WritePlan plan, ConstBuf data);
    Task<Status> deallocate(uint64_t offset, uint64_t bytes, qcow2::DeallocMode mode);
    Task<Status> check_in_place(qcow2::WritePlan plan);
    /// EROFS before claim_writes() (see meta_deferred_), EIO on an image marked corrupt.
    Status check_writes_allowed() const;
    /// Replaces the metadata with a fresh read of the image (nothing cached is dirty, and no
    /// request is in flight: the caller claims in a drained section).
    Task<Status> reload_metadata();

    qcow2::Options options_;
    std::unique_ptr<qcow2::Metadata> meta_;
    // A writable node whose file was not claimed at open (another host may write the image
    // until it is) holds read-only metadata: reading the image is all it may do until
    // claim_writes() rereads it for writing. A read-write open could repair or rewrite the
    // header, which is writing.
    bool meta_deferred_ = false;
    RangeLock alloc_lock_;  // guest byte ranges
    // The last cluster decompressed, so sequential small reads decompress it once.
    uint64_t decompressed_host_ = 0;
    uint64_t decompressed_bytes_ = 0;
    AlignedBuffer decompressed_;
};

}  // namespace imgfs
