#include "qcow2/recorder_util.h"

#include <algorithm>
#include <cstring>

#include "core/transaction.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/l2_entry.h"
#include "drivers/qcow2/snapshot_table.h"

namespace imgfs::test {

namespace {
constexpr uint64_t kSector = 512;

RecordedOp make_op(RecordedOp::Kind kind, uint64_t offset = 0, uint64_t bytes = 0) {
    RecordedOp op;
    op.kind = kind;
    op.offset = offset;
    op.bytes = bytes;
    return op;
}

uint64_t sectors_of(const RecordedOp& op) {
    if (op.kind == RecordedOp::kTruncate || op.bytes == 0) {
        return 1;
    }
    return (op.offset + op.bytes - 1) / kSector - op.offset / kSector + 1;
}
}  // namespace

const char* variant_name(Variant v) {
    switch (v) {
        case Variant::kNone:
            return "none";
        case Variant::kPrefix:
            return "prefix";
        case Variant::kSubset:
            return "subset";
        case Variant::kTorn:
            return "torn";
    }
    return "?";
}

void apply_op(const RecordedOp& op, std::vector<uint8_t>* content, uint64_t sector_mask) {
    if (op.kind == RecordedOp::kFlush || sector_mask == 0) {
        return;
    }
    if (op.kind == RecordedOp::kTruncate) {
        content->resize(op.offset, 0);
        return;
    }
    const uint64_t end = op.offset + op.bytes;
    for (uint64_t pos = op.offset; pos < end;) {
        uint64_t sector_end = std::min(end, (pos / kSector + 1) * kSector);
        uint64_t index = pos / kSector - op.offset / kSector;
        if ((sector_mask >> (index % 64) & 1) != 0) {
            if (content->size() < sector_end) {
                content->resize(sector_end, 0);
            }
            uint8_t* dst = content->data() + pos;
            if (op.kind == RecordedOp::kWrite) {
                std::memcpy(dst, op.data.data() + (pos - op.offset), sector_end - pos);
            } else {
                std::memset(dst, 0, sector_end - pos);
            }
        }
        pos = sector_end;
    }
}

const std::vector<size_t>& CrashView::seek(uint64_t s) {
    const std::vector<RecordedOp>& ops = j_->ops;
    applied_.resize(ops.size(), false);
    // Requests before scan_from_ are all in base_ (or flushes); only the tail needs a look.
    for (size_t i = scan_from_; i < ops.size() && ops[i].issued < s; ++i) {
        if (ops[i].kind == RecordedOp::kFlush && ops[i].done < s) {
            cut_ = std::max(cut_, ops[i].issued);
        }
    }
    pending_.clear();
    bool all_before_applied = true;
    for (size_t i = scan_from_; i < ops.size() && ops[i].issued < s; ++i) {
        if (!applied_[i] && ops[i].kind != RecordedOp::kFlush) {
            if (ops[i].done < cut_) {
                apply_op(ops[i], &base_);
                applied_[i] = true;
            } else {
                pending_.push_back(i);
            }
        }
        bool settled = applied_[i] || (ops[i].kind == RecordedOp::kFlush && ops[i].done < s);
        all_before_applied = all_before_applied && settled;
        if (all_before_applied) {
            scan_from_ = i + 1;
        }
    }
    return pending_;
}

Selection CrashView::choose(Variant v, std::mt19937_64* rng) const {
    const size_t n = pending_.size();
    Selection sel(n, 0);
    switch (v) {
        case Variant::kNone:
            break;
        case Variant::kPrefix: {
            size_t k = n <= 1 ? n : 1 + (*rng)() % (n - 1);
            std::fill_n(sel.begin(), k, ~0ULL);
            break;
        }
        case Variant::kSubset:
            for (auto& s : sel) {
                s = (*rng)() % 2 == 0 ? ~0ULL : 0;
            }
            break;
        case Variant::kTorn: {
            std::vector<size_t> multi;
            for (size_t i = 0; i < n; ++i) {
                const RecordedOp& op = j_->ops[pending_[i]];
                if (op.kind != RecordedOp::kTruncate && sectors_of(op) > 1) {
                    multi.push_back(i);
                }
            }
            if (multi.empty()) {
                return choose(Variant::kSubset, rng);
            }
            // Everything before the torn write reached the disk, anything after may have.
            size_t t = multi[(*rng)() % multi.size()];
            std::fill_n(sel.begin(), t, ~0ULL);
            uint64_t sectors = std::min<uint64_t>(64, sectors_of(j_->ops[pending_[t]]));
            uint64_t all = sectors == 64 ? ~0ULL : (1ULL << sectors) - 1;
            uint64_t mask = 0;
            while (mask == 0 || mask == all) {
                mask = (*rng)() & all;
            }
            sel[t] = mask;
            for (size_t i = t + 1; i < n; ++i) {
                sel[i] = (*rng)() % 2 == 0 ? ~0ULL : 0;
            }
            break;
        }
    }
    return sel;
}

std::vector<uint8_t> CrashView::content(const Selection& sel) const {
    std::vector<uint8_t> out = base_;
    for (size_t i = 0; i < pending_.size(); ++i) {
        apply_op(j_->ops[pending_[i]], &out, sel[i]);
    }
    return out;
}

std::string CrashView::key(const Selection& sel) const {
    std::string k = std::to_string(cut_);
    for (size_t i = 0; i < pending_.size(); ++i) {
        if (sel[i] != 0) {
            k += ',' + std::to_string(pending_[i]);
            if (sel[i] != ~0ULL) {
                k += ':' + std::to_string(sel[i]);
            }
        }
    }
    return k;
}

// ---- RecorderNode ----

std::shared_ptr<RecorderNode> RecorderNode::attach(NodeEnv env, std::string name, Transaction* tx,
                                                   std::shared_ptr<Node> child, Clock* clock,
                                                   Journal* journal) {
    auto node = std::make_shared<RecorderNode>(env, std::move(name));
    node->clock_ = clock;
    node->journal_ = journal;
    tx->attach(node.get(), std::move(child), ChildRole::kFiltered, "filtered");
    node->sync_from_child();
    return node;
}

Task<Result<std::shared_ptr<RecorderNode>>> RecorderNode::open(NodeEnv env, std::string name,
                                                               std::shared_ptr<Node> child,
                                                               Clock* clock, Journal* journal) {
    journal->initial.assign(child->size(), 0);
    CO_TRY(co_await child->read(0, MutBuf(journal->initial.data(), journal->initial.size())));
    Transaction tx(env.graph);
    auto node = attach(env, std::move(name), &tx, std::move(child), clock, journal);
    CO_TRY(tx.commit());
    co_return node;
}

void RecorderNode::sync_from_child() {
    Node* c = child(ChildRole::kFiltered)->node();
    size_ = c->size();
    limits_ = c->limits();
    caps_ = c->caps();
    read_only_ = c->read_only();
}

void RecorderNode::on_event(IoEvent event) {
    child(ChildRole::kFiltered)->event(event);
}

size_t RecorderNode::issue(RecordedOp op) {
    op.issued = clock_->next();
    if (clock_->on_issue) {
        clock_->on_issue(op.issued);
    }
    journal_->ops.push_back(std::move(op));
    return journal_->ops.size() - 1;
}

Task<Status> RecorderNode::do_read(uint64_t offset, MutBuf buf) {
    co_return co_await child(ChildRole::kFiltered)->read(offset, buf);
}

Task<Status> RecorderNode::do_write(uint64_t offset, ConstBuf buf) {
    RecordedOp op = make_op(RecordedOp::kWrite, offset, buf.size());
    op.data.assign(buf.begin(), buf.end());
    size_t i = issue(std::move(op));
    CO_TRY(co_await child(ChildRole::kFiltered)->write(offset, buf));
    journal_->ops[i].done = clock_->next();
    size_ = child(ChildRole::kFiltered)->node()->size();
    co_return Status{};
}

Task<Status> RecorderNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    size_t i = issue(make_op(RecordedOp::kZero, offset, bytes));
    CO_TRY(co_await child(ChildRole::kFiltered)->write_zeroes(offset, bytes, may_unmap));
    journal_->ops[i].done = clock_->next();
    size_ = child(ChildRole::kFiltered)->node()->size();
    co_return Status{};
}

Task<Status> RecorderNode::do_discard(uint64_t offset, uint64_t bytes) {
    // The file layer punches a hole: the range reads as zeros once that is durable.
    size_t i = issue(make_op(RecordedOp::kZero, offset, bytes));
    CO_TRY(co_await child(ChildRole::kFiltered)->discard(offset, bytes));
    journal_->ops[i].done = clock_->next();
    co_return Status{};
}

Task<Status> RecorderNode::do_flush() {
    size_t i = issue(make_op(RecordedOp::kFlush));
    CO_TRY(co_await child(ChildRole::kFiltered)->flush());
    journal_->ops[i].done = clock_->next();
    co_return Status{};
}

Task<Result<BlockStatus>> RecorderNode::do_block_status(uint64_t offset, uint64_t bytes) {
    co_return co_await child(ChildRole::kFiltered)->block_status(offset, bytes);
}

Task<Status> RecorderNode::do_truncate(uint64_t new_size) {
    size_t i = issue(make_op(RecordedOp::kTruncate, new_size));
    CO_TRY(co_await child(ChildRole::kFiltered)->truncate(new_size));
    journal_->ops[i].done = clock_->next();
    size_ = new_size;
    co_return Status{};
}

Task<Result<uint64_t>> RecorderNode::allocated_bytes() {
    co_return co_await child(ChildRole::kFiltered)->node()->allocated_bytes();
}

// ---- VecNode ----

VecNode::VecNode(NodeEnv env, std::string name, std::vector<uint8_t> bytes)
    : Node(env, std::move(name)), data(std::move(bytes)) {
    size_ = data.size();
    caps_.write_zeroes = true;
    caps_.discard = true;
    caps_.resize = true;
}

Task<Status> VecNode::do_read(uint64_t offset, MutBuf buf) {
    uint64_t n = offset < data.size() ? std::min<uint64_t>(buf.size(), data.size() - offset) : 0;
    std::memcpy(buf.data(), data.data() + offset, n);
    std::memset(buf.data() + n, 0, buf.size() - n);
    co_return Status{};
}

Task<Status> VecNode::do_write(uint64_t offset, ConstBuf buf) {
    if (offset + buf.size() > data.size()) {
        data.resize(offset + buf.size(), 0);
        size_ = data.size();
    }
    std::memcpy(data.data() + offset, buf.data(), buf.size());
    co_return Status{};
}

Task<Status> VecNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool /*may_unmap*/) {
    // As a file does (FileNode grows it, fallocate without KEEP_SIZE too): zeroes past the end
    // extend the file, so an L2 table allocated past EOF exists once its zeroes are written.
    if (offset + bytes > data.size()) {
        data.resize(offset + bytes, 0);
        size_ = data.size();
    }
    std::memset(data.data() + offset, 0, bytes);
    co_return Status{};
}

Task<Status> VecNode::do_discard(uint64_t offset, uint64_t bytes) {
    co_return co_await do_write_zeroes(offset, bytes, true);
}

Task<Status> VecNode::do_truncate(uint64_t new_size) {
    data.resize(new_size, 0);
    size_ = new_size;
    co_return Status{};
}

CrashScale crash_scale() {
    CrashScale s;
    const char* l = std::getenv("IMGFS_LONG");
    s.long_mode = l != nullptr && *l != '\0' && *l != '0';
    const char* stride = std::getenv("IMGFS_CRASH_STRIDE");
    s.stride = stride != nullptr ? static_cast<uint64_t>(std::max(1, std::atoi(stride))) : 1;
    return s;
}

}  // namespace imgfs::test
