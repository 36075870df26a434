#include "fuse/fuse_uring.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>

namespace imgfs::fuse_uring {

Result<Mode> parse_mode(std::string_view text) {
    if (text == "auto") {
        return Mode::kAuto;
    }
    if (text == "on") {
        return Mode::kOn;
    }
    if (text == "off") {
        return Mode::kOff;
    }
    return make_error(EINVAL, "uring={}: expected auto, on or off", text);
}

const char* mode_name(Mode mode) {
    switch (mode) {
        case Mode::kOff:
            return "off";
        case Mode::kOn:
            return "on";
        case Mode::kAuto:
            break;
    }
    return "auto";
}

std::string unavailable_reason() {
    const char* param = "/sys/module/fuse/parameters/enable_uring";
    std::ifstream in(param);
    std::string value;
    if (!(in >> value)) {
        return "this kernel has no FUSE-over-io_uring (no " + std::string(param) + ")";
    }
    if (value != "Y" && value != "1") {
        return std::string(param) + " is " + value + " (echo Y > " + param + " switches it on)";
    }
    return {};
}

std::string describe(const RingState& ring) {
    if (!ring.accepted) {
        return "/dev/fuse";
    }
    const char* error = std::strerror(ring.register_error);
    if (ring.queues_without_entries != 0) {
        return fmt::format(
            "/dev/fuse (FUSE-over-io_uring unused: the kernel refused every entry of {} of {} "
            "queues: {})",
            ring.queues_without_entries, ring.queues, error);
    }
    std::string text = fmt::format("io_uring ({} queues x {} entries, {} loop{}", ring.queues,
                                   ring.entries_per_queue, ring.loops, ring.loops == 1 ? "" : "s");
    if (ring.failed_entries != 0) {
        text += fmt::format(", {} entries refused: {}", ring.failed_entries, error);
    }
    return text + ")";
}

Result<uint32_t> possible_cpus() {
    // A list of ranges, e.g. "0-1" or "0,2-5".
    std::ifstream in("/sys/devices/system/cpu/possible");
    std::string text;
    if (!(in >> text)) {
        return make_error(ENOENT, "cannot read /sys/devices/system/cpu/possible");
    }
    uint32_t highest = 0;
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = text.find(',', pos);
        std::string range = text.substr(pos, end == std::string::npos ? end : end - pos);
        size_t dash = range.find('-');
        std::string last_text = dash == std::string::npos ? range : range.substr(dash + 1);
        char* stop = nullptr;
        unsigned long last = std::strtoul(last_text.c_str(), &stop, 10);
        if (last_text.empty() || *stop != '\0' || last > 4095) {
            return make_error(EINVAL, "cannot parse /sys/devices/system/cpu/possible: {}", text);
        }
        highest = std::max<uint32_t>(highest, static_cast<uint32_t>(last));
        pos = end == std::string::npos ? text.size() : end + 1;
    }
    // Queues are indexed by CPU number, so a gap still needs its queue.
    return highest + 1;
}

}  // namespace imgfs::fuse_uring
