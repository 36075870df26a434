// Shared helpers for the unit tests: a loop fixture, temporary directories, seeded data.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/event_loop.h"
#include "core/graph.h"
#include "core/log.h"
#include "core/node.h"
#include "core/transaction.h"

namespace imgfs::test {

/// Owns an event loop and a graph; run() drives a task to completion.
class LoopTest : public ::testing::Test {
  protected:
    void SetUp() override {
        auto l = EventLoop::create();
        ASSERT_TRUE(l.ok()) << l.error().message();
        loop_ = std::move(*l);
    }
    template <typename T>
    T run(Task<T> task) {
        return sync_wait(loop_.get(), std::move(task));
    }
    NodeEnv env() { return NodeEnv{loop_.get(), &log_, &graph_}; }

    /// Attaches a backend that reads and writes `node`, so its edges below get write
    /// permission, as an export would. The fixture keeps it until the test ends.
    BlockBackend* use_rw(std::shared_ptr<Node> node) {
        users_.push_back(std::make_unique<BlockBackend>(loop_.get(), "test"));
        Transaction tx(&graph_);
        users_.back()->attach(&tx, std::move(node),
                              perm::kConsistentRead | perm::kWrite | perm::kResize,
                              perm::kConsistentRead | perm::kWriteUnchanged);
        Status st = tx.commit();
        EXPECT_TRUE(st.ok()) << st.error().message();
        return users_.back().get();
    }
    void TearDown() override { users_.clear(); }

    CaptureLogger log_;
    // Declared before anything holding nodes so it outlives them.
    Graph graph_;
    std::unique_ptr<EventLoop> loop_;
    std::vector<std::unique_ptr<BlockBackend>> users_;
};

/// /dev/shm if it is a usable tmpfs, else the temp directory.
inline std::string memory_backed() {
    return access("/dev/shm", W_OK) == 0 ? "/dev/shm"
                                         : std::filesystem::temp_directory_path().string();
}

/// A directory removed (with its contents) when the object goes away.
class TempDir {
  public:
    TempDir() : TempDir(std::filesystem::temp_directory_path().string()) {}
    /// In `base`; memory_backed() picks a tmpfs for tests where fsync cost is noise.
    explicit TempDir(const std::string& base) {
        std::string tmpl = base + "/imgfs-test-XXXXXX";
        char* p = mkdtemp(tmpl.data());
        if (p == nullptr) {
            std::abort();
        }
        path_ = p;
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    [[nodiscard]] const std::filesystem::path& path() const { return path_; }
    [[nodiscard]] std::string file(const std::string& name) const {
        return (path_ / name).string();
    }

  private:
    std::filesystem::path path_;
};

inline std::vector<uint8_t> random_bytes(std::mt19937_64* rng, size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) {
        b = static_cast<uint8_t>((*rng)());
    }
    return v;
}

/// Runs a shell command; returns its exit status.
int shell(const std::string& cmd);
/// Runs a shell command and returns its stdout.
std::string shell_output(const std::string& cmd);
/// True if `tool` is on PATH. Outside CI a missing tool skips; in CI it fails.
bool have_tool(const std::string& tool);
/// True when running under CI (the CI variable is set): skipping is then forbidden.
bool in_ci();

}  // namespace imgfs::test

/// Skips the test if `tool` is missing, except in CI, where that is a failure.
#define REQUIRE_TOOL(tool)                                                    \
    do {                                                                      \
        if (!::imgfs::test::have_tool(tool)) {                                \
            if (::imgfs::test::in_ci()) {                                     \
                FAIL() << tool << " is required in CI but missing";           \
            }                                                                 \
            GTEST_SKIP() << tool << " not installed (CI unset, so skipping)"; \
        }                                                                     \
    } while (0)
