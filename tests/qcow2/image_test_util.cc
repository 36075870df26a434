#include "qcow2/image_test_util.h"

#include <fcntl.h>
#include <fstream>
#include <regex>
#include <unistd.h>

#include "drivers/qcow2/format.h"

namespace imgfs::test {

uint64_t be64_at(const std::string& path, uint64_t offset) {
    uint8_t b[8] = {};
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    EXPECT_EQ(::pread(fd.get(), b, sizeof b, static_cast<off_t>(offset)), 8) << path;
    return qcow2::load_be64(b);
}

void put_be64_at(const std::string& path, uint64_t offset, uint64_t value) {
    uint8_t b[8] = {};
    qcow2::store_be64(b, value);
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    EXPECT_EQ(::pwrite(fd.get(), b, sizeof b, static_cast<off_t>(offset)), 8) << path;
}

void must(const std::string& cmd) {
    std::string out = shell_output(cmd + " 2>&1; echo \"rc=$?\"");
    ASSERT_NE(out.find("rc=0"), std::string::npos) << cmd << "\n" << out;
}

std::vector<uint8_t> qemu_convert_raw(const std::string& image, const std::string& extra) {
    std::string out = image + ".converted.raw";
    must("qemu-img convert " + extra + " -O raw '" + image + "' '" + out + "'");
    std::vector<uint8_t> data = read_file(out);
    std::remove(out.c_str());
    return data;
}

CheckResult qemu_check(const std::string& image) {
    CheckResult r;
    r.output = shell_output("qemu-img check --output=json '" + image + "' 2>&1; echo \"rc=$?\"");
    std::smatch m;
    auto field = [&](const char* name) -> uint64_t {
        std::regex re(std::string("\"") + name + "\": ([0-9]+)");
        return std::regex_search(r.output, m, re) ? std::stoull(m[1]) : 0;
    };
    r.corruptions = field("corruptions");
    r.leaks = field("leaks");
    r.check_errors = field("check-errors");
    std::regex rc("rc=([0-9]+)");
    if (std::regex_search(r.output, m, rc)) {
        r.exit_code = std::stoi(m[1]);
    }
    return r;
}

void write_file(const std::string& path, const std::vector<uint8_t>& data) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    std::vector<uint8_t> data(f ? static_cast<size_t>(f.tellg()) : 0);
    f.seekg(0);
    f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size()));
    data.resize(static_cast<size_t>(f.gcount()));
    return data;
}

Task<Result<std::vector<uint8_t>>> read_all(Node* node) {
    std::vector<uint8_t> out(node->size());
    const uint64_t chunk = 4ULL << 20;
    for (uint64_t off = 0; off < out.size(); off += chunk) {
        uint64_t n = std::min<uint64_t>(chunk, out.size() - off);
        CO_TRY(co_await node->read(off, MutBuf(out.data() + off, n)));
    }
    co_return out;
}

int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
    size_t n = std::min(a.size(), b.size());
    for (size_t i = 0; i < n; ++i) {
        if (a[i] != b[i]) {
            return static_cast<int64_t>(i);
        }
    }
    return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

}  // namespace imgfs::test
