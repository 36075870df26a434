// imgfs mount / unmount.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "drivers/rbd/rbd_store.h"
#include "fuse/cli.h"
#include "fuse/daemon.h"

namespace imgfs::cli {

namespace {

const char* kMountHelp =
    "usage: imgfs mount [-f] [-v] [-o OPTS] IMAGE_DIR|rbd:POOL[/NAMESPACE] MOUNTPOINT\n"
    "\n"
    "Serves every image chain in IMAGE_DIR as MOUNTPOINT/NAME.raw, with control files in\n"
    "MOUNTPOINT/.control. Runs as a daemon unless -f; unmount with 'imgfs unmount MOUNTPOINT'.\n"
    "rbd:POOL serves the RBD images of a Ceph pool (or of a namespace of it) the same way.\n"
    "\n"
    "  -f            stay in the foreground, log to stderr\n"
    "  -v, -d        verbose log\n"
    "  -o OPTS       comma separated:\n"
    "     ro                      read-only\n"
    "     allow_other             let other users in (needs user_allow_other for non-root)\n"
    "     allow_root              let root in as well as you (passed to FUSE)\n"
    "     cache_size=SIZE         L2 table cache per qcow2 layer (default: maps 64 GiB,\n"
    "                             at most 32 MiB: less with clusters under 16 KiB)\n"
    "     allow_external_backing  backing files may lie outside IMAGE_DIR\n"
    "     direct                  open image files with O_DIRECT (writes too; without it\n"
    "                             only reads the page cache lacks go direct)\n"
    "     uring=auto|on|off       FUSE-over-io_uring transport (default auto: used when the\n"
    "                             kernel offers it, i.e. /sys/module/fuse/parameters/\n"
    "                             enable_uring is Y; on: the mount fails without it)\n"
    "     threads=N               event loops serving the FUSE-over-io_uring queues, one\n"
    "                             thread each (default 1; at most the CPUs)\n"
    "     poll_us=N               how long an idle event loop watches for the next request\n"
    "                             before it sleeps (default 30; 0: never); adapts to load\n"
    "     ceph_conf=PATH          rbd: the cluster's ceph.conf (default $CEPH_CONF, else\n"
    "                             /etc/ceph/ceph.conf)\n"
    "     ceph_id=NAME            rbd: the client name without 'client.' (default admin)\n"
    "     ceph_timeout=SECONDS    rbd: deadline of every cluster operation (default 30);\n"
    "                             past it the request fails with EIO\n"
    "     faults=FILE             debug: inject I/O errors by the rules in FILE (see below)\n"
    "     ring_queues=N           debug: FUSE ring queues to register (default: one per\n"
    "                             possible CPU, as the kernel keeps; more makes it refuse)\n"
    "     max_read=N              largest read FUSE sends (default and most: 1 MiB)\n"
    "     fsname=NAME             the source /proc/mounts shows (default: the source)\n"
    "     debug                   the same as -v\n"
    "     default_permissions     accepted; the mount always has it\n"
    "     subtype=TYPE            accepted and ignored (the subtype is always imgfs)\n"
    "     The options mount(8) passes (rw, defaults, nofail, _netdev, x-*, ...) are ignored.\n"
    "     Others (uid=, gid=, umask=, any further FUSE or unknown option) fail the mount.\n"
    "\n"
    "Fault rules (faults=FILE; for tests, never for real data): one rule per line, '#' starts\n"
    "a comment. A rule is OPS followed by any of:\n"
    "  OPS           read, write, write-zeroes, discard, flush, writes (the three write kinds)\n"
    "                or any; several joined with '+'\n"
    "  errno=E       the error to inject: EIO (default), ENOSPC, ... or a number\n"
    "  once|always   fire a single time, or every time from the nth on (default always)\n"
    "  nth=N         fire from the Nth matching request on (default 1)\n"
    "  offset=N bytes=N   only requests overlapping that range of the image file\n"
    "  event=STEP    only requests of that step of the format driver: data-read, data-write,\n"
    "                cow-read, cow-write, header, l1, l2-write, l2-alloc, refblock-write,\n"
    "                refblock-alloc, reftable-grow\n"
    "  layers=top|all     which layers of each chain get the rule (default top)\n"
    "  file=NAME     only the layer stored in image file NAME\n"
    "  drop          report success without doing the write (a write lost in a crash)\n"
    "  short         pass a random part of a write on, then fail it (ENOSPC part way)\n"
    "  late          pass the whole write on, then fail it (it landed; the error did not)\n"
    "  probability=P fire on a random fraction P (0 < P <= 1) of the requests it matches\n"
    "These rules sit in a filter between a layer's format driver and its file. OPS\n"
    "'fdatasync' instead makes the file driver's own fdatasync fail (from the nth on), as\n"
    "the kernel would: the image then refuses writes and flushes until remounted.\n"
    "Example: 'write event=l2-alloc errno=ENOSPC once'. The rules apply to the file I/O of\n"
    "chains opened at mount and by rescan; requests are counted per layer.\n";

bool ignorable(const std::string& o) {
    static const char* kIgnored[] = {"rw",
                                     "defaults",
                                     "auto",
                                     "noauto",
                                     "user",
                                     "nouser",
                                     "users",
                                     "_netdev",
                                     "nofail",
                                     "exec",
                                     "noexec",
                                     "suid",
                                     "nosuid",
                                     "dev",
                                     "nodev",
                                     "atime",
                                     "noatime",
                                     "relatime",
                                     "default_permissions",
                                     "async",
                                     "sync",
                                     "strictatime",
                                     "nodiratime",
                                     "diratime"};
    for (const char* i : kIgnored) {
        if (o == i) {
            return true;
        }
    }
    return o.rfind("x-", 0) == 0 || o.rfind("subtype=", 0) == 0 || o.rfind("comment=", 0) == 0;
}

Result<uint32_t> parse_fault_ops(const std::string& text) {
    static const std::pair<const char*, uint32_t> kOps[] = {
        {"read", fault_op::kRead},
        {"write", fault_op::kWrite},
        {"write-zeroes", fault_op::kWriteZeroes},
        {"discard", fault_op::kDiscard},
        {"flush", fault_op::kFlush},
        {"writes", fault_op::kAllWrites},
        {"any", fault_op::kAny}};
    uint32_t ops = 0;
    std::stringstream in(text);
    std::string word;
    while (std::getline(in, word, '+')) {
        auto it = std::find_if(std::begin(kOps), std::end(kOps),
                               [&word](const auto& op) { return word == op.first; });
        if (it == std::end(kOps)) {
            return make_error(EINVAL, "unknown operation '{}'", word);
        }
        ops |= it->second;
    }
    return ops;
}

Result<int> parse_errno(const std::string& text) {
    for (int e = 1; e < 200; ++e) {
        const char* name = ::strerrorname_np(e);
        if (name != nullptr && text == name) {
            return e;
        }
    }
    char* end = nullptr;
    long v = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || v <= 0 || v >= 4096) {
        return make_error(EINVAL, "unknown errno '{}'", text);
    }
    return static_cast<int>(v);
}

// One word of a rule after the operations: a flag or KEY=VALUE.
Status apply_fault_word(const std::string& word, ChainFault* f) {
    size_t eq = word.find('=');
    std::string key = word.substr(0, eq);
    std::string value = eq == std::string::npos ? "" : word.substr(eq + 1);
    if (word == "once" || word == "always") {
        f->rule.once = word == "once";
    } else if (word == "drop") {
        f->rule.action = FaultAction::kDrop;
    } else if (word == "short") {
        f->rule.action = FaultAction::kShort;
    } else if (word == "late") {
        f->rule.action = FaultAction::kLate;
    } else if (key == "probability") {
        char* end = nullptr;
        double p = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0' || !(p > 0.0 && p <= 1.0)) {
            return make_error(EINVAL, "probability '{}' is not in (0, 1]", value);
        }
        f->rule.probability = p;
    } else if (eq == std::string::npos) {
        return make_error(EINVAL, "unknown word '{}'", word);
    } else if (key == "errno") {
        TRY_ASSIGN(f->rule.errnum, parse_errno(value));
    } else if (key == "nth") {
        TRY_ASSIGN(f->rule.nth, parse_size(value));
    } else if (key == "offset") {
        TRY_ASSIGN(f->rule.offset, parse_size(value));
    } else if (key == "bytes") {
        TRY_ASSIGN(f->rule.bytes, parse_size(value));
    } else if (key == "event") {
        f->rule.event = io_event_from_name(value);
        if (f->rule.event == IoEvent::kNone) {
            return make_error(EINVAL, "unknown event '{}'", value);
        }
    } else if (key == "layers" && (value == "top" || value == "all")) {
        f->all_layers = value == "all";
    } else if (key == "file" && !value.empty()) {
        f->file = value;
    } else {
        return make_error(EINVAL, "bad '{}'", word);
    }
    return {};
}

// One line of a rule file: OPS followed by flags and KEY=VALUE words.
Result<ChainFault> parse_fault_rule(std::istringstream* words, const std::string& ops) {
    ChainFault f;
    f.fdatasync = ops == "fdatasync";
    if (f.fdatasync) {
        f.rule.ops = fault_op::kFlush;
    } else {
        TRY_ASSIGN(f.rule.ops, parse_fault_ops(ops));
    }
    std::string word;
    while (*words >> word) {
        TRY(apply_fault_word(word, &f));
    }
    if (f.fdatasync && (f.rule.event != IoEvent::kNone || f.rule.offset != 0 ||
                        f.rule.bytes != FaultRule{}.bytes || f.rule.action != FaultAction::kError ||
                        f.rule.probability != 1.0)) {
        return make_error(EINVAL, "fdatasync rules take only errno=, nth=, layers= and file=");
    }
    return f;
}

// Reads a fault rule file (format in kMountHelp) now, so that a bad file fails the mount.
Result<std::vector<ChainFault>> read_fault_rules(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
        return make_error(EINVAL, "faults={}: cannot read the rule file ({})", path,
                          std::strerror(errno));
    }
    std::vector<ChainFault> rules;
    std::string line;
    for (int number = 1; std::getline(in, line); ++number) {
        std::istringstream words(line.substr(0, line.find('#')));
        std::string ops;
        if (!(words >> ops)) {
            continue;
        }
        Result<ChainFault> f = parse_fault_rule(&words, ops);
        if (!f) {
            return make_error(EINVAL, "faults={} line {}: {}", path, number, f.error().context);
        }
        rules.push_back(std::move(*f));
    }
    if (in.bad()) {
        return make_error(EIO, "faults={}: read error", path);
    }
    if (rules.empty()) {
        return make_error(EINVAL, "faults={}: no rules in the file", path);
    }
    return rules;
}

std::string absolute(const std::string& p) {
    char buf[PATH_MAX];
    return ::realpath(p.c_str(), buf) != nullptr ? std::string(buf) : p;
}

// The whole decimal number of option `o` (NAME=VALUE), from `min` to `max`.
Result<uint32_t> parse_number_option(const std::string& o, uint32_t min, uint32_t max,
                                     const char* what) {
    const size_t eq = o.find('=');
    const std::string value = o.substr(eq + 1);
    uint32_t n = 0;
    auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
    if (ec != std::errc() || end != value.data() + value.size() || n < min || n > max) {
        return make_error(EINVAL, "{}: expected {}, {} to {}", o, what, min, max);
    }
    return n;
}

// The size of option `o` (NAME=SIZE); an error names the option.
Result<uint64_t> parse_size_option(const std::string& o) {
    Result<uint64_t> bytes = parse_size(o.substr(o.find('=') + 1));
    if (!bytes) {
        return make_error(EINVAL, "{}: {}", o, bytes.error().context);
    }
    return bytes;
}

Status apply_option(const std::string& o, MountCommand* cmd) {
    if (o.empty() || ignorable(o)) {
        return {};
    }
    if (o == "ro") {
        cmd->mount.read_only = cmd->images.read_only = true;
    } else if (o == "allow_other") {
        cmd->mount.allow_other = true;
    } else if (o == "allow_root") {
        cmd->mount.extra.push_back("allow_root");
    } else if (o == "allow_external_backing") {
        cmd->images.allow_external_backing = true;
    } else if (o == "direct") {
        cmd->images.direct = true;
    } else if (o == "debug") {
        cmd->verbose = true;
    } else if (o.rfind("cache_size=", 0) == 0) {
        TRY_ASSIGN(uint64_t bytes, parse_size_option(o));
        if (bytes == 0) {
            return make_error(EINVAL, "{}: a cache holds at least one table", o);
        }
        cmd->images.qcow2.l2_cache_bytes = bytes;
    } else if (o.rfind("max_read=", 0) == 0) {
        TRY_ASSIGN(uint64_t bytes, parse_size_option(o));
        cmd->mount.max_read_bytes = static_cast<uint32_t>(std::min<uint64_t>(bytes, 1U << 20));
    } else if (o.rfind("faults=", 0) == 0) {
        TRY_ASSIGN(std::vector<ChainFault> rules, read_fault_rules(o.substr(7)));
        cmd->images.faults.insert(cmd->images.faults.end(), rules.begin(), rules.end());
    } else if (o.rfind("uring=", 0) == 0) {
        TRY_ASSIGN(cmd->uring, fuse_uring::parse_mode(o.substr(6)));
    } else if (o.rfind("threads=", 0) == 0) {
        TRY_ASSIGN(cmd->threads, parse_number_option(o, 1, 64, "a number of event loops"));
    } else if (o.rfind("ring_queues=", 0) == 0) {
        TRY_ASSIGN(cmd->ring_queues, parse_number_option(o, 1, 4096, "a number of queues"));
    } else if (o.rfind("poll_us=", 0) == 0) {
        TRY_ASSIGN(cmd->poll_us, parse_number_option(o, 0, 1000, "microseconds"));
    } else if (o.rfind("ceph_conf=", 0) == 0) {
        cmd->rados.conf_path = absolute(o.substr(10));
    } else if (o.rfind("ceph_id=", 0) == 0) {
        cmd->rados.client_id = o.substr(8);
    } else if (o.rfind("ceph_timeout=", 0) == 0) {
        TRY_ASSIGN(cmd->rados.timeout_s, parse_number_option(o, 1, 3600, "seconds"));
    } else if (o.rfind("fsname=", 0) == 0) {
        cmd->mount.fsname = o.substr(7);
    } else {
        return make_error(EINVAL, "unknown mount option '{}'", o);
    }
    return {};
}

}  // namespace

int mount(const Args& args) {
    MountCommand cmd;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--help" || a == "-h") {
            std::fputs(kMountHelp, stdout);
            return 0;
        }
        if (a == "-f") {
            cmd.foreground = true;
        } else if (a == "-v" || a == "-d") {
            cmd.verbose = true;
        } else if (a == "-o" || a.rfind("-o", 0) == 0) {
            if (a == "-o" && i + 1 >= args.size()) {
                return fail("-o needs a list of options (see imgfs mount --help)");
            }
            std::string opts = a == "-o" ? args[++i] : a.substr(2);
            size_t pos = 0;
            while (pos <= opts.size()) {
                size_t comma = opts.find(',', pos);
                std::string o =
                    opts.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
                if (Status st = apply_option(o, &cmd); !st) {
                    return fail(st.error().context);
                }
                if (comma == std::string::npos) {
                    break;
                }
                pos = comma + 1;
            }
        } else if (!a.empty() && a[0] == '-') {
            return fail("unknown option " + a + " (see imgfs mount --help)");
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 2) {
        return fail("usage: imgfs mount [-f] [-v] [-o OPTS] IMAGE_DIR|rbd:POOL MOUNTPOINT");
    }
    // A pool is named as the user wrote it; a directory by its absolute path.
    cmd.image_dir = is_rbd_spec(positional[0]) ? positional[0] : absolute(positional[0]);
    cmd.mountpoint = absolute(positional[1]);
    return run_mount(cmd);
}

int unmount(const Args& args) {
    if (args.size() == 1 && (args[0] == "--help" || args[0] == "-h")) {
        std::puts(
            "usage: imgfs unmount MOUNTPOINT\n\nUnmounts and waits until the daemon has "
            "flushed and closed every image.");
        return 0;
    }
    if (args.size() != 1) {
        return fail("usage: imgfs unmount MOUNTPOINT");
    }
    return run_unmount(absolute(args[0]), 120);
}

// qemu-img's size syntax: a number, a fraction allowed with a unit ("1.5G"), and a unit of
// b, k, M, G, T, P or E (binary multiples, any case, optionally followed by "iB" or "B").
Result<uint64_t> parse_size(const std::string& text) {
    size_t digits = text.find_first_not_of("0123456789");
    std::string whole = text.substr(0, digits);
    std::string fraction;
    std::string suffix = digits == std::string::npos ? "" : text.substr(digits);
    if (!suffix.empty() && suffix[0] == '.') {
        size_t end = suffix.find_first_not_of("0123456789", 1);
        fraction = suffix.substr(1, end == std::string::npos ? std::string::npos : end - 1);
        suffix = end == std::string::npos ? "" : suffix.substr(end);
        if (fraction.empty() || fraction.size() > 18) {
            return make_error(EINVAL, "invalid size '{}'", text);
        }
    }
    if (whole.empty() || whole.size() > 20) {
        return make_error(EINVAL, "invalid size '{}'", text);
    }
    static const std::string kUnits = "bkmgtpe";
    std::string unit = suffix;
    for (const char* tail : {"iB", "ib", "B"}) {
        if (unit.size() > 1 && unit.size() == 1 + std::strlen(tail) &&
            unit.compare(1, std::string::npos, tail) == 0) {
            unit.resize(1);
        }
    }
    size_t power = 0;
    if (!unit.empty()) {
        power = unit.size() == 1 ? kUnits.find(static_cast<char>(std::tolower(unit[0])))
                                 : std::string::npos;
        if (power == std::string::npos) {
            return make_error(EINVAL, "invalid size suffix in '{}' (b, k, M, G, T, P, E)", text);
        }
    }
    if (power == 0 && !fraction.empty()) {
        return make_error(EINVAL, "a size in bytes cannot have a fraction ('{}')", text);
    }
    const uint64_t mult = 1ULL << (10 * power);
    errno = 0;
    unsigned long long v = std::strtoull(whole.c_str(), nullptr, 10);
    if (errno != 0 || v > UINT64_MAX / mult) {
        return make_error(EOVERFLOW, "size '{}' is too large", text);
    }
    uint64_t bytes = static_cast<uint64_t>(v) * mult;
    if (!fraction.empty()) {
        // The fraction's share of one unit, cut to whole bytes as qemu-img does.
        long double part =
            std::strtold(("0." + fraction).c_str(), nullptr) * static_cast<long double>(mult);
        auto extra = static_cast<uint64_t>(part);
        if (bytes > UINT64_MAX - extra) {
            return make_error(EOVERFLOW, "size '{}' is too large", text);
        }
        bytes += extra;
    }
    return bytes;
}

int fail(const std::string& message) {
    std::fprintf(stderr, "imgfs: %s\n", message.c_str());
    return 1;
}

}  // namespace imgfs::cli
