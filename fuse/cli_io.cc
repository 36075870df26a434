// imgfs io: scripted I/O through imgfs's own drivers (for tests and debugging), in the spirit of
// qemu-io -c.
#include <charconv>
#include <cstdio>
#include <sstream>

#include "core/chain_status.h"
#include "fuse/cli.h"
#include "fuse/cli_offline.h"

namespace imgfs::cli {

namespace {

const char* kIoHelp =
    "usage: imgfs io [-r] FILE -c CMD [-c CMD ...]\n"
    "\n"
    "Commands (offsets and lengths take K/M/G suffixes):\n"
    "  write [-P BYTE] OFF LEN     write LEN bytes of BYTE (default 0xcd)\n"
    "  write -z [-u] OFF LEN       write zeroes (-u: may deallocate)\n"
    "  discard OFF LEN\n"
    "  read [-P BYTE] OFF LEN      read; with -P, fail unless every byte is BYTE\n"
    "  flush\n"
    "  truncate SIZE               grow the image\n"
    "  map                         allocation of the whole chain\n"
    "  -r opens the image read-only.\n";

constexpr uint64_t kMaxTransferBytes = 1ULL << 30;  // one command's buffer

Result<uint64_t> num(const std::string& s) {
    if (s.rfind("0x", 0) == 0) {
        uint64_t v = 0;
        const char* end = s.data() + s.size();
        auto [ptr, ec] = std::from_chars(s.data() + 2, end, v, 16);
        if (s.size() == 2 || ec != std::errc{} || ptr != end) {
            return make_error(EINVAL, "invalid number '{}'", s);
        }
        return v;
    }
    return parse_size(s);
}

// A transfer must lie inside the disk, and its buffer stays bounded.
Status check_range(const std::string& op, uint64_t offset, uint64_t bytes, uint64_t disk_size) {
    if (offset > disk_size || bytes > disk_size - offset) {
        return make_error(EINVAL, "{}: {}+{} lies past the end of the disk ({} bytes)", op, offset,
                          bytes, disk_size);
    }
    if (op != "discard" && bytes > kMaxTransferBytes) {
        return make_error(EINVAL, "{}: at most {} bytes per command", op, kMaxTransferBytes);
    }
    return {};
}

Status run_command(Offline* s, const std::string& line) {
    std::istringstream in(line);
    std::vector<std::string> w;
    for (std::string t; in >> t;) {
        w.push_back(t);
    }
    if (w.empty()) {
        return {};
    }
    BlockBackend* be = s->user.get();
    EventLoop* loop = s->loop.get();
    const std::string& op = w[0];
    int pattern = -1;
    bool zero = false;
    bool unmap = false;
    std::vector<uint64_t> nums;
    for (size_t i = 1; i < w.size(); ++i) {
        if (w[i] == "-P" && i + 1 < w.size()) {
            TRY_ASSIGN(uint64_t p, num(w[++i]));
            if (p > 0xff) {
                return make_error(EINVAL, "-P takes a byte (0-255), not {}", w[i]);
            }
            pattern = static_cast<int>(p);
        } else if (w[i] == "-z") {
            zero = true;
        } else if (w[i] == "-u") {
            unmap = true;
        } else {
            TRY_ASSIGN(uint64_t n, num(w[i]));
            nums.push_back(n);
        }
    }
    if (op == "write" || op == "read" || op == "discard") {
        if (nums.size() != 2) {
            return make_error(EINVAL, "{}: needs OFF LEN", op);
        }
        TRY(check_range(op, nums[0], nums[1], be->size()));
    }
    if (op == "truncate" && (nums.size() != 1 || nums[0] % 512 != 0)) {
        return make_error(EINVAL, "truncate: needs one SIZE, a multiple of 512 bytes");
    }
    if (op == "write" && zero) {
        TRY(sync_wait(loop, be->write_zeroes(nums[0], nums[1], unmap)));
    } else if (op == "write") {
        std::vector<uint8_t> buf(nums[1], static_cast<uint8_t>(pattern < 0 ? 0xcd : pattern));
        TRY(sync_wait(loop, be->write(nums[0], buf)));
    } else if (op == "read") {
        std::vector<uint8_t> buf(nums[1]);
        TRY(sync_wait(loop, be->read(nums[0], buf)));
        if (pattern >= 0) {
            for (size_t i = 0; i < buf.size(); ++i) {
                if (buf[i] != pattern) {
                    return make_error(EIO, "pattern mismatch at offset {}: {:#x} != {:#x}",
                                      nums[0] + i, buf[i], pattern);
                }
            }
        }
    } else if (op == "discard") {
        TRY(sync_wait(loop, be->discard(nums[0], nums[1])));
    } else if (op == "flush") {
        TRY(sync_wait(loop, be->flush()));
    } else if (op == "truncate" && nums.size() == 1) {
        TRY(sync_wait(loop, be->truncate(nums[0])));
    } else if (op == "map") {
        Node* top = s->chain.top().get();
        for (uint64_t off = 0; off < top->size();) {
            TRY_ASSIGN(ChainStatus st,
                       sync_wait(loop, block_status_above(top, off, top->size() - off)));
            std::printf("%llu %llu %s %d\n", static_cast<unsigned long long>(off),
                        static_cast<unsigned long long>(st.bytes), st.data ? "data" : "zero",
                        st.depth);
            off += st.bytes;
        }
        return {};
    } else {
        return make_error(EINVAL, "unknown command '{}'", line);
    }
    std::printf("%s: ok\n", line.c_str());
    return {};
}

}  // namespace

int io(const Args& args) {
    bool read_only = false;
    std::string file;
    std::vector<std::string> cmds;
    for (size_t i = 0; i < args.size(); ++i) {
        if (args[i] == "--help" || args[i] == "-h") {
            std::fputs(kIoHelp, stdout);
            return 0;
        }
        if (args[i] == "-r") {
            read_only = true;
        } else if (args[i] == "-c" && i + 1 < args.size()) {
            cmds.push_back(args[++i]);
        } else if (file.empty() && args[i][0] != '-') {
            file = args[i];
        } else {
            return fail("usage: imgfs io [-r] FILE -c CMD [-c CMD ...]");
        }
    }
    if (file.empty()) {
        return fail("usage: imgfs io [-r] FILE -c CMD [-c CMD ...]");
    }
    Offline s;
    if (Status st = s.open(file, read_only); !st) {
        return fail(st.error().message());
    }
    int rc = 0;
    for (const auto& c : cmds) {
        if (Status st = run_command(&s, c); !st) {
            std::fprintf(stderr, "imgfs: %s: %s\n", c.c_str(), st.error().message().c_str());
            rc = 1;
            break;
        }
    }
    if (Status st = s.close(); !st) {
        return fail(st.error().message());
    }
    return rc;
}

}  // namespace imgfs::cli
