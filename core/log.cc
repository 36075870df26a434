#include "core/log.h"

#include <cstdio>

namespace imgfs {

const char* log_level_name(LogLevel level) {
    switch (level) {
        case LogLevel::kDebug:
            return "debug";
        case LogLevel::kInfo:
            return "info";
        case LogLevel::kWarning:
            return "warning";
        case LogLevel::kError:
            return "error";
    }
    return "?";
}

void StderrLogger::write(LogLevel level, std::string_view message) {
    std::string line = fmt::format("imgfs: {}: {}\n", log_level_name(level), message);
    std::fwrite(line.data(), 1, line.size(), stderr);
}

void CaptureLogger::write(LogLevel level, std::string_view message) {
    std::lock_guard<std::mutex> lock(mutex_);
    lines_.push_back(fmt::format("{}: {}", log_level_name(level), message));
}

std::vector<std::string> CaptureLogger::lines() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return lines_;
}

bool CaptureLogger::contains(std::string_view needle) const {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& l : lines_) {
        if (l.find(needle) != std::string::npos) {
            return true;
        }
    }
    return false;
}

}  // namespace imgfs
