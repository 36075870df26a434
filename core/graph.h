// Graph: the registry of live nodes and the permission refresh over all of them. The graph is
// changed only through a Transaction (core/transaction.h), which calls refresh_perms() once, on
// the final shape.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "core/result.h"

namespace imgfs {

class Node;

class Graph {
  public:
    Graph() = default;
    Graph(const Graph&) = delete;
    Graph& operator=(const Graph&) = delete;
    ~Graph();

    /// Recomputes every edge's permissions top-down and checks the nodes whose sets change, or
    /// whose users are in `restructured` (a node is checked when its permissions are taken, as
    /// an image lock is). On success the new sets are applied (changed nodes see set_perm); on
    /// failure nothing changes and the error names the node and the two users that conflict.
    Status refresh_perms(const std::vector<const Node*>& restructured = {});

    [[nodiscard]] const std::vector<Node*>& nodes() const { return nodes_; }
    /// A live node by name, or null.
    [[nodiscard]] Node* find(const std::string& name) const;
    /// Lines like "backend vm1 -> vm1.qcow2 (qcow2) [write]" for debugging and tests.
    [[nodiscard]] std::string dump() const;

  private:
    friend class Node;
    struct Pending;
    using PendingMap = std::unordered_map<const Node*, Pending>;
    void register_node(Node* node);
    void unregister_node(Node* node);
    static Status check_conflicts(const Node* node);
    /// Every node's sets if the refresh went through, top-down (into the edges' pending sets).
    PendingMap compute_pending();
    /// The nodes a refresh checks and tells: sets or users changed.
    std::vector<Node*> touched(const PendingMap& pending,
                               const std::vector<const Node*>& restructured) const;

    std::vector<Node*> nodes_;
};

}  // namespace imgfs
