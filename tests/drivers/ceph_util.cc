#include "ceph_util.h"

#include <csignal>
#include <fstream>
#include <netinet/in.h>

#include <sys/socket.h>

namespace imgfs::test {

namespace {

// A loopback port nobody listens on now (the monitor binds it a moment later).
int free_port() {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        std::abort();
    }
    close(s);
    return ntohs(a.sin_port);
}

int read_pid(const std::string& file) {
    std::ifstream in(file);
    int pid = 0;
    in >> pid;
    return pid;
}

}  // namespace

CephCluster::CephCluster() {
    const std::string script = std::string(IMGFS_SOURCE_DIR) + "/tests/ceph/cluster.sh";
    conf_ = shell_output(script + " start " + dir_.path().string() + " --port " +
                         std::to_string(free_port()) + " --osd-mib 1024");
    while (!conf_.empty() && conf_.back() == '\n') {
        conf_.pop_back();
    }
    ok_ = !conf_.empty();
}

CephCluster::~CephCluster() {
    resume_osd();
    (void)shell(std::string(IMGFS_SOURCE_DIR) + "/tests/ceph/cluster.sh stop " +
                dir_.path().string());
}

std::string CephCluster::rbd(const std::string& args, int* status) const {
    const std::string out_file = dir_.file("rbd.out");
    int st = shell("CEPH_CONF=" + conf_ + " timeout 60 rbd " + args + " >" + out_file);
    if (status != nullptr) {
        *status = st;
    }
    std::ifstream in(out_file);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void CephCluster::pause_osd() const {
    if (int pid = read_pid(dir_.file("osd.pid")); pid > 0) {
        kill(pid, SIGSTOP);
    }
}

void CephCluster::resume_osd() const {
    if (int pid = read_pid(dir_.file("osd.pid")); pid > 0) {
        kill(pid, SIGCONT);
    }
}

RadosOptions rados_options(const CephCluster& cluster, uint32_t timeout_s) {
    RadosOptions o;
    o.conf_path = cluster.conf();
    o.timeout_s = timeout_s;
    return o;
}

}  // namespace imgfs::test
