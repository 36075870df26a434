#include "drivers/qcow2/qcow2_node.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "core/event_loop.h"
#include "core/json.h"
#include "core/transaction.h"
#include "drivers/qcow2/compress.h"

namespace imgfs {

using qcow2::DeallocMode;
using qcow2::ReadExtent;
using qcow2::WritePlan;

namespace {

constexpr uint64_t kBounceLimitBytes = 8ULL << 20;

}  // namespace

std::shared_ptr<Qcow2Node> Qcow2Node::create(NodeEnv env, std::string name, Transaction* tx,
                                             std::shared_ptr<Node> file, qcow2::Options options) {
    auto node = std::make_shared<Qcow2Node>(env, std::move(name), options);
    tx->attach(node.get(), std::move(file), ChildRole::kFile, "file");
    return node;
}

Qcow2Node::Qcow2Node(NodeEnv env, std::string name, qcow2::Options options)
    : Node(env, std::move(name)), options_(options), alloc_lock_(env.loop) {
    read_only_ = options.read_only;
}

Qcow2Node::~Qcow2Node() = default;

Task<Status> Qcow2Node::load() {
    qcow2::Options options = options_;
    meta_deferred_ = !read_only_ && Node::claim_pending();
    options.read_only = read_only_ || meta_deferred_;
    CO_TRY_ASSIGN(meta_, co_await qcow2::Metadata::open(env_, file(), name(), options));
    size_ = meta_->size();
    limits_ = Limits{};
    limits_.zero_alignment = meta_->dealloc_granularity();  // the zero flag covers granules
    caps_.write_zeroes = true;
    caps_.discard = true;
    caps_.block_status = true;
    caps_.resize = !read_only_;
    caps_.backing_name = true;
    co_return Status{};
}

void Qcow2Node::child_perm(const Child& child, Perms node_perm, Perms node_shared, Perms* perm,
                           Perms* shared) const {
    if (child.role() == ChildRole::kFile) {
        // An image opened for writing keeps write access to its file even while nobody writes
        // through it: metadata (dirty bits, repairs, header rewrites) may need it.
        *perm = perm::kConsistentRead;
        if (!read_only_) {
            *perm |= perm::kWrite | perm::kResize;
        }
        *shared = perm::kConsistentRead | perm::kWriteUnchanged;
        return;
    }
    Node::child_perm(child, node_perm, node_shared, perm, shared);
}

void Qcow2Node::describe(JsonWriter* out) const {
    const qcow2::Header& h = meta_->header();
    out->field("version", h.version);
    out->field("cluster_size", h.cluster_size());
    out->field("refcount_bits", 1U << h.refcount_order);
    out->field("extended_l2", h.extended_l2());
    out->field("compression",
               h.compression_type == qcow2::CompressionType::kZstd ? "zstd" : "zlib");
    out->field("lazy_refcounts", (h.compatible & qcow2::kCompatLazyRefcounts) != 0);
    out->field("dirty", (h.incompatible & qcow2::kIncompatDirty) != 0);
    out->field("corrupt", (h.incompatible & qcow2::kIncompatCorrupt) != 0 || meta_->corrupt());
    out->field("snapshots", uint64_t{h.nb_snapshots});
    if (!h.backing_file.empty()) {
        out->field("backing_file", h.backing_file);
        if (h.backing_format) {
            out->field("backing_format", *h.backing_format);
        }
    }
}

// ---- reads ----

Task<Status> Qcow2Node::read_backing(uint64_t offset, MutBuf buf) {
    if (Child* b = backing()) {
        co_return co_await b->read(offset, buf);  // zeros past a shorter backing file
    }
    std::memset(buf.data(), 0, buf.size());
    co_return Status{};
}

Task<Status> Qcow2Node::read_compressed(ReadExtent x, uint64_t offset, MutBuf buf) {
    const uint64_t cs = meta_->geometry().cluster_size;
    if (decompressed_bytes_ == 0 || decompressed_host_ != x.compressed.host_offset ||
        decompressed_bytes_ != x.compressed.bytes || decompressed_.size() != cs) {
        uint64_t file_size = file()->node()->size();
        uint64_t len = std::min(x.compressed.bytes, file_size - x.compressed.host_offset);
        AlignedBuffer in(len);
        CO_TRY(co_await file()->read(x.compressed.host_offset, in.span()));
        AlignedBuffer out(cs);
        Status st =
            qcow2::decompress_cluster(meta_->header().compression_type, in.span(), out.span());
        if (!st) {
            co_return make_error(EIO, "{}: compressed cluster at guest offset {:#x}: {}", name(),
                                 x.cluster_guest_offset, st.error().context);
        }
        decompressed_ = std::move(out);
        decompressed_host_ = x.compressed.host_offset;
        decompressed_bytes_ = x.compressed.bytes;
    }
    std::memcpy(buf.data(), decompressed_.data() + (offset - x.cluster_guest_offset), buf.size());
    co_return Status{};
}

Task<Status> Qcow2Node::read_guest(uint64_t offset, MutBuf buf) {
    if (offset + buf.size() > size_) {
        uint64_t valid = offset >= size_ ? 0 : size_ - offset;
        std::memset(buf.data() + valid, 0, buf.size() - valid);
        buf = buf.first(valid);
    }
    while (!buf.empty()) {
        // Taken before map(): the clusters it names are held until the read is done. map()
        // can suspend after reading the entry (checking the refcounts of clusters past the
        // end of the file), and a cluster freed and handed out again meanwhile would show the
        // read another region's data.
        const uint64_t ticket = meta_->begin_data_read();
        Result<ReadExtent> mapped = co_await meta_->map(offset, buf.size());
        if (!mapped || (mapped->kind != ReadExtent::Kind::kData &&
                        mapped->kind != ReadExtent::Kind::kCompressed)) {
            meta_->end_data_read(ticket);  // nothing of this file to read
        }
        CO_TRY_ASSIGN(ReadExtent x, std::move(mapped));
        MutBuf part = buf.first(x.bytes);
        switch (x.kind) {
            case ReadExtent::Kind::kZero:
                std::memset(part.data(), 0, part.size());
                break;
            case ReadExtent::Kind::kData:
            case ReadExtent::Kind::kCompressed: {
                Status st;
                if (x.kind == ReadExtent::Kind::kData) {
                    st = co_await file()->read(x.host_offset, part);
                } else {
                    st = co_await read_compressed(x, offset, part);
                }
                meta_->end_data_read(ticket);
                CO_TRY(std::move(st));
                break;
            }
            case ReadExtent::Kind::kBacking:
                CO_TRY(co_await read_backing(offset, part));
                break;
        }
        offset += x.bytes;
        buf = buf.subspan(x.bytes);
    }
    co_return Status{};
}

Task<Status> Qcow2Node::do_read(uint64_t offset, MutBuf buf) {
    file()->event(IoEvent::kDataRead);
    co_return co_await read_guest(offset, buf);
}

// ---- writes ----

Task<Status> Qcow2Node::check_in_place(WritePlan plan) {
    CO_TRY_ASSIGN(std::string problem,
                  co_await meta_->data_extent_problem(plan.host_offset, plan.bytes, true));
    if (!problem.empty()) {
        co_return co_await meta_->corruption(
            fmt::format("guest offset {:#x}: {}", plan.guest_offset, problem));
    }
    co_return Status{};
}

Task<Status> Qcow2Node::write_allocated(WritePlan plan, ConstBuf data) {
    const uint64_t head = plan.cow_head_bytes;
    const uint64_t tail = plan.cow_tail_bytes;
    const uint64_t zeros_from = file()->node()->zeros_from();
    Status st;
    if (head == 0 && tail == 0) {
        file()->event(IoEvent::kDataWrite);
        st = co_await file()->write(plan.host_offset, data);
    } else if (head + data.size() + tail <= kBounceLimitBytes) {
        // One write for COW head, data and COW tail.
        AlignedBuffer b(head + data.size() + tail);
        file()->event(IoEvent::kCowRead);
        st = co_await read_guest(plan.cow_head_offset, b.subspan(0, head));
        if (st) {
            st = co_await read_guest(plan.cow_tail_offset, b.subspan(head + data.size(), tail));
        }
        if (st) {
            std::memcpy(b.data() + head, data.data(), data.size());
            uint64_t start = plan.host_offset - head;
            // Fresh clusters where nothing was ever written read as zeros already: COW that
            // would only write zeros there is skipped. (Past size() is not enough: a write
            // that failed part way may have left data there.)
            bool fresh = plan.newly_allocated && plan.host_start >= zeros_from;
            file()->event(IoEvent::kCowWrite);
            if (fresh && is_zero(b.span().first(head)) && is_zero(b.span().last(tail))) {
                st = co_await file()->write(plan.host_offset, data);
            } else {
                st = co_await file()->write(start, b.span());
            }
        }
    } else {
        AlignedBuffer h(std::max<uint64_t>(head, 1));
        AlignedBuffer t(std::max<uint64_t>(tail, 1));
        file()->event(IoEvent::kCowRead);
        st = co_await read_guest(plan.cow_head_offset, h.subspan(0, head));
        if (st) {
            st = co_await read_guest(plan.cow_tail_offset, t.subspan(0, tail));
        }
        if (st) {
            file()->event(IoEvent::kCowWrite);
        }
        if (st && head != 0) {
            st = co_await file()->write(plan.host_offset - head, h.span().first(head));
        }
        if (st) {
            st = co_await file()->write(plan.host_offset, data);
        }
        if (st && tail != 0) {
            st = co_await file()->write(plan.host_offset + data.size(), t.span().first(tail));
        }
    }
    if (!st) {
        co_await meta_->abort_write(plan);
        co_return st;
    }
    co_return co_await meta_->commit_write(plan);
}

Task<Result<uint64_t>> Qcow2Node::write_piece(uint64_t offset, ConstBuf buf) {
    const qcow2::Geometry& g = meta_->geometry();
    uint64_t lock_start = g.cluster_start(offset);
    uint64_t lock_bytes = align_up(offset + buf.size(), g.cluster_size) - lock_start;
    {
        // Fast path: the clusters are ours and hold data; nothing moves them while tracked.
        RangeLock::Request req(&alloc_lock_, lock_start, lock_bytes, false);
        co_await alloc_lock_.acquire(&req);
        CO_TRY_ASSIGN(WritePlan plan, co_await meta_->plan_write(offset, buf.size(), false));
        if (plan.kind == WritePlan::Kind::kInPlace) {
            CO_TRY(co_await check_in_place(plan));
            file()->event(IoEvent::kDataWrite);
            CO_TRY(co_await file()->write(plan.host_offset, buf.first(plan.bytes)));
            co_return plan.bytes;
        }
    }
    // Allocation: serialise the clusters, then plan again (another write may have allocated).
    RangeLock::Request req(&alloc_lock_, lock_start, lock_bytes, true);
    co_await alloc_lock_.acquire(&req);
    CO_TRY_ASSIGN(WritePlan plan, co_await meta_->plan_write(offset, buf.size(), true));
    if (plan.kind == WritePlan::Kind::kInPlace) {
        CO_TRY(co_await check_in_place(plan));
        CO_TRY(co_await file()->write(plan.host_offset, buf.first(plan.bytes)));
        co_return plan.bytes;
    }
    CO_TRY(co_await write_allocated(plan, buf.first(plan.bytes)));
    co_return plan.bytes;
}

Status Qcow2Node::check_writes_allowed() const {
    if (meta_deferred_) {
        // A caller that skipped claim_writes(): the metadata may be another host's old copy.
        return make_error(EROFS, "{}: written before this host claimed it for writing", name());
    }
    if (meta_->corrupt()) {
        return make_error(EIO, "{}: the image is marked corrupt; writes are refused", name());
    }
    return {};
}

Task<Status> Qcow2Node::do_write(uint64_t offset, ConstBuf buf) {
    CO_TRY(check_writes_allowed());
    const qcow2::Geometry& g = meta_->geometry();
    while (!buf.empty()) {
        uint64_t table_end = (g.l1_index(offset) + 1) * g.l2_span();
        uint64_t n = std::min<uint64_t>(buf.size(), table_end - offset);
        CO_TRY_ASSIGN(uint64_t done, co_await write_piece(offset, buf.first(n)));
        offset += done;
        buf = buf.subspan(done);
    }
    co_return Status{};
}

Task<Status> Qcow2Node::deallocate(uint64_t offset, uint64_t bytes, DeallocMode mode) {
    const qcow2::Geometry& g = meta_->geometry();
    std::vector<qcow2::GuestRange> fallback;
    {
        uint64_t lock_start = g.cluster_start(offset);
        uint64_t lock_bytes = align_up(offset + bytes, g.cluster_size) - lock_start;
        RangeLock::Request req(&alloc_lock_, lock_start, lock_bytes, true);
        co_await alloc_lock_.acquire(&req);
        CO_TRY(co_await meta_->deallocate(offset, bytes, mode, backing() != nullptr, &fallback));
    }
    if (mode != DeallocMode::kDiscard) {
        for (const qcow2::GuestRange& r : fallback) {
            CO_TRY(co_await write_zero_buffers(r.offset, r.bytes, ZeroPath::kDriver));
        }
    }
    co_return Status{};
}

Task<Status> Qcow2Node::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    CO_TRY(check_writes_allowed());
    // The generic layer aligns the range to the deallocation granularity (zero_alignment).
    assert(offset % meta_->dealloc_granularity() == 0 && bytes % meta_->dealloc_granularity() == 0);
    if (!meta_->can_zero(backing() != nullptr) || offset + bytes > size_) {
        // No zero flag to use (a v2 image over a backing file), or a range past the end.
        co_return co_await write_zero_buffers(offset, bytes, ZeroPath::kDriver);
    }
    const DeallocMode mode = may_unmap ? DeallocMode::kZeroUnmap : DeallocMode::kZero;
    co_return co_await deallocate(offset, bytes, mode);
}

Task<Status> Qcow2Node::do_discard(uint64_t offset, uint64_t bytes) {
    CO_TRY(check_writes_allowed());
    const uint64_t gran = meta_->dealloc_granularity();
    uint64_t a = align_up(offset, gran);
    uint64_t b = std::min(align_down(offset + bytes, gran), align_down(size_, gran));
    if (a >= b) {
        co_return Status{};  // advisory: partial granules are left as they are
    }
    co_return co_await deallocate(a, b - a, DeallocMode::kDiscard);
}

Task<Status> Qcow2Node::do_flush() {
    co_return co_await meta_->flush();
}

Task<Result<BlockStatus>> Qcow2Node::do_block_status(uint64_t offset, uint64_t bytes) {
    CO_TRY_ASSIGN(ReadExtent x, co_await meta_->map(offset, bytes));
    switch (x.kind) {
        case ReadExtent::Kind::kZero:
            co_return BlockStatus{Alloc::kZero, x.bytes};
        case ReadExtent::Kind::kBacking:
            co_return BlockStatus{Alloc::kUnallocated, x.bytes};
        default:
            co_return BlockStatus{Alloc::kData, x.bytes};
    }
}

Task<Status> Qcow2Node::do_truncate(uint64_t new_size) {
    CO_TRY(check_writes_allowed());
    if (new_size > size_ && backing() != nullptr) {
        CO_TRY(co_await zero_before_growing(size_, new_size));
    }
    CO_TRY(co_await meta_->grow(new_size));
    size_ = new_size;
    co_return Status{};
}

// The range a grow adds read as zeros before it (past the end), and must after it, not as a
// longer backing file's bytes there. Durably so before the new size is, or a crash between
// the two would show them: the zeroes go in, and are flushed, while the header still has the
// old size (entries past the end are allowed; the L1 table is made big enough first).
Task<Status> Qcow2Node::zero_before_growing(uint64_t old_size, uint64_t new_size) {
    const uint64_t end = std::min(new_size, backing()->node()->size());
    if (end <= old_size) {
        co_return Status{};  // the backing file ends before: it shows nothing there
    }
    CO_TRY(co_await meta_->reserve_l1(new_size));
    const uint64_t gran = meta_->dealloc_granularity();
    const uint64_t head_end = std::min(align_up(old_size, gran), end);
    if (head_end > old_size) {
        // The rest of the last granule: written as data (its start is the guest's).
        CO_TRY(co_await write_zero_buffers(old_size, head_end - old_size, ZeroPath::kDriver));
    }
    const uint64_t zeros_end = align_up(end, gran);
    if (zeros_end > head_end) {
        if (meta_->can_zero(true)) {
            CO_TRY(co_await deallocate(head_end, zeros_end - head_end, DeallocMode::kZero));
        } else {
            CO_TRY(co_await write_zero_buffers(head_end, zeros_end - head_end, ZeroPath::kDriver));
        }
    }
    co_return co_await meta_->flush();
}

Task<Status> Qcow2Node::do_close() {
    if (!meta_) {
        co_return Status{};
    }
    co_return co_await meta_->close();
}

Task<Status> Qcow2Node::set_writable(bool writable) {
    if (writable == !read_only_) {
        co_return Status{};
    }
    if (writable && file()->node()->read_only()) {
        co_return make_error(EROFS, "{}: its file was opened read-only", name());
    }
    if (!writable) {
        if (!meta_deferred_) {  // deferred metadata is read-only already
            CO_TRY(co_await meta_->flush());
            CO_TRY(co_await meta_->set_read_only(true));
        }
        meta_deferred_ = false;
        read_only_ = true;
        caps_.resize = false;
        co_return Status{};
    }
    // A file still to be claimed is claimed now, and then the metadata is read afresh.
    expect_writes();
    read_only_ = false;
    // Getting ready to write writes itself (clearing autoclear bits, repairing a dirty image,
    // claiming): the edge to the file must allow it first. It asserted on an image with a
    // persistent bitmap, and the daemon aborted. The caller's refresh afterwards finds it done.
    if (Status granted = refresh_permissions(); !granted) {
        read_only_ = true;
        (void)refresh_permissions();
        co_return granted;
    }
    meta_deferred_ = meta_deferred_ || Node::claim_pending();
    Status st;
    if (meta_deferred_) {
        Result<bool> claimed = co_await claim_writes();
        if (!claimed) {
            st = claimed.error();
        }
    } else {
        st = co_await meta_->set_read_only(false);
    }
    if (!st) {
        read_only_ = true;
        (void)refresh_permissions();  // narrowed again: it only gives up what was granted
        co_return st;
    }
    caps_.resize = true;
    co_return Status{};
}

Status Qcow2Node::refresh_permissions() {
    if (env_.graph == nullptr) {
        return {};
    }
    Transaction tx(env_.graph);
    return tx.commit();
}

Task<Result<bool>> Qcow2Node::claim_writes() {
    CO_TRY_ASSIGN(bool fresh, co_await Node::claim_writes());
    if (fresh || meta_deferred_) {
        CO_TRY(co_await reload_metadata());
    }
    co_return fresh;
}

Task<Status> Qcow2Node::reload_metadata() {
    qcow2::Options options = options_;
    options.read_only = read_only_;
    CO_TRY_ASSIGN(std::unique_ptr<qcow2::Metadata> fresh,
                  co_await qcow2::Metadata::open(env_, file(), name(), options));
    meta_ = std::move(fresh);
    meta_deferred_ = false;
    size_ = meta_->size();
    decompressed_bytes_ = 0;
    co_return Status{};
}

Task<Status> Qcow2Node::set_backing_name(std::string name, std::optional<std::string> format) {
    co_return co_await meta_->set_backing(std::move(name), std::move(format));
}

void Qcow2Node::inherit_layout(const Node& backing, qcow2::CreateOptions* options) {
    if (const auto* q = dynamic_cast<const Qcow2Node*>(&backing)) {
        options->cluster_size = static_cast<uint32_t>(q->header().cluster_size());
        options->extended_l2 = q->header().extended_l2();
    }
}

}  // namespace imgfs
