// imgfs snapshot / commit / revert / stream / status: thin wrappers over the control files, so
// the shell and the CLI do exactly the same thing. Errors print the daemon's reason (the image's
// last_error in info).
#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>
#include <unistd.h>

#include <sys/stat.h>

#include "fuse/cli.h"
#include "fuse/mount_table.h"

namespace imgfs::cli {

namespace {

std::string slurp(const std::string& path) {
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void append_utf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
        *out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        *out += static_cast<char>(0xC0 | (cp >> 6));
        *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {  // \uXXXX reaches 0xFFFF (the daemon writes no surrogate pairs)
        *out += static_cast<char>(0xE0 | (cp >> 12));
        *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        *out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// One JSON string's content from `json[pos]` (just past its opening quote), unescaped.
std::string json_string_at(const std::string& json, size_t pos) {
    std::string out;
    for (size_t i = pos; i < json.size() && json[i] != '"'; ++i) {
        if (json[i] != '\\' || i + 1 >= json.size()) {
            out += json[i];
            continue;
        }
        const char c = json[++i];
        switch (c) {
            case 'n':
                out += '\n';
                break;
            case 't':
                out += '\t';
                break;
            case 'r':
                out += '\r';
                break;
            case 'b':
                out += '\b';
                break;
            case 'f':
                out += '\f';
                break;
            case 'u':
                if (uint32_t cp = 0;
                    i + 4 < json.size() &&
                    std::from_chars(&json[i + 1], &json[i + 5], cp, 16).ptr == &json[i + 5]) {
                    append_utf8(cp, &out);
                    i += 4;
                }
                break;
            default:
                out += c;  // \" \\ \/
        }
    }
    return out;
}

// The value of "key" in a flat JSON object (a string value unescaped).
std::string json_value(const std::string& json, const std::string& key) {
    std::string needle = "\"" + key + "\":";
    size_t pos = json.find(needle);
    if (pos == std::string::npos) {
        return {};
    }
    pos += needle.size();
    if (pos < json.size() && json[pos] == '"') {
        return json_string_at(json, pos + 1);
    }
    size_t end = json.find_first_of(",}", pos);
    return json.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
}

// Why the daemon refused this process's last command on the image whose info is `info`: the
// reason it filed under our thread id (the CLI writes from its one thread), else the image's
// last error, which a client racing us may have set instead.
std::string refusal_reason(const std::string& info) {
    size_t mine = info.find("\"caller_errors\":{");
    if (mine != std::string::npos) {
        // No key after it is a number: the first "TID": from here on is ours, if any.
        std::string own = json_value(info.substr(mine), std::to_string(::gettid()));
        if (!own.empty()) {
            return own;
        }
    }
    return json_value(info, "last_error");
}

// An image name as the daemon lists it. An empty name (an unset shell variable) or "." would
// reach the mount's global files: `.control/snapshot` snapshots every image.
int refuse_bad_name(const std::string& name) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
        return fail(fmt::format("invalid image name '{}'", name));
    }
    return 0;
}

// The first image listed under MNT (NAME.raw), or empty.
std::string first_export(const std::string& mnt) {
    std::string first;
    if (DIR* d = ::opendir(mnt.c_str())) {
        while (dirent* ent = ::readdir(d)) {
            std::string n = ent->d_name;
            if (n.size() > 4 && n.compare(n.size() - 4, 4, ".raw") == 0 &&
                (first.empty() || n < first + ".raw")) {
                first = n.substr(0, n.size() - 4);
            }
        }
        ::closedir(d);
    }
    return first;
}

std::string control_path(const std::string& mnt, const std::string& name, const std::string& file) {
    return name.empty() ? mnt + "/.control/" + file : mnt + "/.control/" + name + "/" + file;
}

// What send_command returns when the daemon refused the command and `quiet` kept it from
// saying why (the caller does). A control file that cannot be opened is always reported there
// (status 1).
constexpr int kRefusedQuietly = 2;

// Writes one command; on failure prints the daemon's reason unless `quiet`, and leaves the errno
// in *err.
int send_command(const std::string& mnt, const std::string& name, const std::string& file,
                 const std::string& command, bool quiet = false, int* err_out = nullptr) {
    std::string path = control_path(mnt, name, file);
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err_out != nullptr) {
            *err_out = err;
        }
        if (!imgfs_mount_at(mnt)) {
            return fail(fmt::format("{} is not an imgfs mount", mnt));
        }
        if (err == ENOENT) {
            return fail(fmt::format("no image '{}' under {}", name, mnt));
        }
        return fail(fmt::format("{}: {}", path, strerror(err)));
    }
    // Always with its line end: a write of 512 bytes or more without one is refused as a
    // possible piece of a longer line (a long name, a long group).
    const std::string line = !command.empty() && command.back() == '\n' ? command : command + "\n";
    ssize_t n = ::write(fd, line.data(), line.size());
    int err = errno;
    ::close(fd);
    if (n == static_cast<ssize_t>(line.size())) {
        return 0;
    }
    if (err_out != nullptr) {
        *err_out = err;
    }
    if (quiet) {
        return kRefusedQuietly;
    }
    std::string reason;
    if (!name.empty()) {
        reason = refusal_reason(slurp(control_path(mnt, name, "info")));
    }
    return fail(reason.empty() ? fmt::format("{}: {}", file, strerror(err)) : reason);
}

std::string human_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        ++u;
    }
    return fmt::format("{:.1f} {}", b, units[u]);
}

volatile std::sig_atomic_t interrupted = 0;

void on_interrupt(int /*signo*/) {
    interrupted = 1;
}

// The status of job `id` of NAME: the image's job file while it shows that job, else its line
// in .control/jobs (a later job, or a snapshot's record, may have taken the job file). Without
// an id, whatever the job file shows.
std::string job_status(const std::string& mnt, const std::string& name, const std::string& id) {
    std::string job = slurp(control_path(mnt, name, "job"));
    if (id.empty() || json_value(job, "id") == id) {
        return job;
    }
    std::istringstream all(slurp(control_path(mnt, "", "jobs")));
    for (std::string line; std::getline(all, line);) {
        if (json_value(line, "id") == id) {
            return line;
        }
    }
    return {};
}

// The ids in .control/jobs of the jobs of `type` on NAME (every job when `type` is empty),
// oldest first. Ids only grow.
std::vector<uint64_t> listed_job_ids(const std::string& mnt, const std::string& name,
                                     const std::string& type) {
    std::vector<uint64_t> ids;
    std::istringstream all(slurp(control_path(mnt, "", "jobs")));
    for (std::string line; std::getline(all, line);) {
        if (type.empty() ||
            (json_value(line, "image") == name && json_value(line, "type") == type)) {
            ids.push_back(std::strtoull(json_value(line, "id").c_str(), nullptr, 10));
        }
    }
    std::sort(ids.begin(), ids.end());
    return ids;
}

// What --wait is for: the job's end, or (for `job pause --wait`) its pause.
enum class Until { kConcluded, kPaused };

// Follows job `id` of NAME until it concludes: a bar on a terminal, lines otherwise. Ctrl-C
// stops the waiting, not the job, and says so. A job that ends cancelled fails, unless the
// cancel is what was asked for.
int wait_for_job(const std::string& mnt, const std::string& name, const std::string& id,
                 Until until = Until::kConcluded, bool cancel_asked = false) {
    bool tty = ::isatty(STDOUT_FILENO) != 0;
    std::string last_line;
    struct sigaction sa {};
    sa.sa_handler = on_interrupt;
    ::sigaction(SIGINT, &sa, nullptr);
    for (;;) {
        if (interrupted != 0) {
            std::string type = json_value(slurp(control_path(mnt, name, "job")), "type");
            std::fprintf(stderr,
                         "%simgfs: stopped waiting; the %s job on %s goes on (imgfs job %s %s "
                         "cancel stops it, imgfs status %s shows it)\n",
                         tty ? "\n" : "", type.c_str(), name.c_str(), mnt.c_str(), name.c_str(),
                         mnt.c_str());
            return 130;
        }
        std::string job = job_status(mnt, name, id);
        std::string state = json_value(job, "state");
        double done = std::atof(json_value(job, "done_bytes").c_str());
        double total = std::atof(json_value(job, "total_bytes").c_str());
        double pct = total > 0 ? 100.0 * done / total : (state == "concluded" ? 100.0 : 0.0);
        if (tty) {
            int width = 40;
            int filled = static_cast<int>(pct / 100.0 * width);
            // A paused job says so: waiting on it otherwise looks like a hang.
            std::printf("\r%s [%s%s] %5.1f%% %s / %s %-31s", json_value(job, "type").c_str(),
                        std::string(static_cast<size_t>(filled), '#').c_str(),
                        std::string(static_cast<size_t>(width - filled), ' ').c_str(), pct,
                        human_bytes(done).c_str(), human_bytes(total).c_str(),
                        state == "paused" ? "(paused: imgfs job ... resume)" : "");
            std::fflush(stdout);
        } else {
            std::string line = fmt::format("{} {} {:.0f}/{:.0f} bytes ({:.1f}%)",
                                           json_value(job, "type"), state, done, total, pct);
            if (line != last_line) {
                std::printf("%s\n", line.c_str());
                std::fflush(stdout);
                last_line = line;
            }
        }
        if (until == Until::kPaused && state == "paused") {
            if (tty) {
                std::printf("\n");
            }
            return 0;
        }
        if (state == "concluded" || state.empty()) {
            if (tty) {
                std::printf("\n");
            }
            std::string error = json_value(job, "error");
            if (cancel_asked && error == "cancelled") {
                return 0;
            }
            if (!error.empty() && error != "null") {
                return fail(error);
            }
            return state.empty() ? fail("no job status for " + name) : 0;
        }
        for (int i = 0; i < (tty ? 4 : 20) && interrupted == 0; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
    }
}

// The running job of `type` on NAME that a command for `base` would have started (for a
// stream, `base` is empty): its id, or empty if none runs. A commit into another layer is
// not this command's job, and following it would report that job's outcome as ours.
std::string job_under_way(const std::string& mnt, const std::string& name, const std::string& type,
                          const std::string& base) {
    std::string job = slurp(control_path(mnt, name, "job"));
    std::string state = json_value(job, "state");
    if (json_value(job, "type") != type || state.empty() || state == "concluded") {
        return {};
    }
    if (type == "commit" && json_value(job, "base") != base) {
        return {};
    }
    return json_value(job, "id");
}

int follow_running(const std::string& mnt, const std::string& name, const std::string& type,
                   const std::string& id) {
    std::fprintf(stderr, "imgfs: a %s of %s is already under way; following it\n", type.c_str(),
                 name.c_str());
    return wait_for_job(mnt, name, id);
}

// The layer a commit merges into: FILE of --base, or the one below the top (the chain as the
// snapshot file lists it, top first).
std::string commit_base(const std::string& mnt, const std::string& name, const std::string& base) {
    if (!base.empty()) {
        return base;
    }
    std::istringstream chain(slurp(control_path(mnt, name, "snapshot")));
    std::string top;
    std::string below;
    std::getline(chain, top);
    std::getline(chain, below);
    return below;
}

// Starts a job (commit or stream; `base` is a commit's --base); with `wait`, follows it, and
// the same job already running on the image is followed instead of refused.
int start_job(const std::string& mnt, const std::string& name, const std::string& file,
              const std::string& command, const std::string& base, bool wait) {
    if (int bad = refuse_bad_name(name)) {
        return bad;
    }
    const std::string target = file == "commit" ? commit_base(mnt, name, base) : std::string();
    // Looked at first, so that attaching does not leave a refused command as the image's
    // last error; the EBUSY path below covers a job that starts in between.
    if (std::string id = wait ? job_under_way(mnt, name, file, target) : std::string();
        !id.empty()) {
        return follow_running(mnt, name, file, id);
    }
    // Newer than every job so far: the one the command starts. (Read back from the image's
    // job file instead, a job that ended at once could be replaced there by another client's
    // before it is read, and that one's outcome reported as this one's.)
    const std::vector<uint64_t> before =
        wait ? listed_job_ids(mnt, "", "") : std::vector<uint64_t>();
    const uint64_t newest_before = before.empty() ? 0 : before.back();
    int err = 0;
    int rc = send_command(mnt, name, file, command, wait, &err);
    if (rc == kRefusedQuietly && err == EBUSY) {
        if (std::string id = job_under_way(mnt, name, file, target); !id.empty()) {
            return follow_running(mnt, name, file, id);
        }
    }
    if (rc == kRefusedQuietly) {
        std::string reason = refusal_reason(slurp(control_path(mnt, name, "info")));
        return fail(reason.empty() ? fmt::format("{}: {}", file, strerror(err)) : reason);
    }
    if (rc != 0 || !wait) {
        return rc;
    }
    // The job the command started: the first of its type on NAME after those listed before.
    // Another one there started only once it had concluded (EBUSY till then).
    for (uint64_t id : listed_job_ids(mnt, name, file)) {
        if (id > newest_before) {
            return wait_for_job(mnt, name, std::to_string(id));
        }
    }
    // Not listed (the mount keeps the most recent jobs only): the image's job file.
    std::string job = slurp(control_path(mnt, name, "job"));
    return wait_for_job(mnt, name, json_value(job, "type") == file ? json_value(job, "id") : "");
}

bool wants_help(const Args& args, const char* usage) {
    for (const auto& a : args) {
        if (a == "--help" || a == "-h") {
            std::puts(usage);
            return true;
        }
    }
    return false;
}

}  // namespace

int snapshot(const Args& args) {
    const char* usage =
        "usage: imgfs snapshot MOUNTPOINT NAME SNAP\n"
        "       imgfs snapshot MOUNTPOINT --group SNAP [NAME...]\n\n"
        "Takes a live external snapshot: NAME@SNAP.qcow2 becomes the active layer (in a Ceph\n"
        "pool NAME~SNAP.qcow2, since RBD keeps '@' for its own snapshots). With --group, of\n"
        "the images named (all of them if none is) at one instant, all or nothing.";
    if (wants_help(args, usage)) {
        return 0;
    }
    if (args.size() >= 3 && args[1] == "--group") {
        std::string command = args[2];
        // The name comes first on the line: "nightly vm2" would snapshot vm2 as "nightly".
        if (command.empty() || command.find_first_of(" \t\n") != std::string::npos) {
            return fail(
                fmt::format("'{}' is not a snapshot name (empty, or with spaces)", command));
        }
        for (size_t i = 3; i < args.size(); ++i) {
            // The group command separates names with spaces: "my vm" would name "my" and "vm".
            if (args[i].find_first_of(" \t") != std::string::npos) {
                return fail(fmt::format(
                    "a group snapshot cannot name '{}': the control file separates names with "
                    "spaces (snapshot it on its own)",
                    args[i]));
            }
            if (int bad = refuse_bad_name(args[i])) {
                return bad;
            }
            // An image the mount does not serve: say so, rather than the daemon's EINVAL.
            if (::access(control_path(args[0], args[i], "info").c_str(), F_OK) != 0 &&
                imgfs_mount_at(args[0])) {
                return fail(fmt::format("no image '{}' under {}", args[i], args[0]));
            }
            command += " " + args[i];
        }
        int err = 0;
        if (int rc = send_command(args[0], "", "snapshot", command + "\n", true, &err);
            rc != kRefusedQuietly) {
            return rc;
        }
        // The daemon leaves the reason with every image of the group (the first one named,
        // or any image when none is).
        std::string first = args.size() > 3 ? args[3] : first_export(args[0]);
        std::string reason = first.empty()
                                 ? std::string()
                                 : refusal_reason(slurp(control_path(args[0], first, "info")));
        return fail(reason.empty() ? fmt::format("snapshot: {}", strerror(err)) : reason);
    }
    if (args.size() != 3) {
        return fail(
            "usage: imgfs snapshot MOUNTPOINT NAME SNAP | MOUNTPOINT --group SNAP [NAME...]");
    }
    if (int bad = refuse_bad_name(args[1])) {
        return bad;
    }
    if (args[2].empty()) {
        // An empty write never reaches the daemon: it would look like a snapshot taken.
        return fail("empty snapshot name");
    }
    return send_command(args[0], args[1], "snapshot", args[2]);
}

namespace {

// The arguments without `flag`, and whether it was there (anywhere on the line).
std::vector<std::string> without_flag(const Args& args, std::string_view flag, bool* seen) {
    std::vector<std::string> rest;
    *seen = false;
    for (const auto& a : args) {
        if (a == flag) {
            *seen = true;
        } else {
            rest.push_back(a);
        }
    }
    return rest;
}

}  // namespace

int job(const Args& args) {
    const char* usage =
        "usage: imgfs job MOUNTPOINT NAME cancel|pause|resume|speed BYTES_PER_S [--wait]\n\n"
        "Controls the job running on NAME (a commit or stream). speed takes a size (64M) and\n"
        "0 for no limit. --wait then follows the job until it ends.";
    if (wants_help(args, usage)) {
        return 0;
    }
    bool wait = false;
    std::vector<std::string> pos = without_flag(args, "--wait", &wait);
    bool speed = pos.size() == 4 && pos[2] == "speed";
    if (!(pos.size() == 3 && (pos[2] == "cancel" || pos[2] == "pause" || pos[2] == "resume")) &&
        !speed) {
        return fail("usage: imgfs job MOUNTPOINT NAME cancel|pause|resume|speed BYTES_PER_S");
    }
    std::string command = pos[2];
    if (speed) {
        Result<uint64_t> bytes = parse_size(pos[3]);
        if (!bytes) {
            return fail(bytes.error().message());
        }
        command += " " + std::to_string(*bytes);
    }
    if (int bad = refuse_bad_name(pos[1])) {
        return bad;
    }
    // The job the verb is for: the one the job file shows now.
    const std::string id = json_value(slurp(control_path(pos[0], pos[1], "job")), "id");
    int rc = send_command(pos[0], pos[1], "job", command);
    if (rc != 0 || !wait) {
        return rc;
    }
    return wait_for_job(pos[0], pos[1], id, pos[2] == "pause" ? Until::kPaused : Until::kConcluded,
                        pos[2] == "cancel");
}

int commit(const Args& args) {
    const char* usage =
        "usage: imgfs commit MOUNTPOINT NAME [--base FILE] [--wait]\n\nMerges the "
        "top layer into the one below (or every layer above FILE into FILE).";
    if (wants_help(args, usage)) {
        return 0;
    }
    std::vector<std::string> pos;
    std::optional<std::string> base;
    bool wait = false;
    for (size_t i = 0; i < args.size(); ++i) {
        if (args[i] == "--wait") {
            wait = true;
        } else if (args[i] == "--base" && i + 1 < args.size()) {
            // A commit deletes what it merges: an empty or second base (an unset variable, a
            // typo) must not quietly pick another layer.
            if (base || args[i + 1].empty()) {
                return fail(base ? "--base is given once" : "--base needs a file name");
            }
            base = args[++i];
        } else {
            pos.push_back(args[i]);
        }
    }
    if (pos.size() != 2) {
        return fail("usage: imgfs commit MOUNTPOINT NAME [--base FILE] [--wait]");
    }
    // One write carries one command: an empty command is a bare newline.
    return start_job(pos[0], pos[1], "commit", base ? "base=" + *base : "\n", base.value_or(""),
                     wait);
}

int revert(const Args& args) {
    const char* usage =
        "usage: imgfs revert MOUNTPOINT NAME\n\n"
        "Drops the top layer: the layer below becomes the active one again. Refused (EBUSY)\n"
        "while NAME.raw is open, when the layer below is not one of NAME's own (its file name\n"
        "is not NAME.qcow2, NAME@SNAP.qcow2 or the like; NAME~SNAP.qcow2 in a Ceph pool), and\n"
        "when the top or the layer below is shared with another image.";
    if (wants_help(args, usage)) {
        return 0;
    }
    if (args.size() != 2) {
        return fail("usage: imgfs revert MOUNTPOINT NAME");
    }
    if (int bad = refuse_bad_name(args[1])) {
        return bad;
    }
    return send_command(args[0], args[1], "revert", "\n");
}

int stream(const Args& args) {
    const char* usage =
        "usage: imgfs stream MOUNTPOINT NAME [--wait]\n\nCopies backing data into "
        "the top layer, which then stands alone.";
    if (wants_help(args, usage)) {
        return 0;
    }
    bool wait = false;
    std::vector<std::string> pos = without_flag(args, "--wait", &wait);
    if (pos.size() != 2) {
        return fail("usage: imgfs stream MOUNTPOINT NAME [--wait]");
    }
    return start_job(pos[0], pos[1], "stream", "\n", "", wait);
}

namespace {

// "commit running 42%" (or "none").
std::string job_summary(const std::string& job) {
    if (job.empty()) {
        return "none";
    }
    std::string state = json_value(job, "state");
    std::string out = json_value(job, "type") + " " + state;
    double done = std::atof(json_value(job, "done_bytes").c_str());
    double total = std::atof(json_value(job, "total_bytes").c_str());
    if (state != "concluded" && total > 0) {
        out += fmt::format(" {:.0f}%", 100.0 * done / total);
    }
    std::string error = json_value(job, "error");
    if (!error.empty() && error != "null") {
        out += " (" + error + ")";
    }
    return out;
}

// A backing layer whose storage failed a flush (the base of a failed commit) refuses writes
// until it is opened afresh: the guest does not see it, but the next commit into it fails.
// Listed per layer in info; the top's own line is the image's (writes_refused above).
void print_backing_layers_refusing_writes(const std::string& name, const std::string& info) {
    const std::string needle = "\"writes_refused\":\"";
    const size_t layers = info.find("\"layers\":[");
    if (layers == std::string::npos) {
        return;
    }
    const std::string top = json_value(info, "file");
    for (size_t at = info.find(needle, layers); at != std::string::npos;
         at = info.find(needle, at + needle.size())) {
        const size_t layer = info.rfind("{\"file\":", at);
        if (layer == std::string::npos || layer < layers) {
            continue;
        }
        const std::string part = info.substr(layer);
        const std::string file = json_value(part, "file");
        if (file == top) {
            continue;
        }
        std::printf(
            "  backing layer %s refuses writes (a commit into it fails): %s (close %s.raw "
            "and rescan, or remount)\n",
            file.c_str(), json_value(part, "writes_refused").c_str(), name.c_str());
    }
}

void print_image(const std::string& name, const std::string& info, const std::string& job) {
    // Flags in the line itself, so that a glance (or grep) at the list shows them.
    std::string failed = json_value(info, "failed");
    bool is_failed = !failed.empty() && failed != "null";
    bool corrupt = info.find("\"corrupt\":true") != std::string::npos;
    std::string refused = json_value(info, "writes_refused");
    bool writes_refused = !refused.empty() && refused != "null";
    std::printf("%s.raw  %s  top %s  open %s  job %s%s%s%s\n", name.c_str(),
                human_bytes(std::atof(json_value(info, "virtual_size").c_str())).c_str(),
                json_value(info, "file").c_str(), json_value(info, "open_count").c_str(),
                job_summary(job).c_str(), corrupt ? "  CORRUPT" : "", is_failed ? "  FAILED" : "",
                writes_refused ? "  WRITES REFUSED" : "");
    std::string err = json_value(info, "last_error");
    if (!err.empty()) {
        std::printf("  last error: %s\n", err.c_str());
    }
    if (is_failed) {
        std::printf("  failed (I/O gets EIO): %s (close %s.raw and rescan to open it afresh)\n",
                    failed.c_str(), name.c_str());
    }
    if (writes_refused) {
        std::printf("  writes get EIO, reads go on: %s (close %s.raw and rescan, or remount)\n",
                    refused.c_str(), name.c_str());
    }
    print_backing_layers_refusing_writes(name, info);
    if (corrupt) {
        std::printf(
            "  a layer is marked corrupt (writes are refused; see info and qemu-img check)\n");
    }
    std::string mismatch = json_value(info, "chain_mismatch");
    if (!mismatch.empty() && mismatch != "null") {
        std::printf("  chain on disk differs: %s\n", mismatch.c_str());
    }
    std::string io_errno = json_value(info, "errno");
    if (!io_errno.empty()) {
        bool ongoing = json_value(info, "ongoing") == "true";
        // Not "past": nothing tells whether the cause went (a disk still full fails the next
        // allocating write), only that no request has failed for a while.
        std::printf("  %s %s: since %s, %s requests in all, last at %s (%s): %s\n",
                    ongoing ? "I/O errors" : "I/O errors, none for 30 s:", io_errno.c_str(),
                    json_value(info, "since").c_str(), json_value(info, "failed_requests").c_str(),
                    json_value(info, "last").c_str(), json_value(info, "op").c_str(),
                    json_value(info, "message").c_str());
    }
}

std::string trimmed(std::string text) {
    while (!text.empty() && text.back() == '\n') {
        text.pop_back();
    }
    return text;
}

}  // namespace

int status(const Args& args) {
    const char* usage =
        "usage: imgfs status MOUNTPOINT [NAME] [--json]\n\n"
        "Lists the exported images (size, top layer, open count, job and its progress, errors)\n"
        "and the image files the mount skipped, with the reason. --json prints\n"
        "{\"images\": [info...], \"skipped\": [{\"file\", \"reason\"}...]}.";
    if (wants_help(args, usage)) {
        return 0;
    }
    bool json = false;
    std::vector<std::string> pos = without_flag(args, "--json", &json);
    if (pos.empty() || pos.size() > 2) {
        return fail("usage: imgfs status MOUNTPOINT [NAME] [--json]");
    }
    const std::string& mnt = pos[0];
    if (!imgfs_mount_at(mnt)) {
        return fail(fmt::format("{} is not an imgfs mount", mnt));
    }
    std::vector<std::string> names;
    if (pos.size() == 2) {
        names.push_back(pos[1]);
    } else if (DIR* d = ::opendir(mnt.c_str())) {
        while (dirent* ent = ::readdir(d)) {
            std::string n = ent->d_name;
            if (n.size() > 4 && n.compare(n.size() - 4, 4, ".raw") == 0) {
                names.push_back(n.substr(0, n.size() - 4));
            }
        }
        ::closedir(d);
        std::sort(names.begin(), names.end());
    } else {
        // A monitor must not take a dead daemon or a mount it may not read for a healthy one
        // without images. A dead daemon's mount answers ENOTCONN, or ECONNABORTED when the
        // kernel aborted the connection as the daemon died (with FUSE over io_uring).
        const int err = errno;
        const bool daemon_gone = err == ENOTCONN || err == ECONNABORTED;
        return fail(fmt::format("cannot list {}: {}{}", mnt, std::strerror(err),
                                daemon_gone ? " (its daemon is gone: imgfs unmount it)" : ""));
    }
    if (names.empty() && !json) {
        std::printf("no images exported\n");
    }
    std::string images;
    bool transport_printed = false;  // from the first image still there
    for (const auto& n : names) {
        std::string info = slurp(control_path(mnt, n, "info"));
        struct stat gone_check {};
        if (info.empty() && pos.size() == 1 &&
            ::stat((mnt + "/" + n + ".raw").c_str(), &gone_check) != 0 && errno == ENOENT) {
            continue;  // listed, then gone (a rescan removed it): not an error of the mount
        }
        if (info.empty()) {
            return fail(fmt::format("no image '{}' under {}", n, mnt));
        }
        if (json) {
            images += (images.empty() ? "" : ",") + trimmed(info);
        } else {
            if (!transport_printed && pos.size() == 1) {
                std::printf("transport: %s\n", json_value(info, "transport").c_str());
                transport_printed = true;
            }
            print_image(n, info, slurp(control_path(mnt, n, "job")));
        }
    }
    std::string skipped = trimmed(slurp(mnt + "/.control/skipped"));
    if (json) {
        std::string list;
        std::istringstream lines(skipped);
        for (std::string line; std::getline(lines, line);) {
            list += (list.empty() ? "" : ",") + line;
        }
        std::printf("{\"images\":[%s],\"skipped\":[%s]}\n", images.c_str(), list.c_str());
    } else if (pos.size() == 1 && !skipped.empty()) {
        std::printf("skipped:\n");
        std::istringstream lines(skipped);
        for (std::string line; std::getline(lines, line);) {
            std::printf("  %s: %s\n", json_value(line, "file").c_str(),
                        json_value(line, "reason").c_str());
        }
    }
    return 0;
}

}  // namespace imgfs::cli
