#include "core/result.h"

#include <cstring>

namespace imgfs {

std::string Error::message() const {
    const char* what = strerror(errnum);
    if (context.empty()) {
        return what;
    }
    return fmt::format("{} ({})", context, what);
}

Error Error::wrap(std::string_view prefix) && {
    if (context.empty()) {
        context = std::string(prefix);
    } else {
        context = fmt::format("{}: {}", prefix, context);
    }
    return std::move(*this);
}

}  // namespace imgfs
