// InlineGate: how much I/O a loop may make synchronously on its own thread (a pread or pwrite
// instead of an io_uring SQE, where io_uring would hand the call to a worker thread;
// drivers/file.cc says when). Its bounds are the loop's, not each file's:
//  - At most kCallsPerTurn calls between two turns of the loop (two waits for completions),
//    so a run of calls that never suspend (a job copying an image on tmpfs) cannot keep the
//    loop from serving anyone else.
//  - Once the calls that slept in the kernel have slept more than a budget within one second
//    (a stall), none for a cool-off: 1 s, doubling with each stall in a row up to 64 s. A
//    budget rather than a limit per call: a single short sleep now and then (measured:
//    0.3-0.6 ms once in a 6 s run of 4k writes) is cheaper than a second of the slower path,
//    while many short ones (an inode lock another thread holds) add up. What makes calls
//    sleep (dirty-page throttling, a busy disk, the journal) is rarely one file's, so every
//    file of the loop backs off together.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace imgfs {

class InlineGate {
  public:
    using Clock = std::chrono::steady_clock;
    static constexpr uint64_t kCallsPerTurn = 256;
    static constexpr std::chrono::seconds kCoolOff{1};
    static constexpr unsigned kCoolOffDoublingsMax = 6;  // 64 s
    // A stall this long after the last one starts a new row. Longer than the longest cool-off:
    // otherwise a stall right after a 64 s cool-off would start again at 1 s.
    static constexpr std::chrono::seconds kRowGap{300};

    InlineGate() = default;
    InlineGate(const InlineGate&) = delete;
    InlineGate& operator=(const InlineGate&) = delete;

    /// Whether one more call may go inline now; if so, it counts against this turn.
    bool may_go(Clock::time_point now) {
        if (now < off_until_ || calls_this_turn_ >= kCallsPerTurn) {
            return false;
        }
        ++calls_this_turn_;
        return true;
    }
    /// The loop waited for completions: a new turn.
    void new_turn() { calls_this_turn_ = 0; }
    /// A call that ended at `now` slept in the kernel for `slept`. True if that makes the
    /// sleeps of the current second exceed `budget`: a stall, and none go inline for
    /// `*cool_off`.
    bool slept(Clock::time_point now, Clock::duration slept, Clock::duration budget,
               std::chrono::seconds* cool_off) {
        if (now - window_start_ > std::chrono::seconds(1)) {
            window_start_ = now;
            slept_in_window_ = Clock::duration::zero();
        }
        slept_in_window_ += slept;
        if (slept_in_window_ <= budget) {
            return false;
        }
        if (now - last_stall_ > kRowGap) {
            stalls_in_a_row_ = 0;
        }
        *cool_off = kCoolOff * (1U << std::min(stalls_in_a_row_, kCoolOffDoublingsMax));
        ++stalls_in_a_row_;
        ++stalls_;
        last_stall_ = now;
        off_until_ = now + *cool_off;
        window_start_ = now;
        slept_in_window_ = Clock::duration::zero();
        return true;
    }
    [[nodiscard]] uint64_t stalls() const { return stalls_; }

  private:
    uint64_t calls_this_turn_ = 0;
    uint64_t stalls_ = 0;
    unsigned stalls_in_a_row_ = 0;
    Clock::time_point off_until_{};
    Clock::time_point last_stall_{};
    Clock::time_point window_start_{};
    Clock::duration slept_in_window_{};
};

}  // namespace imgfs
