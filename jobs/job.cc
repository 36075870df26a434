#include "jobs/job.h"

#include <algorithm>
#include <cassert>

#include "core/event_loop.h"
#include "core/json.h"
#include "jobs/image_set.h"

namespace imgfs {

namespace {

constexpr int kStates = 5;
constexpr int kVerbs = 4;

// kTransitions[from][to]
constexpr bool kTransitions[kStates][kStates] = {
    //            created running paused ready  concluded
    /* created */ {false, true, true, false, true},
    /* running */ {false, false, true, true, true},
    /* paused  */ {false, true, false, false, true},
    /* ready   */ {false, false, false, false, true},
    /* concl.  */ {false, false, false, false, false},
};

// kVerbTable[verb][state]
constexpr bool kVerbTable[kVerbs][kStates] = {
    //               created running paused ready  concluded
    // Not in ready: the job is switching the graph over and is past its last checkpoint; a
    // cancel accepted there would be ignored and the job would still complete.
    /* cancel    */ {true, true, true, false, false},
    /* pause     */ {true, true, false, false, false},
    /* resume    */ {false, false, true, false, false},
    /* set-speed */ {true, true, true, true, false},
};

int idx(JobState s) {
    return static_cast<int>(s);
}

}  // namespace

const char* job_state_name(JobState s) {
    switch (s) {
        case JobState::kCreated:
            return "created";
        case JobState::kRunning:
            return "running";
        case JobState::kPaused:
            return "paused";
        case JobState::kReady:
            return "ready";
        case JobState::kConcluded:
            return "concluded";
    }
    return "?";
}

bool job_transition_allowed(JobState from, JobState to) {
    return kTransitions[idx(from)][idx(to)];
}

bool job_verb_allowed(JobVerb verb, JobState state) {
    return kVerbTable[static_cast<int>(verb)][idx(state)];
}

Job::Job(EventLoop* loop, uint64_t id, std::string type, std::shared_ptr<Export> e)
    : ChildOwner(loop),
      loop_(loop),
      id_(id),
      type_(std::move(type)),
      export_(std::move(e)),
      export_id_(export_ != nullptr ? export_->id : 0),
      export_name_(export_ != nullptr ? export_->name : std::string()),
      resumed_(loop) {}

Job::~Job() = default;

std::string Job::owner_name() const {
    return fmt::format("{} job {} on {}", type_, id_, export_name_);
}

void Job::set_state(JobState s) {
    assert(job_transition_allowed(state_, s) && "illegal job state transition");
    state_ = s;
    if (s != JobState::kPaused) {
        resumed_.notify_all();
    }
}

Task<void> Job::run() {
    if (state_ == JobState::kCreated) {
        set_state(JobState::kRunning);
    }  // else paused before it started: it holds at its first checkpoint
    window_start_ = std::chrono::steady_clock::now();
    Status st = co_await body();
    if (!st) {
        error_ = cancelled_ && st.error().errnum == ECANCELED ? "cancelled" : st.error().message();
    }
    if (std::optional<uint64_t> left = remaining_bytes()) {
        total_bytes_ = done_bytes_ + *left;  // kept: the job's state goes with its nodes
    }
    if (total_bytes_ < done_bytes_) {
        total_bytes_ = done_bytes_;
    }
    release_nodes();
    export_.reset();
    set_state(JobState::kConcluded);
}

Task<Status> Job::enter_ready() {
    while (state_ == JobState::kPaused && !cancelled_) {
        co_await resumed_.wait();
    }
    if (cancelled_) {
        co_return make_error(ECANCELED, "cancelled");
    }
    set_state(JobState::kReady);
    co_return Status{};
}

Status Job::cancel() {
    if (!job_verb_allowed(JobVerb::kCancel, state_)) {
        return make_error(EBUSY, "job {} is {}: cannot cancel{}", id_, job_state_name(state_),
                          state_ == JobState::kReady ? " (it is completing)" : "");
    }
    cancelled_ = true;
    if (state_ == JobState::kPaused) {
        set_state(JobState::kRunning);  // so the body sees the cancel at its checkpoint
    }
    resumed_.notify_all();
    return {};
}

Status Job::pause() {
    if (!job_verb_allowed(JobVerb::kPause, state_)) {
        return make_error(EBUSY, "job {} is {}: cannot pause", id_, job_state_name(state_));
    }
    set_state(JobState::kPaused);
    return {};
}

Status Job::resume() {
    if (!job_verb_allowed(JobVerb::kResume, state_)) {
        return make_error(EBUSY, "job {} is {}: cannot resume", id_, job_state_name(state_));
    }
    set_state(JobState::kRunning);
    return {};
}

Status Job::set_speed(uint64_t bytes_per_s) {
    if (!job_verb_allowed(JobVerb::kSetSpeed, state_)) {
        return make_error(EBUSY, "job {} is {}", id_, job_state_name(state_));
    }
    // Once lifted (shutdown, a commit's switch) the limit stays off: the copy left runs
    // under the image's lock or holds the unmount.
    speed_bytes_per_s_ = speed_lifted_ ? 0 : bytes_per_s;
    window_start_ = std::chrono::steady_clock::now();
    window_bytes_ = 0;
    return {};
}

Task<Status> Job::checkpoint(uint64_t bytes, uint64_t copied_bytes) {
    using namespace std::chrono;
    done_bytes_ += bytes;
    window_bytes_ += copied_bytes;
    // Every wait is re-checked from the top, so that a cancel, a pause or a new speed that
    // comes in while the job sleeps off its rate limit takes effect at once.
    for (;;) {
        if (cancelled_ || units_stopped_) {
            co_return make_error(ECANCELED, "cancelled");
        }
        if (state_ == JobState::kPaused) {
            co_await resumed_.wait();
            continue;
        }
        if (quiesced()) {
            co_await wait_unquiesced();
            continue;
        }
        if (speed_bytes_per_s_ == 0) {
            break;
        }
        // The bytes of this window must fit the rate; sleep in slices (the debt can be hours
        // long when the rate is tiny).
        const auto due =
            window_start_ + nanoseconds(window_bytes_ * 1'000'000'000ULL / speed_bytes_per_s_);
        const auto now = steady_clock::now();
        if (due <= now) {
            if (now - window_start_ > seconds(1)) {
                window_start_ = now;
                window_bytes_ = 0;
            }
            break;
        }
        co_await loop_->sleep(std::min<nanoseconds>(due - now, milliseconds(100)));
    }
    co_return Status{};
}

std::string Job::status_json() const {
    JsonWriter w;
    w.begin_object();
    w.field("id", id_);
    w.field("type", type_);
    w.field("image", export_name_);
    w.field("state", job_state_name(state_));
    w.field("done_bytes", done_bytes_);
    const std::optional<uint64_t> left =
        state_ == JobState::kConcluded ? std::nullopt : remaining_bytes();
    w.field("total_bytes", left ? done_bytes_ + *left : std::max(total_bytes_, done_bytes_));
    w.field("speed", speed_bytes_per_s_);
    if (!base_file_.empty()) {
        w.field("base", base_file_);
    }
    if (error_.empty()) {
        w.key("error");
        w.null();
    } else {
        w.field("error", error_);
    }
    w.end_object();
    return w.take();
}

}  // namespace imgfs
