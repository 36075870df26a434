// imgfs snapshot / commit / revert / stream / status: thin wrappers over the control files, so
// the shell and the CLI do exactly the same thing. Errors print the daemon's reason (the image's
// last_error in info).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "fuse/cli.h"

namespace imgfs::cli {

namespace {

std::string slurp(const std::string& path) {
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// The raw value of "key" in a flat JSON object (string values unescaped for \" and \\).
std::string json_value(const std::string& json, const std::string& key) {
    std::string needle = "\"" + key + "\":";
    size_t pos = json.find(needle);
    if (pos == std::string::npos) {
        return {};
    }
    pos += needle.size();
    if (pos < json.size() && json[pos] == '"') {
        std::string out;
        for (size_t i = pos + 1; i < json.size() && json[i] != '"'; ++i) {
            if (json[i] == '\\' && i + 1 < json.size()) {
                ++i;
                out += json[i] == 'n' ? '\n' : json[i];
            } else {
                out += json[i];
            }
        }
        return out;
    }
    size_t end = json.find_first_of(",}", pos);
    return json.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
}

std::string control_path(const std::string& mnt, const std::string& name, const std::string& file) {
    return name.empty() ? mnt + "/.control/" + file : mnt + "/.control/" + name + "/" + file;
}

// Writes one command; on failure prints the daemon's reason.
int send_command(const std::string& mnt, const std::string& name, const std::string& file,
                 const std::string& command) {
    std::string path = control_path(mnt, name, file);
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == ENOENT) {
            return fail(fmt::format("no image '{}' under {} (or not an imgfs mount)", name, mnt));
        }
        return fail(fmt::format("{}: {}", path, strerror(err)));
    }
    ssize_t n = ::write(fd, command.data(), command.size());
    int err = errno;
    ::close(fd);
    if (n == static_cast<ssize_t>(command.size())) {
        return 0;
    }
    std::string reason;
    if (!name.empty()) {
        reason = json_value(slurp(control_path(mnt, name, "info")), "last_error");
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

// Follows .control/NAME/job until the job concludes: a bar on a terminal, lines otherwise.
int wait_for_job(const std::string& mnt, const std::string& name) {
    bool tty = ::isatty(STDOUT_FILENO) != 0;
    std::string last_line;
    for (;;) {
        std::string job = slurp(control_path(mnt, name, "job"));
        std::string state = json_value(job, "state");
        double done = std::atof(json_value(job, "done_bytes").c_str());
        double total = std::atof(json_value(job, "total_bytes").c_str());
        double pct = total > 0 ? 100.0 * done / total : (state == "concluded" ? 100.0 : 0.0);
        if (tty) {
            int width = 40;
            int filled = static_cast<int>(pct / 100.0 * width);
            std::printf("\r%s [%s%s] %5.1f%% %s / %s  ", json_value(job, "type").c_str(),
                        std::string(static_cast<size_t>(filled), '#').c_str(),
                        std::string(static_cast<size_t>(width - filled), ' ').c_str(), pct,
                        human_bytes(done).c_str(), human_bytes(total).c_str());
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
        if (state == "concluded" || state.empty()) {
            if (tty) {
                std::printf("\n");
            }
            std::string error = json_value(job, "error");
            if (!error.empty() && error != "null") {
                return fail(error);
            }
            return state.empty() ? fail("no job status for " + name) : 0;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(tty ? 200 : 1000));
    }
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
        "usage: imgfs snapshot MOUNTPOINT NAME SNAP\n\nTakes a live external "
        "snapshot: NAME@SNAP.qcow2 becomes the active layer.";
    if (wants_help(args, usage)) {
        return 0;
    }
    if (args.size() != 3) {
        return fail("usage: imgfs snapshot MOUNTPOINT NAME SNAP");
    }
    return send_command(args[0], args[1], "snapshot", args[2]);
}

int commit(const Args& args) {
    const char* usage =
        "usage: imgfs commit MOUNTPOINT NAME [--base FILE] [--wait]\n\nMerges the "
        "top layer into the one below (or every layer above FILE into FILE).";
    if (wants_help(args, usage)) {
        return 0;
    }
    std::vector<std::string> pos;
    std::string base;
    bool wait = false;
    for (size_t i = 0; i < args.size(); ++i) {
        if (args[i] == "--wait") {
            wait = true;
        } else if (args[i] == "--base" && i + 1 < args.size()) {
            base = args[++i];
        } else {
            pos.push_back(args[i]);
        }
    }
    if (pos.size() != 2) {
        return fail("usage: imgfs commit MOUNTPOINT NAME [--base FILE] [--wait]");
    }
    // One write carries one command: an empty command is a bare newline.
    int rc = send_command(pos[0], pos[1], "commit", base.empty() ? "\n" : "base=" + base);
    return rc == 0 && wait ? wait_for_job(pos[0], pos[1]) : rc;
}

int revert(const Args& args) {
    const char* usage =
        "usage: imgfs revert MOUNTPOINT NAME\n\nDrops the top layer (refused while "
        "NAME.raw is open).";
    if (wants_help(args, usage)) {
        return 0;
    }
    if (args.size() != 2) {
        return fail("usage: imgfs revert MOUNTPOINT NAME");
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
    std::vector<std::string> pos;
    bool wait = false;
    for (const auto& a : args) {
        if (a == "--wait") {
            wait = true;
        } else {
            pos.push_back(a);
        }
    }
    if (pos.size() != 2) {
        return fail("usage: imgfs stream MOUNTPOINT NAME [--wait]");
    }
    int rc = send_command(pos[0], pos[1], "stream", "\n");
    return rc == 0 && wait ? wait_for_job(pos[0], pos[1]) : rc;
}

int status(const Args& args) {
    const char* usage = "usage: imgfs status MOUNTPOINT [NAME] [--json]";
    if (wants_help(args, usage)) {
        return 0;
    }
    std::vector<std::string> pos;
    bool json = false;
    for (const auto& a : args) {
        if (a == "--json") {
            json = true;
        } else {
            pos.push_back(a);
        }
    }
    if (pos.empty() || pos.size() > 2) {
        return fail(usage);
    }
    const std::string& mnt = pos[0];
    std::vector<std::string> names;
    if (pos.size() == 2) {
        names.push_back(pos[1]);
    } else {
        std::string out = slurp(mnt + "/.control/jobs");  // proves it is a mount
        (void)out;
        if (DIR* d = ::opendir(mnt.c_str())) {
            while (dirent* ent = ::readdir(d)) {
                std::string n = ent->d_name;
                if (n.size() > 4 && n.compare(n.size() - 4, 4, ".raw") == 0) {
                    names.push_back(n.substr(0, n.size() - 4));
                }
            }
            ::closedir(d);
        }
        std::sort(names.begin(), names.end());
    }
    if (json) {
        std::printf("[");
    }
    bool first = true;
    for (const auto& n : names) {
        std::string info = slurp(control_path(mnt, n, "info"));
        if (info.empty()) {
            return fail(fmt::format("no image '{}' under {}", n, mnt));
        }
        if (json) {
            while (!info.empty() && info.back() == '\n') {
                info.pop_back();
            }
            std::printf("%s%s", first ? "" : ",", info.c_str());
        } else {
            std::string job = slurp(control_path(mnt, n, "job"));
            std::printf("%s.raw  %s  top %s  open %s  job %s\n", n.c_str(),
                        human_bytes(std::atof(json_value(info, "virtual_size").c_str())).c_str(),
                        json_value(info, "file").c_str(), json_value(info, "open_count").c_str(),
                        job.empty()
                            ? "none"
                            : (json_value(job, "type") + " " + json_value(job, "state")).c_str());
            std::string err = json_value(info, "last_error");
            if (!err.empty()) {
                std::printf("  last error: %s\n", err.c_str());
            }
            // Conditions a rescan or a failed graph change found (null when there is none).
            std::string failed = json_value(info, "failed");
            if (!failed.empty() && failed != "null") {
                std::printf("  failed (I/O gets EIO): %s\n", failed.c_str());
            }
            std::string mismatch = json_value(info, "chain_mismatch");
            if (!mismatch.empty() && mismatch != "null") {
                std::printf("  chain on disk differs: %s\n", mismatch.c_str());
            }
            std::string io_errno = json_value(info, "errno");
            if (!io_errno.empty()) {
                bool ongoing = json_value(info, "ongoing") == "true";
                std::printf("  %s %s: since %s, %s requests in all, last at %s (%s): %s\n",
                            ongoing ? "I/O errors" : "past I/O errors", io_errno.c_str(),
                            json_value(info, "since").c_str(),
                            json_value(info, "failed_requests").c_str(),
                            json_value(info, "last").c_str(), json_value(info, "op").c_str(),
                            json_value(info, "message").c_str());
            }
        }
        first = false;
    }
    if (json) {
        std::printf("]\n");
    }
    return 0;
}

}  // namespace imgfs::cli
