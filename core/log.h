// Logger: where human-readable reports go (stderr in the foreground, syslog as a daemon).
// main() builds one and passes it down; nothing logs through a global.
#pragma once

#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

namespace imgfs {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

class Logger {
  public:
    virtual ~Logger() = default;
    virtual void write(LogLevel level, std::string_view message) = 0;

    template <typename... Args>
    void info(fmt::format_string<Args...> f, Args&&... args) {
        write(LogLevel::kInfo, fmt::format(f, std::forward<Args>(args)...));
    }
    template <typename... Args>
    void warn(fmt::format_string<Args...> f, Args&&... args) {
        write(LogLevel::kWarning, fmt::format(f, std::forward<Args>(args)...));
    }
    template <typename... Args>
    void error(fmt::format_string<Args...> f, Args&&... args) {
        write(LogLevel::kError, fmt::format(f, std::forward<Args>(args)...));
    }
    template <typename... Args>
    void debug(fmt::format_string<Args...> f, Args&&... args) {
        if (verbose_) {
            write(LogLevel::kDebug, fmt::format(f, std::forward<Args>(args)...));
        }
    }
    void set_verbose(bool v) { verbose_ = v; }

  private:
    bool verbose_ = false;
};

/// Writes "imgfs: LEVEL: message" lines to stderr.
class StderrLogger final : public Logger {
  public:
    void write(LogLevel level, std::string_view message) override;
};

/// Keeps every line in memory; tests assert on what was reported.
class CaptureLogger final : public Logger {
  public:
    void write(LogLevel level, std::string_view message) override;
    [[nodiscard]] std::vector<std::string> lines() const;
    [[nodiscard]] bool contains(std::string_view needle) const;

  private:
    mutable std::mutex mutex_;
    std::vector<std::string> lines_;  // guarded by mutex_
};

const char* log_level_name(LogLevel level);

}  // namespace imgfs
