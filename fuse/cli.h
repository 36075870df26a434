// The command line: one function per command, each returning the process exit code (0 on
// success; otherwise a one-line reason has been printed to stderr).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/result.h"

namespace imgfs::cli {

using Args = std::vector<std::string>;

int mount(const Args& args);
int unmount(const Args& args);
int create(const Args& args);
int info(const Args& args);
int io(const Args& args);
int snapshot(const Args& args);
int commit(const Args& args);
int revert(const Args& args);
int stream(const Args& args);
int status(const Args& args);
int job(const Args& args);
/// mount(8)'s helper for type fuse.imgfs: SOURCE MOUNTPOINT [-o OPTS] [-t TYPE] [-sfnv].
int mount_helper(const Args& args);

/// "64M", "1G", "4096", "512k": bytes (binary multiples).
Result<uint64_t> parse_size(const std::string& text);
/// Prints "imgfs: message" to stderr and returns 1.
int fail(const std::string& message);

}  // namespace imgfs::cli
