#include "fuse/control.h"

namespace imgfs {

Result<std::string> parse_command(std::string_view written) {
    if (written.size() >= kMaxCommandWrite) {
        return make_error(EINVAL,
                          "a command of {} bytes or more (a shell writes such a line in pieces, "
                          "the first of exactly {})",
                          kMaxCommandWrite, kMaxCommandWrite);
    }
    if (may_be_a_piece(written)) {
        return make_error(EINVAL,
                          "{} bytes without a line end: a shell writes a long line in pieces "
                          "({} bytes or more each), so this may be one; end a command this "
                          "long with a newline",
                          written.size(), kMinPieceBytes);
    }
    if (!written.empty() && written.back() == '\n') {
        written.remove_suffix(1);
    }
    for (char c : written) {
        if (c == '\0') {
            return make_error(EINVAL, "command contains a NUL byte");
        }
        if (c == '\r') {
            return make_error(EINVAL, "command contains a carriage return (end it with \\n alone)");
        }
        if (c == '\n') {
            return make_error(EINVAL, "one write carries one command (no line breaks)");
        }
    }
    return std::string(written);
}

}  // namespace imgfs
