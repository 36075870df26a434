// FsTest: ExportFs over a real image directory (in /dev/shm) with its ImageSet, JobManager and
// control files, driven by FUSE requests built in memory: no mount, no root, no kernel. Several
// requests can be in flight at once (spawn them into a scope), so races between control
// operations, I/O and rescans run on any developer machine.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <linux/fuse.h>

#include "core/task_scope.h"
#include "drivers/qcow2/create.h"
#include "fuse/export_fs.h"
#include "fuse/standard_control.h"
#include "jobs/job_manager.h"
#include "test_util.h"

namespace imgfs::test {

/// A reply, copied out of the request's buffers.
struct Reply {
    int error = 0;
    std::vector<uint8_t> data;
    template <typename T>
    T as() const {
        T v{};
        std::memcpy(&v, data.data(), std::min(sizeof v, data.size()));
        return v;
    }
};

/// Passes requests to its child, or holds them all while held (to keep I/O in flight).
class GateNode final : public Node {
  public:
    GateNode(NodeEnv env, std::string name, uint64_t size, Limits limits, Capabilities caps);
    [[nodiscard]] const char* driver_name() const override { return "gate"; }
    void hold() { held_ = true; }
    /// Holds only reads and block status (writes, flushes and closes pass), after letting
    /// `pass_first` of them through.
    void hold_reads(int pass_first = 0) {
        reads_held_ = true;
        reads_to_pass_ = pass_first;
    }
    void release();
    [[nodiscard]] int waiting() const { return waiting_; }
    /// Writes that pass the gate fail with this errno (0: they go through).
    int fail_writes = 0;
    /// Reads that pass the gate fail with this errno (0: they go through).
    int fail_reads = 0;
    Task<Result<uint64_t>> allocated_bytes() override;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override;
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override;
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) override;
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_flush() override;
    Task<Result<BlockStatus>> do_block_status(uint64_t offset, uint64_t bytes) override;
    Task<Status> do_truncate(uint64_t new_size) override;

  private:
    Task<void> pass(bool read);
    Child* below() const { return child(ChildRole::kFiltered); }
    bool held_ = false;
    bool reads_held_ = false;
    int reads_to_pass_ = 0;
    int waiting_ = 0;
    WaitQueue gate_;
};

class FsTest : public LoopTest {
  public:  // coroutine helpers of the tests call these
    void SetUp() override;
    void TearDown() override;

    /// Creates FILE.qcow2 in the directory (with a backing file, if given).
    void make_qcow2(const std::string& file, uint64_t size, const std::string& backing = "",
                    const std::string& backing_format = "qcow2");
    /// Creates a raw image FILE of `size` bytes (sparse).
    void make_raw(const std::string& file, uint64_t size);
    /// Starts the set (scans), the jobs, the control files and the filesystem.
    void start(ImageSetOptions options = {});
    /// Stops everything (jobs, then images), as the daemon does at unmount.
    void stop();
    /// Wraps every file of every chain in a GateNode (call before start()).
    void gate_files(ImageSetOptions* options);
    void hold_gates();
    void hold_gate_reads(int pass_first = 0);
    /// Gates made from now on (new snapshot overlays) start held.
    void hold_new_gates() { hold_new_gates_ = true; }
    /// Releases every gate, and new ones are made open again.
    void release_gates();
    /// The gate over `file` (made by gate_files), or null.
    GateNode* gate_of(const std::string& file);

    /// One request; `arg` is the opcode's argument struct (and names), `payload` WRITE data,
    /// `pid` the caller's thread as the kernel names it.
    Task<Reply> request(uint32_t opcode, uint64_t nodeid, std::vector<uint8_t> arg,
                        std::vector<uint8_t> payload, uint32_t pid = 0);
    template <typename T>
    static std::vector<uint8_t> bytes_of(const T& v) {
        std::vector<uint8_t> out(sizeof v);
        std::memcpy(out.data(), &v, sizeof v);
        return out;
    }

    // Synchronous helpers (each runs the loop until its request is answered).
    /// The inode of "vm.raw", ".control/vm/snapshot", ".control/rescan"... or 0.
    uint64_t ino(const std::string& path);
    uint64_t open(uint64_t ino, uint32_t flags);
    void release(uint64_t ino, uint64_t fh);
    /// Writes one command to a control file (open, write, release); 0 or the errno.
    int control(const std::string& path, const std::string& text);
    std::string read_text(const std::string& path);
    std::vector<uint8_t> read_raw(const std::string& name);
    void write_raw(const std::string& name, uint64_t offset, const std::vector<uint8_t>& data);

    // The same as tasks, to run several at once.
    Task<int> control_task(uint64_t ino, std::string text, uint32_t pid = 0);
    /// Several writes on one open handle, at advancing offsets (as a shell's stdio issues a
    /// long line, or a script several lines), by the caller `pid`; their errnos.
    Task<std::vector<int>> control_writes_task(uint64_t ino, std::vector<std::string> writes,
                                               uint32_t pid = 0);
    std::vector<int> control_writes(const std::string& path, std::vector<std::string> writes);
    Task<Reply> getattr_task(uint64_t ino);
    Task<Reply> lseek_task(uint64_t ino, uint64_t fh, uint64_t offset, uint32_t whence);
    Task<Reply> fallocate_task(uint64_t ino, uint64_t fh, uint32_t mode, uint64_t offset,
                               uint64_t length);
    Task<Reply> setattr_size_task(uint64_t ino, uint64_t size);
    Task<Reply> read_task(uint64_t ino, uint64_t fh, uint64_t offset, uint32_t size);
    static Task<void> join(TaskScope* scope) { co_await scope->join(); }
    /// Runs `t` and keeps its reply (spawn several into a scope to run them at once).
    static Task<void> store(Task<Reply> t, Reply* out) { *out = co_await std::move(t); }
    static Task<void> store_int(Task<int> t, int* out) { *out = co_await std::move(t); }
    /// Runs the loop for about `ms` milliseconds.
    void idle(int ms);

    /// The chain as the control file shows it (top first).
    std::vector<std::string> chain(const std::string& name);
    /// The chain as the files' headers say it, from the export's root file down.
    std::vector<std::string> chain_on_disk(const std::string& root);
    /// File descriptors of this process open on files of the image directory (by name).
    std::vector<std::string> open_files();
    /// True if another open file description could take every image lock byte of `file`
    /// (no one holds a QEMU-style lock on it).
    bool lockable(const std::string& file);

    TempDir dir_{memory_backed()};
    UniqueFd dir_fd_;
    std::unique_ptr<ImageSet> images_;
    std::unique_ptr<JobManager> jobs_;
    std::unique_ptr<StandardControl> control_;
    std::unique_ptr<ExportFs> fs_;
    std::vector<std::shared_ptr<GateNode>> gates_;
    bool hold_new_gates_ = false;
    /// The filesystem's options for start().
    ExportFsOptions fs_options_;
    /// If set, start() serves the directory through the store this returns (a wrapper).
    std::function<std::unique_ptr<Store>(std::unique_ptr<Store>)> wrap_store_;
    uint64_t unique_ = 1;
    AlignedBuffer scratch_;
};

}  // namespace imgfs::test
