// Transaction: every change to the graph's shape goes through one. Structural changes are made
// at once (without permission checks, since intermediate shapes can conflict where the final one
// does not) and recorded with their undo. commit() refreshes permissions once, on the final
// graph, checking only the nodes the transaction touched (Graph::refresh_perms); if that fails,
// every change is undone in reverse order and the graph is exactly as it was. A transaction
// that only detaches edges can use commit_removal() instead, which keeps the removal even then.
// Destroying an uncommitted transaction aborts it.
//
// Edges must be quiet where they change: replace_node() expects the node it replaces to be
// drained or idle (asserted; assertions stay on in every build), detach() expects no request in
// flight through the edge it removes (not checked; the edge is freed when the transaction
// commits).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/node.h"

namespace imgfs {

class Graph;

class Transaction {
  public:
    explicit Transaction(Graph* graph) : graph_(graph) {}
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    ~Transaction();

    /// Adds an edge owner -> node. For user edges (backends, jobs) `perm`/`shared` state what
    /// the owner needs and allows; node edges compute theirs in Node::child_perm.
    Child* attach(ChildOwner* owner, std::shared_ptr<Node> node, ChildRole role, std::string name,
                  Perms perm = 0, Perms shared = perm::kAll);
    /// Removes an edge. If it held the last reference to its node, the node goes when the
    /// transaction commits; callers that must close() the node keep a reference of their own.
    void detach(Child* child);
    /// Points every edge into `old_node` at `replacement` instead, except edges owned by
    /// `replacement` itself (so an overlay keeps its backing edge to the node it replaces).
    void replace_node(Node* old_node, const std::shared_ptr<Node>& replacement);
    /// `overlay` gets `top` as its backing and takes over every user of `top`.
    Child* append_overlay(const std::shared_ptr<Node>& top, const std::shared_ptr<Node>& overlay);
    /// Changes what a user edge needs and allows.
    void set_user_perm(Child* child, Perms perm, Perms shared);
    /// Lets other users of child's node do `extra` although the edge's owner normally forbids it
    /// (a commit job writing into the backing of the chain it merges).
    void set_extra_shared(Child* child, Perms extra);
    /// Custom steps: `on_commit` runs after a successful commit, `on_abort` when undoing.
    void add_action(std::function<void()> on_commit, std::function<void()> on_abort);

    /// Refreshes permissions on the final graph; on failure undoes everything.
    Status commit();
    /// Commits a transaction that only detached edges. Taking users away cannot need a
    /// permission the graph did not grant before, so the removal stands even if the refresh is
    /// refused (another process's image lock appeared meanwhile): the permissions applied before
    /// stay in force until the next refresh succeeds. Returns the refresh's error, for the log.
    Status commit_removal();
    /// Undoes every change now.
    void abort();

  private:
    struct Action {
        std::function<void()> commit;
        std::function<void()> abort;
    };
    // True if `maybe_descendant` is `ancestor` or below it: attach() and replace_node() assert
    // with it that no edge makes the graph cyclic (a programming error).
    static bool is_descendant(const Node* maybe_descendant, const Node* ancestor);

    void run_commit_actions();
    // Tells the log of the first live node that has one (the graph itself has none).
    void log_refresh_failure(const Error& error) const;

    Graph* graph_;
    std::vector<Action> actions_;
    std::vector<const Node*> restructured_;  // nodes whose users this transaction changed
    bool done_ = false;
    bool removal_only_ = true;  // nothing but detach() so far
};

}  // namespace imgfs
