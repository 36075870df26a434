#include "core/transaction.h"

#include <algorithm>
#include <cassert>

#include "core/graph.h"
#include "core/log.h"

namespace imgfs {

Transaction::~Transaction() {
    if (!done_) {
        abort();
    }
}

bool Transaction::is_descendant(const Node* maybe_descendant, const Node* ancestor) {
    if (maybe_descendant == ancestor) {
        return true;
    }
    for (const auto& c : ancestor->children()) {
        if (is_descendant(maybe_descendant, c->node())) {
            return true;
        }
    }
    return false;
}

Child* Transaction::attach(ChildOwner* owner, std::shared_ptr<Node> node, ChildRole role,
                           std::string name, Perms perm, Perms shared) {
    assert(!done_);
    removal_only_ = false;
    [[maybe_unused]] Node* owner_node = owner->as_node();
    assert(owner_node == nullptr || !is_descendant(owner_node, node.get()));
    assert((owner_node == nullptr) == (role == ChildRole::kUser));
    restructured_.push_back(node.get());
    auto child = std::make_unique<Child>(owner, std::move(node), role, std::move(name));
    child->user_perm_ = perm;
    child->user_shared_ = shared;
    Child* raw = child.get();
    raw->link();
    owner->children_.push_back(std::move(child));
    actions_.push_back(Action{nullptr, [owner, raw] {
                                  auto& cs = owner->children_;
                                  auto it =
                                      std::find_if(cs.begin(), cs.end(),
                                                   [raw](const auto& c) { return c.get() == raw; });
                                  assert(it != cs.end());
                                  cs.erase(it);  // unlinks in ~Child
                              }});
    return raw;
}

void Transaction::detach(Child* child) {
    assert(!done_);
    assert(child != nullptr && "detach of an edge that is not there");
    restructured_.push_back(child->node());
    ChildOwner* owner = child->owner();
    auto& cs = owner->children_;
    auto it =
        std::find_if(cs.begin(), cs.end(), [child](const auto& c) { return c.get() == child; });
    assert(it != cs.end());
    size_t index = static_cast<size_t>(it - cs.begin());
    // The edge object lives in the action until the transaction ends, so abort can put it back
    // exactly where it was.
    auto held = std::make_shared<std::unique_ptr<Child>>(std::move(*it));
    cs.erase(it);
    child->unlink();
    actions_.push_back(
        Action{[held] { held->reset(); },
               [owner, held, index] {
                   Child* c = held->get();
                   c->link();
                   auto& v = owner->children_;
                   v.insert(v.begin() + static_cast<std::ptrdiff_t>(std::min(index, v.size())),
                            std::move(*held));
               }});
}

void Transaction::replace_node(Node* old_node, const std::shared_ptr<Node>& replacement) {
    assert(!done_);
    removal_only_ = false;
    assert(old_node->quiesced() || old_node->parents().empty() || old_node->in_flight() == 0);
    restructured_.push_back(old_node);
    restructured_.push_back(replacement.get());
    std::vector<Child*> moving;
    for (Child* c : old_node->parents()) {
        if (c->owner() != replacement.get()) {
            moving.push_back(c);
        }
    }
    for (Child* c : moving) {
        [[maybe_unused]] Node* owner_node = c->owner()->as_node();
        assert(owner_node == nullptr || !is_descendant(owner_node, replacement.get()));
        std::shared_ptr<Node> previous = c->node_;
        c->unlink();
        c->node_ = replacement;
        c->link();
        actions_.push_back(Action{nullptr, [c, previous] {
                                      c->unlink();
                                      c->node_ = previous;
                                      c->link();
                                  }});
    }
}

Child* Transaction::append_overlay(const std::shared_ptr<Node>& top,
                                   const std::shared_ptr<Node>& overlay) {
    // Take the users first, then attach: attach's cycle check sees the final shape.
    replace_node(top.get(), overlay);
    return attach(overlay.get(), top, ChildRole::kBacking, "backing");
}

void Transaction::set_user_perm(Child* child, Perms perm, Perms shared) {
    assert(child->user_edge());
    removal_only_ = false;
    Perms old_perm = child->user_perm_;
    Perms old_shared = child->user_shared_;
    child->user_perm_ = perm;
    child->user_shared_ = shared;
    actions_.push_back(Action{nullptr, [child, old_perm, old_shared] {
                                  child->user_perm_ = old_perm;
                                  child->user_shared_ = old_shared;
                              }});
}

void Transaction::set_extra_shared(Child* child, Perms extra) {
    removal_only_ = false;
    Perms old = child->extra_shared_;
    child->extra_shared_ = extra;
    actions_.push_back(Action{nullptr, [child, old] { child->extra_shared_ = old; }});
}

void Transaction::add_action(std::function<void()> on_commit, std::function<void()> on_abort) {
    removal_only_ = false;
    actions_.push_back(Action{std::move(on_commit), std::move(on_abort)});
}

Status Transaction::commit() {
    assert(!done_);
    Status st = graph_->refresh_perms(restructured_);
    if (!st) {
        abort();
        return st;
    }
    run_commit_actions();
    return {};
}

Status Transaction::commit_removal() {
    assert(!done_);
    assert(removal_only_ && "commit_removal of a transaction that does more than detach");
    Status st = graph_->refresh_perms(restructured_);
    run_commit_actions();
    return st;
}

void Transaction::run_commit_actions() {
    done_ = true;
    for (Action& a : actions_) {
        if (a.commit) {
            a.commit();
        }
    }
    actions_.clear();
}

void Transaction::abort() {
    assert(!done_);
    done_ = true;
    for (auto it = actions_.rbegin(); it != actions_.rend(); ++it) {
        if (it->abort) {
            it->abort();
        }
    }
    actions_.clear();
    // Recompute on the restored shape. It was consistent before; if an outside party (another
    // process's image lock) changed meanwhile, the sets applied before stay in force. Nothing
    // above can act on that (a failed commit reports its own error, a destructor has no caller
    // to tell), so it is logged through the nodes' environment.
    Status st = graph_->refresh_perms(restructured_);
    if (!st) {
        log_refresh_failure(st.error());
    }
}

void Transaction::log_refresh_failure(const Error& error) const {
    // Not restructured_: an undone attach may have freed a node it names.
    for (const Node* n : graph_->nodes()) {
        if (n->env().log != nullptr) {
            n->env().log->warn("permissions not refreshed after undoing a graph change: {}",
                               error.message());
            return;
        }
    }
}

}  // namespace imgfs
