// BlockBackend: the root user of a chain (the FUSE export of NAME.raw, or a test). Its requests
// wait while a drained section holds the chain, and are counted while in flight.
#pragma once

#include <string>

#include "core/node.h"

namespace imgfs {

class Transaction;

class BlockBackend final : public ChildOwner {
  public:
    BlockBackend(Executor* executor, std::string name)
        : ChildOwner(executor), name_(std::move(name)) {}

    /// Attaches the backend to `node` with `perm`, sharing `shared` (in `tx`).
    Child* attach(Transaction* tx, std::shared_ptr<Node> node, Perms perm, Perms shared);

    [[nodiscard]] std::string owner_name() const override { return "backend " + name_; }
    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] Child* root() const { return child(ChildRole::kUser); }
    [[nodiscard]] Node* root_node() const { return root() != nullptr ? root()->node() : nullptr; }
    [[nodiscard]] uint64_t size() const { return root_node() != nullptr ? root_node()->size() : 0; }
    [[nodiscard]] bool writable() const;

    Task<Status> read(uint64_t offset, MutBuf buf);
    Task<Status> write(uint64_t offset, ConstBuf buf);
    Task<Status> write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap);
    Task<Status> discard(uint64_t offset, uint64_t bytes);
    Task<Status> flush();
    Task<Status> truncate(uint64_t new_size);

    // Open files on the export; revert is refused while any is open.
    void open_file() { ++open_count_; }
    void release_file() { --open_count_; }
    [[nodiscard]] int open_count() const { return open_count_; }

  private:
    Status check_writable() const;

    std::string name_;
    int open_count_ = 0;
};

}  // namespace imgfs
