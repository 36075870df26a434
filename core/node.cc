#include "core/node.h"

#include <algorithm>
#include <cassert>

#include "core/event_loop.h"
#include "core/graph.h"
#include "core/json.h"

namespace imgfs {

const char* child_role_name(ChildRole role) {
    switch (role) {
        case ChildRole::kFile:
            return "file";
        case ChildRole::kBacking:
            return "backing";
        case ChildRole::kFiltered:
            return "filtered";
        case ChildRole::kUser:
            return "user";
    }
    return "?";
}

namespace {

constexpr std::pair<IoEvent, const char*> kEventNames[] = {
    {IoEvent::kNone, "none"},
    {IoEvent::kDataRead, "data-read"},
    {IoEvent::kDataWrite, "data-write"},
    {IoEvent::kCowRead, "cow-read"},
    {IoEvent::kCowWrite, "cow-write"},
    {IoEvent::kHeader, "header"},
    {IoEvent::kL1, "l1"},
    {IoEvent::kL2Write, "l2-write"},
    {IoEvent::kL2Alloc, "l2-alloc"},
    {IoEvent::kRefblockWrite, "refblock-write"},
    {IoEvent::kRefblockAlloc, "refblock-alloc"},
    {IoEvent::kRefTableGrow, "reftable-grow"},
};

}  // namespace

const char* io_event_name(IoEvent e) {
    for (const auto& [ev, name] : kEventNames) {
        if (ev == e) {
            return name;
        }
    }
    return "?";
}

IoEvent io_event_from_name(std::string_view name) {
    for (const auto& [ev, n] : kEventNames) {
        if (name == n) {
            return ev;
        }
    }
    return IoEvent::kNone;
}

// ---- ChildOwner ----

ChildOwner::ChildOwner(Executor* executor) : idle_(executor), unquiesced_(executor) {}

ChildOwner::~ChildOwner() {
    assert(in_flight_ == 0 && "owner destroyed with requests in flight");
    // Children go first: their destructors unlink from the child nodes, which may then go too.
    children_.clear();
}

Child* ChildOwner::child(ChildRole role) const {
    for (const auto& c : children_) {
        if (c->role() == role) {
            return c.get();
        }
    }
    return nullptr;
}

void ChildOwner::drained_begin() {
    ++quiesce_counter_;
    on_drained_begin();
}

void ChildOwner::drained_end() {
    assert(quiesce_counter_ > 0);
    on_drained_end();
    if (--quiesce_counter_ == 0) {
        unquiesced_.notify_all();
    }
}

Task<void> ChildOwner::wait_unquiesced() {
    while (quiesce_counter_ > 0) {
        co_await unquiesced_.wait();
    }
}

void ChildOwner::dec_in_flight() {
    assert(in_flight_ > 0);
    if (--in_flight_ == 0) {
        idle_.notify_all();
    }
}

// ---- Node ----

Node::Node(NodeEnv env, std::string name)
    : ChildOwner(env.loop), env_(env), name_(std::move(name)), tracked_(env.loop) {
    if (env_.graph != nullptr) {
        env_.graph->register_node(this);
    }
}

Node::~Node() {
    assert(parents_.empty() && "node destroyed while still used");
    if (env_.graph != nullptr) {
        env_.graph->unregister_node(this);
    }
}

void Node::on_drained_begin() {
    // Quiescing a node quiesces everything that could send it requests.
    for (Child* p : parents_) {
        p->owner()->drained_begin();
    }
}

void Node::on_drained_end() {
    for (Child* p : parents_) {
        p->owner()->drained_end();
    }
}

std::string Node::layer_refusing_writes() const {
    if (std::string why = refusing_writes(); !why.empty()) {
        return why;
    }
    for (const auto& c : children()) {
        if (c->role() == ChildRole::kBacking) {
            continue;
        }
        if (std::string why = c->node()->layer_refusing_writes(); !why.empty()) {
            return why;
        }
    }
    return {};
}

void Node::describe(JsonWriter* /*out*/) const {}

Task<Result<uint64_t>> Node::allocated_bytes() {
    uint64_t total = 0;
    for (const auto& c : children()) {
        if (c->role() == ChildRole::kFile || c->role() == ChildRole::kFiltered) {
            CO_TRY_ASSIGN(uint64_t n, co_await c->node()->allocated_bytes());
            total += n;
        }
    }
    co_return total;
}

void Node::child_perm(const Child& child, Perms node_perm, Perms node_shared, Perms* perm,
                      Perms* shared) const {
    switch (child.role()) {
        case ChildRole::kFile:
            // A format driver owns its storage: it reads it for consistent metadata, writes it
            // whenever anyone writes the format node, and lets nobody else write it.
            *perm = perm::kConsistentRead;
            if ((node_perm & (perm::kWrite | perm::kWriteUnchanged)) != 0) {
                *perm |= perm::kWrite;
            }
            if ((node_perm & perm::kResize) != 0) {
                *perm |= perm::kResize;
            }
            *shared = perm::kConsistentRead | perm::kWriteUnchanged;
            break;
        case ChildRole::kBacking:
            // Data of a backing layer shows through this one: nobody may change it or its size.
            *perm = perm::kConsistentRead;
            *shared = perm::kConsistentRead | perm::kWriteUnchanged;
            break;
        case ChildRole::kFiltered:
        case ChildRole::kUser:
            // Filters pass through what their parents need and allow.
            *perm = node_perm;
            *shared = node_shared;
            break;
    }
}

Status Node::check_perm(Perms perm, Perms /*shared*/) const {
    if (read_only_ && (perm & (perm::kWrite | perm::kWriteUnchanged | perm::kResize)) != 0) {
        return make_error(EROFS, "{} is read-only but {} is needed", name_, perms_to_string(perm));
    }
    return {};
}

void Node::set_perm(Perms /*perm*/, Perms /*shared*/) {}

Task<Status> Node::do_write_zeroes(uint64_t /*offset*/, uint64_t /*bytes*/, bool /*may_unmap*/) {
    assert(false && "do_write_zeroes called without the capability");
    co_return Error{ENOTSUP, "write_zeroes"};
}

Task<Status> Node::do_discard(uint64_t /*offset*/, uint64_t /*bytes*/) {
    assert(false && "do_discard called without the capability");
    co_return Error{ENOTSUP, "discard"};
}

Task<Result<BlockStatus>> Node::do_block_status(uint64_t /*offset*/, uint64_t bytes) {
    co_return BlockStatus{Alloc::kData, bytes};
}

Task<Status> Node::do_truncate(uint64_t /*new_size*/) {
    co_return make_error(ENOTSUP, "{}: the {} driver cannot resize", name_, driver_name());
}

Task<Status> Node::do_close() {
    co_return co_await do_flush();
}

Task<Status> Node::set_writable(bool writable) {
    if (writable == !read_only_) {
        co_return Status{};
    }
    co_return make_error(ENOTSUP,
                         "{}: the {} driver cannot change between read-only and writable in place",
                         name_, driver_name());
}

namespace {

// Where a node keeps its data: its file, or what a filter filters.
Child* storage_child(const Node& node) {
    Child* c = node.file();
    return c != nullptr ? c : node.child(ChildRole::kFiltered);
}

}  // namespace

void Node::expect_writes() {
    if (Child* c = storage_child(*this); c != nullptr) {
        c->node()->expect_writes();
    }
}

bool Node::claim_pending() const {
    Child* c = storage_child(*this);
    return c != nullptr && c->node()->claim_pending();
}

Task<Result<bool>> Node::claim_writes() {
    Child* c = storage_child(*this);
    if (c == nullptr) {
        co_return false;
    }
    co_return co_await c->node()->claim_writes();
}

Task<Status> Node::release_claim() {
    Child* c = storage_child(*this);
    if (c == nullptr) {
        co_return Status{};
    }
    co_return co_await c->node()->release_claim();
}

Task<Status> Node::set_backing_name(std::string /*name*/, std::optional<std::string> /*format*/) {
    co_return make_error(EINVAL, "{}: the {} driver records no backing file name", name_,
                         driver_name());
}

// ---- Child ----

Child::Child(ChildOwner* owner, std::shared_ptr<Node> node, ChildRole role, std::string name)
    : owner_(owner), node_(std::move(node)), role_(role), name_(std::move(name)) {}

Child::~Child() {
    unlink();
}

// A new user of a quiesced node is quiesced as often as the node is, and a leaving user is
// released as often; this keeps drained sections balanced across graph changes made inside them.
void Child::link() {
    assert(!linked_);
    node_->parents_.push_back(this);
    linked_ = true;
    for (int i = 0; i < node_->quiesce_counter_; ++i) {
        owner_->drained_begin();
    }
}

void Child::unlink() {
    if (!linked_) {
        return;
    }
    auto& ps = node_->parents_;
    ps.erase(std::remove(ps.begin(), ps.end(), this), ps.end());
    linked_ = false;
    for (int i = 0; i < node_->quiesce_counter_; ++i) {
        owner_->drained_end();
    }
}

void Child::assert_may_write() const {
    assert((perm_ & (perm::kWrite | perm::kWriteUnchanged)) != 0 &&
           "write through an edge without write permission");
}

}  // namespace imgfs
