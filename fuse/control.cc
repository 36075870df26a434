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

}  // namespace imgfs
