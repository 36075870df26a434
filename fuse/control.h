// The control files (docs/design.md §3.2): which exist, what reading one shows, what writing
// one does. ExportFs routes reads and writes here; the job-level operations live in jobs/.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.h"
#include "core/task.h"
#include "jobs/image_set.h"

namespace imgfs {

enum class ControlFile {
    // Per image, in .control/NAME/
    kSnapshot,
    kCommit,
    kRevert,
    kStream,
    kJob,
    kInfo,
    // Global, in .control/
    kGroupSnapshot,
    kRescan,
    kJobs,
    kSkipped,
};

struct ControlFileSpec {
    ControlFile file;
    const char* name;
    bool writable;
};

class ControlPlane {
  public:
    virtual ~ControlPlane() = default;
    /// The files in .control/NAME/ and in .control/.
    [[nodiscard]] virtual const std::vector<ControlFileSpec>& image_files() const = 0;
    [[nodiscard]] virtual const std::vector<ControlFileSpec>& global_files() const = 0;
    /// What reading the file shows (taken when it is opened). `e` is null for global files.
    virtual Task<std::string> read(std::shared_ptr<Export> e, ControlFile file) = 0;
    /// Runs one command for the writer `caller` (its thread id, 0 if unknown). On failure the
    /// error's errno goes to the writer and its text is kept as the image's last error, as
    /// that caller's error, and logged.
    virtual Task<Status> write(std::shared_ptr<Export> e, ControlFile file, std::string command,
                               uint32_t caller) = 0;
};

/// A control write this long or longer is refused: the C library's stdio (a shell's printf,
/// echo) writes a longer line in pieces of st_blksize (what the control files report), so the
/// first piece of a long line would look like a whole command, and so would the rest.
inline constexpr size_t kMaxCommandWrite = 4096;

/// A write this long or longer without a line end is refused too, with the rest of the line.
/// Not every piece is st_blksize long: the stdio buffer of a line-buffered stdout is sized
/// once, from what stdout was first (1024 bytes for a terminal in an interactive bash), and a
/// redirection keeps it. 512 is the smallest block size such a buffer takes.
inline constexpr size_t kMinPieceBytes = 512;

/// Whether a control write may be the first piece of a longer line.
inline bool may_be_a_piece(std::string_view written) {
    return written.size() >= kMaxCommandWrite ||
           (written.size() >= kMinPieceBytes && written.back() != '\n');
}

/// Strips one trailing newline and refuses what cannot be a command (NUL bytes, further line
/// breaks, kMaxCommandWrite bytes or more, kMinPieceBytes or more without a newline) with
/// EINVAL. Every control file takes one line per
/// write: a shell's echo and printf issue one write() per line, so a command of several lines would
/// silently arrive as several commands.
Result<std::string> parse_command(std::string_view written);

}  // namespace imgfs
