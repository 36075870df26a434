#include "core/drain.h"

#include <unordered_set>

namespace imgfs {

namespace {

void collect_above(ChildOwner* owner, std::unordered_set<ChildOwner*>* seen) {
    if (!seen->insert(owner).second) {
        return;
    }
    if (Node* n = owner->as_node()) {
        for (Child* p : n->parents()) {
            collect_above(p->owner(), seen);
        }
    }
}

void collect_below(ChildOwner* owner, std::unordered_set<ChildOwner*>* seen) {
    for (const auto& c : owner->children()) {
        if (seen->insert(c->node()).second) {
            collect_below(c->node(), seen);
        }
    }
}

std::unordered_set<ChildOwner*> affected(const std::vector<std::shared_ptr<Node>>& nodes) {
    std::unordered_set<ChildOwner*> set;
    for (const auto& n : nodes) {
        collect_above(n.get(), &set);
    }
    for (const auto& n : nodes) {
        collect_below(n.get(), &set);
    }
    return set;
}

}  // namespace

DrainGuard& DrainGuard::operator=(DrainGuard&& o) noexcept {
    if (this != &o) {
        end();
        nodes_ = std::move(o.nodes_);
    }
    return *this;
}

void DrainGuard::end() {
    for (auto& n : nodes_) {
        n->drained_end();
    }
    nodes_.clear();
}

bool drain_busy(ChildOwner* owner) {
    std::unordered_set<ChildOwner*> set;
    collect_above(owner, &set);
    collect_below(owner, &set);
    for (ChildOwner* o : set) {
        if (o->in_flight() > 0) {
            return true;
        }
    }
    return false;
}

Task<DrainGuard> drain(std::vector<std::shared_ptr<Node>> nodes) {
    for (auto& n : nodes) {
        n->drained_begin();
    }
    DrainGuard guard(nodes);
    // Owners cannot start new requests now; wait for the ones already running. The set is
    // recomputed each round because a finishing request cannot change the shape, but a
    // drained section may be taken while another one is ending.
    for (;;) {
        ChildOwner* busy = nullptr;
        for (ChildOwner* o : affected(nodes)) {
            if (o->in_flight() > 0) {
                busy = o;
                break;
            }
        }
        if (busy == nullptr) {
            break;
        }
        co_await busy->wait_idle();
    }
    co_return guard;
}

}  // namespace imgfs
