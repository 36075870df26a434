#include "ceph_util.h"

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <netinet/in.h>
#include <string>
#include <thread>

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
    const std::string dir = dir_.path().string();
    // The port is free when picked, but another process may bind it before the monitor does
    // (which tries once): a new port, in an emptied directory, up to 3 times.
    for (int attempt = 0; attempt < 3 && conf_.empty(); ++attempt) {
        if (attempt != 0) {
            (void)shell(script + " stop " + dir + " && rm -rf " + dir + "/*");
        }
        conf_ = shell_output(script + " start " + dir + " --port " + std::to_string(free_port()) +
                             " --osd-mib 1024");
        while (!conf_.empty() && conf_.back() == '\n') {
            conf_.pop_back();
        }
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

namespace {

// Whether every thread of `pid` is stopped (state T in /proc/PID/task/*/stat).
bool all_threads_stopped(int pid) {
    const std::filesystem::path tasks = "/proc/" + std::to_string(pid) + "/task";
    std::error_code ec;
    for (const auto& task : std::filesystem::directory_iterator(tasks, ec)) {
        std::ifstream in(task.path() / "stat");
        std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const size_t paren = stat.rfind(')');
        if (paren == std::string::npos || paren + 2 >= stat.size() ||
            (stat[paren + 2] != 'T' && stat[paren + 2] != 't')) {
            return false;
        }
    }
    return !ec;
}

}  // namespace

void CephCluster::pause_osd() const {
    const int pid = read_pid(dir_.file("osd.pid"));
    ASSERT_GT(pid, 0) << "no OSD pid in " << dir_.file("osd.pid");
    ASSERT_EQ(kill(pid, SIGSTOP), 0);
    // kill() returns before the OSD's threads have stopped: one still running could answer a
    // request sent right after (seen once in the sanitizer tier). Wait until all have.
    for (int i = 0; i < 2000 && !all_threads_stopped(pid); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(all_threads_stopped(pid)) << "the OSD (pid " << pid << ") did not stop";
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
