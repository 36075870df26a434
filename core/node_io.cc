// The generic request layer: what every node's public I/O entry points do before a driver sees
// the request. Bounds and overflow checks, zeros past EOF, read-modify-write of unaligned
// requests against the driver's alignment, splitting by max_transfer, and tracking of writes so
// that an RMW never overwrites a concurrent write's bytes.
#include <algorithm>
#include <cassert>
#include <cstring>

#include "core/node.h"

namespace imgfs {

namespace {

// A range ending past the largest file offset (2^63 - 1, what the kernel and every store can
// address) is refused with the overflows: below it, aligning an end up to any block size
// cannot wrap round to 0 (which turned a discard near 2^64 into one of the whole image).
bool add_overflows(uint64_t a, uint64_t b, uint64_t* sum) {
    return __builtin_add_overflow(a, b, sum) || *sum > uint64_t{INT64_MAX};
}

constexpr uint64_t kZeroChunkBytes = 1ULL << 20;

}  // namespace

bool Node::needs_tracking() const {
    // With byte alignment there is never a read-modify-write, so unless the driver asks for
    // serialised writes nothing can conflict and tracking would be pure overhead.
    return limits_.request_alignment > 1 || limits_.serialise_writes;
}

Task<Status> Node::read(uint64_t offset, MutBuf buf) {
    uint64_t end = 0;
    if (add_overflows(offset, buf.size(), &end)) {
        co_return make_error(EINVAL, "{}: read range overflows", name_);
    }
    if (buf.empty()) {
        co_return Status{};
    }
    InFlightGuard in_flight(this);
    if (end > size_) {
        uint64_t valid = offset >= size_ ? 0 : size_ - offset;
        std::memset(buf.data() + valid, 0, buf.size() - valid);
        buf = buf.first(valid);
        if (buf.empty()) {
            co_return Status{};
        }
    }
    const uint64_t align = limits_.request_alignment;
    if (is_aligned(offset, align) && is_aligned(buf.size(), align) &&
        is_aligned_ptr(buf.data(), limits_.memory_alignment)) {
        co_return co_await read_chunks(offset, buf);
    }
    // Unaligned: read the covering aligned range into a bounce buffer.
    uint64_t head = align_down(offset, align);
    uint64_t tail = align_up(offset + buf.size(), align);
    AlignedBuffer bounce(tail - head, std::max<size_t>(limits_.memory_alignment, 8));
    CO_TRY(co_await read_chunks(head, bounce.span()));
    std::memcpy(buf.data(), bounce.data() + (offset - head), buf.size());
    co_return Status{};
}

Task<Status> Node::read_chunks(uint64_t offset, MutBuf buf) {
    while (!buf.empty()) {
        size_t n = std::min<uint64_t>(buf.size(), limits_.max_transfer);
        CO_TRY(co_await do_read(offset, buf.first(n)));
        offset += n;
        buf = buf.subspan(n);
    }
    co_return Status{};
}

Task<Status> Node::write(uint64_t offset, ConstBuf buf) {
    uint64_t end = 0;
    if (add_overflows(offset, buf.size(), &end)) {
        co_return make_error(EINVAL, "{}: write range overflows", name_);
    }
    if (buf.empty()) {
        co_return Status{};
    }
    if (read_only_) {
        co_return make_error(EROFS, "{} is read-only", name_);
    }
    if (end > size_ && !caps_.resize) {
        co_return make_error(ENOSPC, "{}: write at {} of {} bytes is beyond the end ({} bytes)",
                             name_, offset, buf.size(), size_);
    }
    InFlightGuard in_flight(this);
    const uint64_t align = limits_.request_alignment;
    bool aligned = is_aligned(offset, align) && is_aligned(buf.size(), align) &&
                   is_aligned_ptr(buf.data(), limits_.memory_alignment);
    if (!needs_tracking()) {
        if (aligned) {
            co_return co_await write_chunks(offset, buf);
        }
        // Byte alignment, but the buffer is not where the driver can use it: copy it there.
        AlignedBuffer bounce(buf.size(), std::max<size_t>(limits_.memory_alignment, 8));
        std::memcpy(bounce.data(), buf.data(), buf.size());
        co_return co_await write_chunks(offset, bounce.span());
    }
    uint64_t head = align_down(offset, align);
    uint64_t tail = align_up(end, align);
    // An RMW reads and rewrites bytes around the request: nothing else may write them meanwhile.
    RangeLock::Request req(&tracked_, head, tail - head, !aligned || limits_.serialise_writes);
    co_await tracked_.acquire(&req);
    if (aligned) {
        co_return co_await write_chunks(offset, buf);
    }
    co_return co_await write_padded(offset, buf, &req);
}

Task<Status> Node::write_chunks(uint64_t offset, ConstBuf buf) {
    while (!buf.empty()) {
        size_t n = std::min<uint64_t>(buf.size(), limits_.max_transfer);
        CO_TRY(co_await do_write(offset, buf.first(n)));
        offset += n;
        buf = buf.subspan(n);
    }
    co_return Status{};
}

// Caller holds `req`, a serialising tracked request over the aligned range.
Task<Status> Node::write_padded(uint64_t offset, ConstBuf buf, const RangeLock::Request* req) {
    const uint64_t align = limits_.request_alignment;
    uint64_t head = align_down(offset, align);
    uint64_t tail = align_up(offset + buf.size(), align);
    AlignedBuffer bounce(tail - head, std::max<size_t>(limits_.memory_alignment, 8));
    // Only the partial first and last blocks need their old content.
    uint64_t last = tail - align;
    bool head_partial = head < offset;
    bool tail_partial = offset + buf.size() < tail;
    if (head_partial) {
        CO_TRY(co_await read_block_or_zero(head, bounce.subspan(0, align)));
    }
    if (tail_partial && !(head_partial && last == head)) {
        CO_TRY(co_await read_block_or_zero(last, bounce.subspan(last - head, align)));
    }
    std::memcpy(bounce.data() + (offset - head), buf.data(), buf.size());
    uint64_t old_size = size_;
    CO_TRY(co_await write_chunks(head, bounce.span()));
    // Padding past the old end grew the node to the alignment boundary; the caller asked for
    // its exact end. Cut only our own padding: not if the node ends past it (another write
    // grew it meanwhile), nor while any other request is tracked past our range (a write
    // there may be done in the storage before its completion is seen, and the cut would
    // drop it). Padding left in place reads as zeros, as the range past the end did.
    uint64_t wanted = std::max(old_size, offset + buf.size());
    if (caps_.resize && size_ == tail && tail > wanted &&
        !tracked_.any_overlap(tail, UINT64_MAX - tail, req)) {
        CO_TRY(co_await do_truncate(wanted));
    }
    co_return Status{};
}

Task<Status> Node::read_block_or_zero(uint64_t block, MutBuf dst) {
    if (block >= size_) {
        std::memset(dst.data(), 0, dst.size());
        co_return Status{};
    }
    co_return co_await do_read(block, dst);
}

Task<Status> Node::write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    uint64_t end = 0;
    if (add_overflows(offset, bytes, &end)) {
        co_return make_error(EINVAL, "{}: zero range overflows", name_);
    }
    if (bytes == 0) {
        co_return Status{};
    }
    if (read_only_) {
        co_return make_error(EROFS, "{} is read-only", name_);
    }
    if (end > size_ && !caps_.resize) {
        co_return make_error(ENOSPC, "{}: zeroing beyond the end ({} bytes)", name_, size_);
    }
    InFlightGuard in_flight(this);
    if (!caps_.write_zeroes) {
        co_return co_await write_zero_buffers(offset, bytes, ZeroPath::kGeneric);
    }
    // The one place where a zeroing request is cut to what the driver can zero in place.
    const uint64_t align = std::max<uint64_t>(limits_.request_alignment, limits_.zero_alignment);
    uint64_t inner_start = align_up(offset, align);
    uint64_t inner_end = align_down(end, align);
    if (inner_start >= inner_end) {
        co_return co_await write_zero_buffers(offset, bytes, ZeroPath::kGeneric);
    }
    if (offset < inner_start) {
        CO_TRY(co_await write_zero_buffers(offset, inner_start - offset, ZeroPath::kGeneric));
    }
    CO_TRY(co_await zeroes_in_place(inner_start, inner_end - inner_start, may_unmap));
    if (inner_end < end) {
        CO_TRY(co_await write_zero_buffers(inner_end, end - inner_end, ZeroPath::kGeneric));
    }
    co_return Status{};
}

Task<Status> Node::zeroes_in_place(uint64_t offset, uint64_t bytes, bool may_unmap) {
    if (!needs_tracking()) {
        co_return co_await do_write_zeroes(offset, bytes, may_unmap);
    }
    RangeLock::Request req(&tracked_, offset, bytes, limits_.serialise_writes);
    co_await tracked_.acquire(&req);
    co_return co_await do_write_zeroes(offset, bytes, may_unmap);
}

Task<Status> Node::write_zero_buffers(uint64_t offset, uint64_t bytes, ZeroPath path) {
    AlignedBuffer zeros =
        AlignedBuffer::zeroed(std::min<uint64_t>(align_up(bytes, 4096), kZeroChunkBytes),
                              std::max<size_t>(limits_.memory_alignment, 8));
    while (bytes > 0) {
        uint64_t n = std::min<uint64_t>(bytes, zeros.size());
        if (path == ZeroPath::kDriver) {
            n = std::min<uint64_t>(n, limits_.max_transfer);  // do_write gets no more
        }
        ConstBuf chunk(zeros.data(), n);
        // (Not a conditional expression of two tasks: g++ 12 destroys such a temporary twice.)
        if (path == ZeroPath::kGeneric) {
            CO_TRY(co_await write(offset, chunk));
        } else {
            CO_TRY(co_await do_write(offset, chunk));
        }
        offset += n;
        bytes -= n;
    }
    co_return Status{};
}

Task<Status> Node::discard(uint64_t offset, uint64_t bytes) {
    uint64_t end = 0;
    if (add_overflows(offset, bytes, &end)) {
        co_return make_error(EINVAL, "{}: discard range overflows", name_);
    }
    if (read_only_) {
        co_return make_error(EROFS, "{} is read-only", name_);
    }
    end = std::min(end, size_);
    const uint64_t align = limits_.request_alignment;
    uint64_t start = align_up(offset, align);
    end = align_down(end, align);
    if (!caps_.discard || start >= end) {
        co_return Status{};
    }
    InFlightGuard in_flight(this);
    if (!needs_tracking()) {
        co_return co_await do_discard(start, end - start);
    }
    RangeLock::Request req(&tracked_, start, end - start, limits_.serialise_writes);
    co_await tracked_.acquire(&req);
    co_return co_await do_discard(start, end - start);
}

Task<Status> Node::flush() {
    InFlightGuard in_flight(this);
    co_return co_await do_flush();
}

Task<Result<BlockStatus>> Node::block_status(uint64_t offset, uint64_t bytes) {
    if (offset >= size_ || bytes == 0) {
        co_return make_error(EINVAL, "{}: block status at {} is beyond the end ({} bytes)", name_,
                             offset, size_);
    }
    bytes = std::min(bytes, size_ - offset);
    if (!caps_.block_status) {
        co_return BlockStatus{Alloc::kData, bytes};
    }
    InFlightGuard in_flight(this);
    CO_TRY_ASSIGN(BlockStatus st, co_await do_block_status(offset, bytes));
    assert(st.bytes > 0);
    st.bytes = std::min(st.bytes, bytes);
    co_return st;
}

Task<Status> Node::truncate(uint64_t new_size) {
    if (read_only_) {
        co_return make_error(EROFS, "{} is read-only", name_);
    }
    if (!caps_.resize) {
        co_return make_error(ENOTSUP, "{}: the {} driver cannot resize", name_, driver_name());
    }
    InFlightGuard in_flight(this);
    if (!needs_tracking()) {
        co_return co_await do_truncate(new_size);
    }
    // Serialised against every write from the lower of the two ends up: a padded write there
    // reads and rewrites whole blocks and trims its own padding by the size it saw, and either
    // would undo a size change made in between. Writes below both ends are not affected. The
    // range is fixed before the wait; if a size change ahead of this one lowered the end
    // meanwhile, the range no longer reaches it: taken again from there.
    for (;;) {
        const uint64_t from = std::min(size_, new_size);
        RangeLock::Request req(&tracked_, from, UINT64_MAX - from, true);
        co_await tracked_.acquire(&req);
        if (std::min(size_, new_size) >= from) {
            co_return co_await do_truncate(new_size);
        }
    }
}

Task<Status> Node::close() {
    if (closed_) {
        co_return Status{};
    }
    closed_ = true;
    InFlightGuard in_flight(this);
    Status st = co_await do_close();
    // A format driver's storage is its alone, and is released with it: now, not when the last
    // reference goes. A pool refuses to remove an RBD image that is still open, and an RBD
    // node left to its destructor would close the image on the loop, waiting on the cluster.
    Child* storage = file();
    if (storage != nullptr && storage->node()->parents().size() == 1) {
        Status storage_closed = co_await storage->node()->close();
        if (st) {
            st = std::move(storage_closed);
        }
    }
    co_return st;
}

}  // namespace imgfs
