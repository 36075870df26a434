#include "drivers/fault.h"

#include <algorithm>
#include <bit>

#include "core/event_loop.h"
#include "core/transaction.h"

namespace imgfs {

std::shared_ptr<FaultNode> FaultNode::open(NodeEnv env, std::string name, Transaction* tx,
                                           std::shared_ptr<Node> child) {
    auto node = std::make_shared<FaultNode>(env, std::move(name));
    tx->attach(node.get(), std::move(child), ChildRole::kFiltered, "filtered");
    node->sync_from_child();
    return node;
}

FaultNode::FaultNode(NodeEnv env, std::string name) : Node(env, std::move(name)) {}

void FaultNode::sync_from_child() {
    Node* c = child(ChildRole::kFiltered)->node();
    size_ = c->size();
    limits_ = c->limits();
    caps_ = c->caps();
    read_only_ = c->read_only();
}

size_t FaultNode::add_rule(const FaultRule& rule) {
    rules_.push_back(RuleState{rule});
    return rules_.size() - 1;
}

uint64_t FaultNode::fired_total() const {
    uint64_t n = 0;
    for (const RuleState& r : rules_) {
        n += r.fired;
    }
    return n;
}

uint64_t FaultNode::count(uint32_t op) const {
    return counts_[std::countr_zero(op)];
}

FaultNode::Verdict FaultNode::judge(uint32_t op, uint64_t offset, uint64_t bytes, int* errnum) {
    ++counts_[std::countr_zero(op)];
    Verdict verdict = Verdict::kPass;
    for (RuleState& r : rules_) {
        if ((r.rule.ops & op) == 0 ||
            (r.rule.event != IoEvent::kNone && r.rule.event != last_event_)) {
            continue;
        }
        bool ranged = r.rule.offset != 0 || r.rule.bytes != std::numeric_limits<uint64_t>::max();
        if (op == fault_op::kFlush) {
            if (ranged) {
                continue;
            }
        } else {
            uint64_t rule_end = r.rule.offset + std::min(r.rule.bytes, UINT64_MAX - r.rule.offset);
            if (offset >= rule_end || offset + bytes <= r.rule.offset) {
                continue;
            }
        }
        ++r.matched;
        if (r.matched < r.rule.nth || (r.rule.once && r.fired > 0)) {
            continue;
        }
        if (r.rule.probability < 1.0 &&
            std::uniform_real_distribution<double>(0.0, 1.0)(rng_) >= r.rule.probability) {
            continue;
        }
        ++r.fired;
        if (verdict == Verdict::kPass) {
            switch (r.rule.action) {
                case FaultAction::kError:
                    verdict = Verdict::kFail;
                    break;
                case FaultAction::kDrop:
                    verdict = Verdict::kDrop;
                    break;
                case FaultAction::kDelay:
                    verdict = op == fault_op::kRead ? Verdict::kDelay : Verdict::kPass;
                    last_delay_ms_ = r.rule.delay_ms;
                    break;
                case FaultAction::kShort:
                case FaultAction::kLate: {
                    // Only ranged writes can be cut short or land late; anything else fails.
                    bool ranged_write = op == fault_op::kWrite || op == fault_op::kWriteZeroes;
                    if (!ranged_write) {
                        verdict = Verdict::kFail;
                    } else {
                        verdict =
                            r.rule.action == FaultAction::kShort ? Verdict::kShort : Verdict::kLate;
                    }
                    break;
                }
            }
            *errnum = r.rule.errnum;
        }
    }
    return verdict;
}

Error FaultNode::injected(int errnum, const char* op, uint64_t offset) const {
    return make_error(errnum, "{}: injected error on {} at {}", name(), op, offset);
}

uint64_t FaultNode::short_length(uint64_t bytes) {
    const uint64_t block = std::max<uint64_t>(limits_.request_alignment, 512);
    const uint64_t blocks = bytes / block;
    return blocks == 0 ? 0 : (rng_() % blocks) * block;
}

Task<void> FaultNode::jitter() {
    if (jitter_turns_ == 0) {
        co_return;
    }
    for (uint64_t n = rng_() % (jitter_turns_ + 1); n > 0; --n) {
        co_await Yield{env_.loop};
    }
}

Task<Status> FaultNode::do_read(uint64_t offset, MutBuf buf) {
    co_await jitter();
    int err = 0;
    const Verdict verdict = judge(fault_op::kRead, offset, buf.size(), &err);
    if (verdict == Verdict::kFail) {
        co_return injected(err, "read", offset);
    }
    if (verdict == Verdict::kDelay) {
        co_await env_.loop->sleep(std::chrono::milliseconds(last_delay_ms_));
    }
    Status st = co_await child(ChildRole::kFiltered)->read(offset, buf);
    co_await jitter();
    co_return st;
}

Task<Status> FaultNode::do_write(uint64_t offset, ConstBuf buf) {
    co_await jitter();
    int err = 0;
    Status st;
    switch (judge(fault_op::kWrite, offset, buf.size(), &err)) {
        case Verdict::kFail:
            co_return injected(err, "write", offset);
        case Verdict::kDrop:
            co_return Status{};
        case Verdict::kShort:
            if (uint64_t part = short_length(buf.size()); part > 0) {
                st = co_await child(ChildRole::kFiltered)->write(offset, buf.first(part));
            }
            st = injected(err, "write (short)", offset);
            break;
        case Verdict::kLate:
            st = co_await child(ChildRole::kFiltered)->write(offset, buf);
            st = injected(err, "write (landed)", offset);
            break;
        case Verdict::kDelay:  // judged for reads only
        case Verdict::kPass:
            st = co_await child(ChildRole::kFiltered)->write(offset, buf);
            break;
    }
    size_ = child(ChildRole::kFiltered)->node()->size();
    co_await jitter();
    co_return st;
}

Task<Status> FaultNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    co_await jitter();
    int err = 0;
    Status st;
    switch (judge(fault_op::kWriteZeroes, offset, bytes, &err)) {
        case Verdict::kFail:
            co_return injected(err, "write_zeroes", offset);
        case Verdict::kDrop:
            co_return Status{};
        case Verdict::kShort:
            if (uint64_t part = short_length(bytes); part > 0) {
                st = co_await child(ChildRole::kFiltered)->write_zeroes(offset, part, may_unmap);
            }
            st = injected(err, "write_zeroes (short)", offset);
            break;
        case Verdict::kLate:
            st = co_await child(ChildRole::kFiltered)->write_zeroes(offset, bytes, may_unmap);
            st = injected(err, "write_zeroes (landed)", offset);
            break;
        case Verdict::kDelay:  // judged for reads only
        case Verdict::kPass:
            st = co_await child(ChildRole::kFiltered)->write_zeroes(offset, bytes, may_unmap);
            break;
    }
    size_ = child(ChildRole::kFiltered)->node()->size();
    co_await jitter();
    co_return st;
}

Task<Status> FaultNode::do_discard(uint64_t offset, uint64_t bytes) {
    co_await jitter();
    int err = 0;
    switch (judge(fault_op::kDiscard, offset, bytes, &err)) {
        case Verdict::kFail:
        case Verdict::kShort:
        case Verdict::kLate:
            co_return injected(err, "discard", offset);
        case Verdict::kDrop:
            co_return Status{};
        case Verdict::kDelay:  // judged for reads only
        case Verdict::kPass:
            break;
    }
    Status st = co_await child(ChildRole::kFiltered)->discard(offset, bytes);
    co_await jitter();
    co_return st;
}

Task<Status> FaultNode::do_flush() {
    co_await jitter();
    int err = 0;
    switch (judge(fault_op::kFlush, 0, 0, &err)) {
        case Verdict::kFail:
        case Verdict::kShort:
        case Verdict::kLate:
            co_return injected(err, "flush", 0);
        case Verdict::kDrop:
            co_return Status{};
        case Verdict::kDelay:  // judged for reads only
        case Verdict::kPass:
            break;
    }
    Status st = co_await child(ChildRole::kFiltered)->flush();
    co_await jitter();
    co_return st;
}

Task<Result<BlockStatus>> FaultNode::do_block_status(uint64_t offset, uint64_t bytes) {
    co_return co_await child(ChildRole::kFiltered)->block_status(offset, bytes);
}

Task<Status> FaultNode::do_truncate(uint64_t new_size) {
    int err = 0;
    switch (judge(fault_op::kWrite, new_size, 0, &err)) {
        case Verdict::kFail:
        case Verdict::kShort:
        case Verdict::kLate:
            co_return injected(err, "truncate", new_size);
        case Verdict::kDrop:
            co_return Status{};
        case Verdict::kDelay:  // judged for reads only
        case Verdict::kPass:
            break;
    }
    CO_TRY(co_await child(ChildRole::kFiltered)->truncate(new_size));
    size_ = new_size;
    co_return Status{};
}

Task<Result<uint64_t>> FaultNode::allocated_bytes() {
    co_return co_await child(ChildRole::kFiltered)->node()->allocated_bytes();
}

}  // namespace imgfs
