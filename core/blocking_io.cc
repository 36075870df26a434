#include "core/blocking_io.h"

#include <cerrno>
#include <unistd.h>

namespace imgfs {

Result<size_t> pread_full(int fd, MutBuf buf, uint64_t offset) {
    size_t done = 0;
    while (done < buf.size()) {
        ssize_t n =
            ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return make_error(errno, "read");
        }
        if (n == 0) {
            break;  // end of file
        }
        done += static_cast<size_t>(n);
    }
    return done;
}

Status pwrite_full(int fd, ConstBuf buf, uint64_t offset) {
    size_t done = 0;
    while (done < buf.size()) {
        ssize_t n =
            ::pwrite(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return make_error(n < 0 ? errno : EIO, "write");
        }
        done += static_cast<size_t>(n);
    }
    return {};
}

}  // namespace imgfs
