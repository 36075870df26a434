// A throwaway Ceph cluster for one test process (tests/ceph/cluster.sh), and helpers to reach
// it: a connected pool and the `rbd` tool with the cluster's configuration.
#pragma once

#include <memory>
#include <string>

#include "drivers/rbd/rados.h"
#include "test_util.h"

namespace imgfs::test {

class CephCluster {
  public:
    /// Starts a cluster in a temporary directory on a free loopback port. Check ok() after.
    CephCluster();
    CephCluster(const CephCluster&) = delete;
    CephCluster& operator=(const CephCluster&) = delete;
    /// Stops the cluster (OSD, then monitor) by the PIDs the script recorded.
    ~CephCluster();

    [[nodiscard]] bool ok() const { return ok_; }
    [[nodiscard]] const std::string& conf() const { return conf_; }
    [[nodiscard]] std::string dir() const { return dir_.path().string(); }
    /// Runs `rbd ARGS` against this cluster; returns its stdout (exit status in *status).
    std::string rbd(const std::string& args, int* status = nullptr) const;
    /// Stops the OSD process (SIGSTOP: it holds its data and can be continued).
    void pause_osd() const;
    void resume_osd() const;

  private:
    TempDir dir_;
    std::string conf_;
    bool ok_ = false;
};

/// Connection options for `cluster` with a `timeout_s` deadline.
RadosOptions rados_options(const CephCluster& cluster, uint32_t timeout_s = 10);

}  // namespace imgfs::test

/// Skips when Ceph is not installed, except in CI, where that is a failure.
#define REQUIRE_CEPH()        \
    REQUIRE_TOOL("ceph-mon"); \
    REQUIRE_TOOL("ceph-osd")

namespace imgfs::test {

/// A loop test whose suite shares one cluster, started once per test process. Derived SetUp()s
/// return early if this one skipped or failed (`if (ceph_unusable()) return;`).
class CephLoopTest : public LoopTest {
  protected:
    static void SetUpTestSuite() { cluster_ = std::make_unique<CephCluster>(); }
    static void TearDownTestSuite() { cluster_.reset(); }
    void SetUp() override {
        LoopTest::SetUp();
        REQUIRE_CEPH();
        ASSERT_TRUE(cluster_->ok()) << "the test cluster did not start";
    }
    bool ceph_unusable() { return IsSkipped() || HasFatalFailure(); }

    static inline std::unique_ptr<CephCluster> cluster_;
};

}  // namespace imgfs::test
