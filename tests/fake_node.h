// MemNode: an in-memory node for tests of the graph and the generic layer. It records what the
// driver entry points saw, can demand alignment, and can hold requests at a gate so tests can
// keep I/O in flight for as long as they like.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/event_loop.h"
#include "core/json.h"
#include "core/node.h"
#include "core/wait_queue.h"

namespace imgfs::test {

class MemNode final : public Node {
  public:
    MemNode(NodeEnv env, std::string name, uint64_t size, Limits limits = {})
        : Node(env, std::move(name)), data(size), gate_(env.loop) {
        size_ = size;
        limits_ = limits;
        caps_.write_zeroes = true;
        caps_.discard = true;
    }
    [[nodiscard]] const char* driver_name() const override { return "mem"; }

    void set_read_only(bool ro) { read_only_ = ro; }
    /// While held, every request waits inside the driver until release().
    void hold() { held_ = true; }
    void release() {
        held_ = false;
        gate_.notify_all();
    }

    std::vector<uint8_t> data;
    int active = 0;
    int max_active = 0;
    uint64_t requests = 0;
    bool misaligned_seen = false;
    bool oversize_seen = false;
    bool unaligned_memory_seen = false;  // a buffer not at limits.memory_alignment
    uint64_t zeroed_in_place = 0;        // bytes do_write_zeroes was given
    /// do_write_zeroes writes zero buffers itself (ZeroPath::kDriver), as qcow2 does.
    bool zero_by_writing = false;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override {
        check_memory(buf.data());
        co_await enter(offset, buf.size(), true);
        uint64_t n =
            offset < data.size() ? std::min<uint64_t>(buf.size(), data.size() - offset) : 0;
        std::memcpy(buf.data(), data.data() + offset, n);
        std::memset(buf.data() + n, 0, buf.size() - n);
        leave();
        co_return Status{};
    }
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override {
        check_memory(buf.data());
        co_await enter(offset, buf.size(), true);
        std::memcpy(data.data() + offset, buf.data(), buf.size());
        leave();
        co_return Status{};
    }
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool) override {
        if (offset % limits_.zero_alignment != 0 || bytes % limits_.zero_alignment != 0) {
            misaligned_seen = true;
        }
        if (zero_by_writing) {
            co_return co_await write_zero_buffers(offset, bytes, ZeroPath::kDriver);
        }
        zeroed_in_place += bytes;
        co_await enter(offset, bytes, false);
        std::memset(data.data() + offset, 0, bytes);
        leave();
        co_return Status{};
    }
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override {
        co_await enter(offset, bytes, false);
        leave();
        co_return Status{};
    }
    Task<Status> do_flush() override { co_return Status{}; }

  private:
    void check_memory(const void* p) {
        if (reinterpret_cast<uintptr_t>(p) % limits_.memory_alignment != 0) {
            unaligned_memory_seen = true;
        }
    }
    Task<void> enter(uint64_t offset, uint64_t bytes, bool transfer) {
        ++requests;
        if (offset % limits_.request_alignment != 0 || bytes % limits_.request_alignment != 0) {
            misaligned_seen = true;
        }
        if (transfer && bytes > limits_.max_transfer) {
            oversize_seen = true;
        }
        ++active;
        max_active = std::max(max_active, active);
        while (held_) {
            co_await gate_.wait();
        }
    }
    void leave() { --active; }

    bool held_ = false;
    WaitQueue gate_;
};

}  // namespace imgfs::test
