#include "core/graph.h"

#include <algorithm>
#include <cassert>
#include <unordered_map>

#include "core/node.h"

namespace imgfs {

struct Graph::Pending {
    Perms perm = 0;
    Perms shared = perm::kAll;
    size_t unresolved_parents = 0;
};

namespace {

std::string describe_user(const Child* c) {
    return fmt::format("{} (as {})", c->owner()->owner_name(), child_role_name(c->role()));
}

}  // namespace

// Two users of one node conflict when one needs what the other does not share.
Status Graph::check_conflicts(const Node* node) {
    const auto& ps = node->parents();
    for (const Child* a : ps) {
        for (const Child* b : ps) {
            if (a == b) {
                continue;
            }
            Perms clash = a->pending_perm_ & ~b->pending_shared_;
            if (clash != 0) {
                return make_error(EBUSY, "{}: {} needs {}, which {} does not allow", node->name(),
                                  describe_user(a), perms_to_string(clash), describe_user(b));
            }
        }
    }
    return {};
}

std::string perms_to_string(Perms p) {
    std::string s;
    auto add = [&](Perms bit, const char* name) {
        if ((p & bit) != 0) {
            s += s.empty() ? "" : "|";
            s += name;
        }
    };
    add(perm::kConsistentRead, "consistent-read");
    add(perm::kWrite, "write");
    add(perm::kWriteUnchanged, "write-unchanged");
    add(perm::kResize, "resize");
    return s.empty() ? "nothing" : s;
}

Graph::~Graph() {
    assert(nodes_.empty() && "graph destroyed with live nodes");
}

void Graph::register_node(Node* node) {
    nodes_.push_back(node);
}

void Graph::unregister_node(Node* node) {
    nodes_.erase(std::remove(nodes_.begin(), nodes_.end(), node), nodes_.end());
}

Node* Graph::find(const std::string& name) const {
    for (Node* n : nodes_) {
        if (n->name() == name) {
            return n;
        }
    }
    return nullptr;
}

Graph::PendingMap Graph::compute_pending() {
    // Top-down in topological order: a node's needs on its children depend on what all of its
    // own parents need of it, so it is resolved only once every parent edge is.
    PendingMap pending;
    std::vector<Node*> ready;
    for (Node* n : nodes_) {
        Pending& p = pending[n];
        for (Child* c : n->parents()) {
            if (c->owner()->as_node() != nullptr) {
                ++p.unresolved_parents;
            } else {
                c->pending_perm_ = c->user_perm_;
                c->pending_shared_ = c->user_shared_ | c->extra_shared_;
            }
        }
        if (p.unresolved_parents == 0) {
            ready.push_back(n);
        }
    }
    size_t resolved = 0;
    while (!ready.empty()) {
        Node* n = ready.back();
        ready.pop_back();
        ++resolved;
        Pending& p = pending[n];
        for (const Child* c : n->parents()) {
            p.perm |= c->pending_perm_;
            p.shared &= c->pending_shared_;
        }
        for (const auto& c : n->children()) {
            Perms cp = 0;
            Perms cs = perm::kAll;
            n->child_perm(*c, p.perm, p.shared, &cp, &cs);
            c->pending_perm_ = cp;
            c->pending_shared_ = cs | c->extra_shared_;
            Pending& child_pending = pending[c->node()];
            assert(child_pending.unresolved_parents > 0);
            if (--child_pending.unresolved_parents == 0) {
                ready.push_back(c->node());
            }
        }
    }
    assert(resolved == nodes_.size() && "cycle in the block graph");
    (void)resolved;  // read only by the assert
    return pending;
}

// Only nodes a change touches (their permissions, or who uses them) are checked and told: a
// node elsewhere may be in the middle of another image's operation (a layer frozen just before
// its switch), and it was checked when its permissions were last set. This keeps images
// independent.
std::vector<Node*> Graph::touched(const PendingMap& pending,
                                  const std::vector<const Node*>& restructured) const {
    std::vector<Node*> out;
    for (Node* n : nodes_) {
        const Pending& p = pending.at(n);
        bool changed = p.perm != n->cumulative_perm_ || p.shared != n->cumulative_shared_ ||
                       std::find(restructured.begin(), restructured.end(), n) != restructured.end();
        for (const Child* c : n->parents()) {
            changed = changed || c->pending_perm_ != c->perm_ ||
                      c->pending_shared_ != (c->shared_ | c->extra_shared_);
        }
        if (changed) {
            out.push_back(n);
        }
    }
    return out;
}

Status Graph::refresh_perms(const std::vector<const Node*>& restructured) {
    PendingMap pending = compute_pending();
    std::vector<Node*> checked = touched(pending, restructured);
    for (Node* n : checked) {
        TRY(check_conflicts(n));
        const Pending& p = pending.at(n);
        if (Status st = n->check_perm(p.perm, p.shared); !st) {
            return std::move(st).error();
        }
    }
    // Everything is consistent: apply.
    for (Node* n : nodes_) {
        for (Child* c : n->parents()) {
            c->perm_ = c->pending_perm_;
            c->shared_ = c->pending_shared_ & ~c->extra_shared_;
        }
    }
    for (Node* n : checked) {
        const Pending& p = pending.at(n);
        n->cumulative_perm_ = p.perm;
        n->cumulative_shared_ = p.shared;
        n->set_perm(p.perm, p.shared);
    }
    return {};
}

std::string Graph::dump() const {
    std::string out;
    for (const Node* n : nodes_) {
        for (const Child* c : n->parents()) {
            out += fmt::format("{} -> {} ({}) [{}; shares {}]\n", describe_user(c), n->name(),
                               n->driver_name(), perms_to_string(c->perm()),
                               perms_to_string(c->shared()));
        }
    }
    return out;
}

}  // namespace imgfs
