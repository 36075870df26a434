// SyslogLogger: the daemon's log once it has left the terminal.
#pragma once

#include <string>

#include <syslog.h>

#include "core/log.h"

namespace imgfs {

class SyslogLogger final : public Logger {
  public:
    SyslogLogger() { ::openlog("imgfs", LOG_PID | LOG_NDELAY, LOG_DAEMON); }
    SyslogLogger(const SyslogLogger&) = delete;
    SyslogLogger& operator=(const SyslogLogger&) = delete;
    ~SyslogLogger() override { ::closelog(); }
    void write(LogLevel level, std::string_view message) override {
        int prio = level == LogLevel::kError     ? LOG_ERR
                   : level == LogLevel::kWarning ? LOG_WARNING
                   : level == LogLevel::kInfo    ? LOG_INFO
                                                 : LOG_DEBUG;
        std::string m(message);
        ::syslog(prio, "%s", m.c_str());
    }
};

}  // namespace imgfs
