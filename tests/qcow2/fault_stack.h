// A qcow2 node over a fault filter over an image file, for tests that fail its storage.
#pragma once

#include <fcntl.h>
#include <filesystem>
#include <memory>
#include <string>

#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/qcow2_node.h"
#include "test_util.h"

namespace imgfs::test {

class FaultStackTest : public LoopTest {
  protected:
    struct Stack {
        std::shared_ptr<FaultNode> fault;
        std::shared_ptr<Qcow2Node> node;
    };
    /// Opens `path` as file -> fault filter -> qcow2, loaded and attached for writing.
    Stack open(const std::string& path, qcow2::Options options = {}) {
        auto file = FileNode::open(env(), "file", AT_FDCWD, path, {});
        EXPECT_TRUE(file.ok()) << file.error().message();
        Transaction tx(&graph_);
        Stack s;
        s.fault = FaultNode::open(env(), "fault", &tx, *file);
        s.node = Qcow2Node::create(env(), "img", &tx, s.fault, options);
        EXPECT_TRUE(tx.commit().ok());
        Status st = run(s.node->load());
        EXPECT_TRUE(st.ok()) << st.error().message();
        use_rw(s.node);
        return s;
    }
    /// Opens `path` as file -> fault filter -> qcow2, loaded read-only and attached to no user:
    /// a layer that a later set_writable makes writable in place (the base of a commit).
    Stack open_read_only(const std::string& path) {
        auto file = FileNode::open(env(), "file", AT_FDCWD, path, {});
        EXPECT_TRUE(file.ok()) << file.error().message();
        Transaction tx(&graph_);
        Stack s;
        s.fault = FaultNode::open(env(), "fault", &tx, *file);
        qcow2::Options read_only;
        read_only.read_only = true;
        s.node = Qcow2Node::create(env(), "img", &tx, s.fault, read_only);
        EXPECT_TRUE(tx.commit().ok());
        Status st = run(s.node->load());
        EXPECT_TRUE(st.ok()) << st.error().message();
        return s;
    }
    /// open() on a fresh copy of `pristine` at `path`, seeded for the fault filter's choices
    /// (one seed of a test that runs over many).
    Stack open_copy(const std::string& pristine, const std::string& path, uint64_t seed,
                    uint32_t jitter_turns) {
        std::filesystem::copy_file(pristine, path,
                                   std::filesystem::copy_options::overwrite_existing);
        Stack s = open(path);
        s.fault->set_seed(seed);
        s.fault->set_jitter(jitter_turns);
        return s;
    }
};

}  // namespace imgfs::test
