// null: a node of a given size that stores nothing. Reads return zeros (or leave the buffer as
// it is, for benchmarks that want no memset); writes succeed at once.
#pragma once

#include <memory>
#include <string>

#include "core/node.h"

namespace imgfs {

struct NullOptions {
    uint64_t size = 1ULL << 30;
    bool read_zeroes = true;
};

class NullNode final : public Node {
  public:
    NullNode(NodeEnv env, std::string name, NullOptions options);
    [[nodiscard]] const char* driver_name() const override { return "null"; }

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    NullOptions options_;
};

}  // namespace imgfs
