#include "fuse/fuse_uring.h"

#include <algorithm>
#include <cctype>
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
    if (!ring.in_use) {
        return fmt::format(
            "/dev/fuse (FUSE-over-io_uring unused: the kernel refused {} ring entr{}: {})",
            ring.failed_entries, ring.failed_entries == 1 ? "y" : "ies", error);
    }
    std::string text = fmt::format("io_uring ({} queues x {} entries, {} loop{}", ring.queues,
                                   ring.entries_per_queue, ring.loops, ring.loops == 1 ? "" : "s");
    if (ring.failed_entries != 0) {
        text += fmt::format(", {} entries refused: {}", ring.failed_entries, error);
    }
    return text + ")";
}

Result<uint32_t> count_cpus(std::string_view list) {
    auto number = [](std::string_view text, unsigned long* out) {
        char* stop = nullptr;
        std::string copy(text);
        *out = std::strtoul(copy.c_str(), &stop, 10);
        return !copy.empty() && *stop == '\0' &&
               std::isdigit(static_cast<unsigned char>(copy[0])) && *out <= 4095;
    };
    uint32_t count = 0;
    size_t pos = 0;
    while (pos <= list.size()) {
        size_t end = std::min(list.find(',', pos), list.size());
        std::string_view range = list.substr(pos, end - pos);
        size_t dash = range.find('-');
        unsigned long first = 0;
        unsigned long last = 0;
        const bool ok = dash == std::string_view::npos
                            ? number(range, &first) && number(range, &last)
                            : number(range.substr(0, dash), &first) &&
                                  number(range.substr(dash + 1), &last) && first <= last;
        if (!ok) {
            return make_error(EINVAL, "cannot parse the CPU list '{}'", list);
        }
        count += static_cast<uint32_t>(last - first + 1);
        pos = end + 1;
    }
    return count;
}

Result<uint32_t> possible_cpus() {
    std::ifstream in("/sys/devices/system/cpu/possible");
    std::string text;
    if (!(in >> text)) {
        return make_error(ENOENT, "cannot read /sys/devices/system/cpu/possible");
    }
    return count_cpus(text);
}

}  // namespace imgfs::fuse_uring
