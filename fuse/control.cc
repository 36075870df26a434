#include "fuse/control.h"

namespace imgfs {

Result<std::string> parse_command(std::string_view written) {
    if (written.size() > 4096) {
        return make_error(EINVAL, "command longer than 4096 bytes");
    }
    if (!written.empty() && written.back() == '\n') {
        written.remove_suffix(1);
    }
    for (char c : written) {
        if (c == '\0') {
            return make_error(EINVAL, "command contains a NUL byte");
        }
        if (c == '\n' || c == '\r') {
            return make_error(EINVAL, "one write carries one command (no line breaks)");
        }
    }
    return std::string(written);
}

bool valid_snapshot_name(std::string_view name) {
    if (name.empty() || name.size() > 64) {
        return false;
    }
    auto alnum = [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    };
    if (!alnum(name[0])) {
        return false;
    }
    for (char c : name) {
        if (!alnum(c) && c != '.' && c != '_' && c != '-') {
            return false;
        }
    }
    return true;
}

}  // namespace imgfs
