// ReadAhead: reads the next ranges of NAME.raw ahead of a client that reads it in order, one
// request at a time (a guest's `dd`, QEMU serving such a guest, a copy out of a loop-mounted
// file system). That client waits for every read, and the disk waits for the client between
// reads; reading the next two ranges while the client is served and turns around overlaps the
// two and keeps two reads at the disk. A client with several reads in flight keeps the disk
// busy on its own, so nothing is read ahead for it: reads ahead are started only once two
// reads in a row continued the one before them and were the only read of that image in flight
// when they arrived. A read that breaks the pattern without using a window drops the windows.
//
// Coherence: a window (a range read ahead) is used only while the backend's content
// generation is the one it was started under, so a write, zeroing, discard or resize admitted
// since, or a drained section (snapshot, revert, job switch), makes it unusable; and none is
// started while a write is in flight. A read that finds no usable window reads the backend.
//
// Lifetime: each read ahead is a task of this object's scope, holding its Export (and so the
// backend) and its window by shared_ptr; join() waits for them (FuseServer::run's end, before
// the images close). Windows are 2 MiB areas (one huge page where the kernel gives one: a 1 MiB
// O_DIRECT read into small pages needs more segments than one block request carries), reused
// once nothing holds them; a stream drops its windows when its client stops reading in order.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "core/task_scope.h"
#include "jobs/image_set.h"

namespace imgfs {

struct ReadAheadOptions {
    /// False where other hosts may write the images while this daemon serves them (a Ceph
    /// pool, StoreCaps::shared_between_hosts): what was read a moment ago may be stale there,
    /// and the generation check sees only this daemon's writes. Every read then goes to the
    /// backend.
    bool enabled = true;
    /// Reads smaller than this are not read ahead of (a 4 KiB reader gains little, and a file
    /// system's metadata reads are small).
    uint64_t min_request_bytes = 64 << 10;
};

class ReadAhead {
  public:
    /// The largest read that is read ahead of: one window. A FUSE read is at most 1 MiB
    /// (max_read), so a window is half used at most; it is a whole huge page so that a 1 MiB
    /// read into it is one disk request.
    static constexpr uint64_t kWindowBytes = 2 << 20;
    /// Ranges read ahead of a reader: the disk keeps this many reads of it in flight.
    static constexpr uint64_t kDepth = 2;
    /// Reads in a row that must continue the one before and come alone before any is read
    /// ahead of: a client with a deep queue now and then has a read alone in flight.
    static constexpr uint32_t kRunToStart = 2;
    /// Windows alive at most, for all streams together (24 MiB), those still filling for a
    /// stream that dropped them included: a new stream takes the unused windows of others, and
    /// gets none while every window is in use.
    static constexpr size_t kMaxWindows = 12;

    explicit ReadAhead(Executor* executor, ReadAheadOptions options = {});
    ReadAhead(const ReadAhead&) = delete;
    ReadAhead& operator=(const ReadAhead&) = delete;
    /// join() must have run.
    ~ReadAhead();

    /// Reads `buf.size()` bytes at `offset` of `e`'s disk, from a window when one holds them,
    /// from the backend otherwise. The caller guarantees offset + size <= the disk's size and
    /// that the export was not removed when it looked.
    Task<Status> read(std::shared_ptr<Export> e, uint64_t offset, MutBuf buf);

    /// Waits until no read ahead is in flight. Call once no more reads come.
    Task<void> join();

    /// The last file of export `id` was closed: its windows go (their memory with them).
    void closed(uint64_t id);
    /// Drops the state of exports `live` does not find (ids are never reused).
    template <typename Live>
    void forget_gone(Live live) {
        std::erase_if(streams_,
                      [&](const auto& s) { return s.second.reads == 0 && !live(s.first); });
    }

    struct Stats {
        uint64_t started = 0;  // reads ahead issued
        uint64_t used = 0;     // client reads served from a window
        uint64_t waited = 0;   // of those, reads that waited for their window to fill
        uint64_t failed = 0;   // reads ahead that failed (their range is read again)
    };
    [[nodiscard]] const Stats& stats() const { return stats_; }
    [[nodiscard]] size_t streams() const { return streams_.size(); }
    /// Windows alive (each up to kWindowBytes of memory).
    [[nodiscard]] size_t windows() const { return live_windows_; }

  private:
    struct Window;
    struct Stream {
        uint64_t next_offset = UINT64_MAX;  // where the last read ended
        uint32_t reads = 0;                 // client reads in flight
        uint32_t run = 0;  // reads in a row that continued the last one and came alone
        std::vector<std::shared_ptr<Window>> windows;  // ahead of the reader, or done with
    };
    /// The window of `s` that holds [offset, offset + bytes) as of `generation` and has not
    /// failed, or null.
    static std::shared_ptr<Window> find(const Stream& s, uint64_t generation, uint64_t offset,
                                        uint64_t bytes);
    /// Starts reading [offset, offset + bytes) of `e` ahead for a reader at `reader`, unless
    /// a window holds it already or it is not safe.
    void start(const std::shared_ptr<Export>& e, Stream* s, uint64_t reader, uint64_t offset,
               uint64_t bytes);
    /// A window for `s` to fill: one of its own it is done with, a new one, or one another
    /// stream is done with; null if there is none.
    std::shared_ptr<Window> take_window(Stream* s, uint64_t reader, uint64_t generation);
    /// Reads window `w` of `e` (a task of scope_, which outlives it).
    Task<void> fill(std::shared_ptr<Export> e, std::shared_ptr<Window> w);
    /// Ends a client read of stream `id` (looked up again: the map may have changed).
    void end_read(uint64_t id);

    Executor* executor_;
    ReadAheadOptions options_;
    size_t live_windows_ = 0;             // declared before the windows' holders: they count here
    std::map<uint64_t, Stream> streams_;  // by export id
    Stats stats_;
    TaskScope scope_;  // the fills; declared last, so it is gone before what they use
};

}  // namespace imgfs
