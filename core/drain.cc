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

// Whether a layer outside `set` uses `node` (another image's overlay on a shared base).
// Users that are not layers (a job's edge, a backend) do not count: they belong to the
// image being drained or never reach a shared base, and are waited for as before.
bool used_by_outside_layer(const Node* node, const std::unordered_set<ChildOwner*>& set) {
    for (const Child* p : node->parents()) {
        if (set.count(p->owner()) == 0 && p->owner()->as_node() != nullptr) {
            return true;
        }
    }
    return false;
}

// What a drain waits on: the drained nodes, everything above them (quiesced), and what lies
// below them: their files, their backing chain. A node below that a layer outside the
// section also uses (a golden base another image reads through) is left out with what lies
// under it: that image's requests into it never stop, so waiting for it could take as long
// as the other image stays busy, and nothing the drained section does needs it idle (a
// layer another image uses is never changed: commit refuses it). The drained nodes' own
// requests into it are counted on the drained nodes.
std::unordered_set<ChildOwner*> affected(const std::vector<std::shared_ptr<Node>>& nodes) {
    std::unordered_set<ChildOwner*> set;
    for (const auto& n : nodes) {
        collect_above(n.get(), &set);
    }
    // Each owner's children are looked at once it joins, so a node below with two users in
    // the section (a diamond) joins when the second of them does.
    std::vector<ChildOwner*> frontier(set.begin(), set.end());
    for (size_t i = 0; i < frontier.size(); ++i) {
        for (const auto& c : frontier[i]->children()) {
            Node* below = c->node();
            if (set.count(below) == 0 && !used_by_outside_layer(below, set)) {
                set.insert(below);
                frontier.push_back(below);
            }
        }
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
