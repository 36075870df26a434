// Job: a long-running operation on one image (commit, stream), or the record of a short one
// (snapshot, revert). States and the verbs allowed in each are tables, checked on every change:
//
//   created -> running <-> paused
//   running -> ready -> concluded          (ready: source and target in sync, pivoting;
//                                           past the last checkpoint, so cancel is refused)
//   any     -> concluded                   (done, failed or cancelled)
//
// A job is a ChildOwner: the nodes it writes are attached to it with their own edges, so a
// drained section on them quiesces the job (it stops at its next checkpoint) like any user.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "core/node.h"
#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs {

class EventLoop;
struct Export;

enum class JobState { kCreated, kRunning, kPaused, kReady, kConcluded };
enum class JobVerb { kCancel, kPause, kResume, kSetSpeed };

const char* job_state_name(JobState s);
/// Whether the state machine allows `from` -> `to`.
bool job_transition_allowed(JobState from, JobState to);
/// Whether a user may apply `verb` in `state`.
bool job_verb_allowed(JobVerb verb, JobState state);

class Job : public ChildOwner {
  public:
    Job(EventLoop* loop, uint64_t id, std::string type, std::shared_ptr<Export> e);
    ~Job() override;

    [[nodiscard]] uint64_t id() const { return id_; }
    [[nodiscard]] const std::string& type() const { return type_; }
    /// The image the job works on; the job holds it until it concludes (and a running job
    /// keeps its export from being removed). Afterwards null: use image_id()/image_name().
    [[nodiscard]] Export* image() const { return export_.get(); }
    [[nodiscard]] const std::shared_ptr<Export>& image_ref() const { return export_; }
    [[nodiscard]] uint64_t image_id() const { return export_id_; }
    [[nodiscard]] const std::string& image_name() const { return export_name_; }
    [[nodiscard]] JobState state() const { return state_; }
    [[nodiscard]] bool finished() const { return state_ == JobState::kConcluded; }
    [[nodiscard]] const std::string& error() const { return error_; }
    [[nodiscard]] std::string owner_name() const override;

    /// The job's work; runs in the job manager's scope. Implementations call checkpoint()
    /// between units of work.
    virtual Task<Status> body() = 0;
    /// Runs body() and concludes the job with its outcome. A concluded job holds no node and
    /// no image any more: what it used is freed (or closed, if it left the chain) right away.
    Task<void> run();

    /// User verbs (from the job control file); EBUSY if the state does not allow it.
    Status cancel();
    Status pause();
    Status resume();
    Status set_speed(uint64_t bytes_per_s);
    /// Shutdown, and a commit's switch under the image's lock: a job too far on to be
    /// cancelled (completing) finishes at full speed, in any state; a rate limit would hold
    /// the unmount, or the image, for as long as its copy takes at that rate.
    /// For good: a later `speed` is accepted and has no effect.
    void lift_speed_limit() {
        speed_bytes_per_s_ = 0;
        speed_lifted_ = true;
    }

    /// {"id":..,"type":..,"image":..,"state":..,"done_bytes":..,"total_bytes":..,"speed":..,
    ///  "error":..}, and "base" for a commit (the layer it merges into).
    [[nodiscard]] std::string status_json() const;

    /// A cancel was asked for (the verb, or a shutdown).
    [[nodiscard]] bool cancelled() const { return cancelled_; }

  protected:
    /// Drops the job's references to nodes (called once, as the job concludes).
    virtual void release_nodes() {}
    /// What is left to do, for a job whose work grows as it runs (a commit: guest writes
    /// dirty what it copied). total_bytes is then done_bytes plus this, so the figure grows
    /// as the work does and done never runs past it. Without it, the running total counts.
    [[nodiscard]] virtual std::optional<uint64_t> remaining_bytes() const { return std::nullopt; }
    /// Set by a commit: the file of the layer it merges into, so that a client can tell one
    /// commit from another (`imgfs commit --base FILE --wait` follows only its own).
    std::string base_file_;
    /// Between units of work: counts `bytes` as done, waits while paused or quiesced by a
    /// drained section, sleeps to keep to the rate limit for the `copied_bytes` of them that
    /// were copied, and fails with ECANCELED once cancelled or stopped.
    Task<Status> checkpoint(uint64_t bytes, uint64_t copied_bytes);
    Task<Status> checkpoint(uint64_t bytes) { return checkpoint(bytes, bytes); }
    /// A unit of work failed: other units of the same job stop at their checkpoints (rather
    /// than sleep off the rate limit first) and fail with ECANCELED.
    void stop_units() {
        units_stopped_ = true;
        resumed_.notify_all();
    }
    void set_state(JobState s);
    /// Moves to ready, where the job completes and no longer takes a cancel; fails with
    /// ECANCELED instead if a cancel came in after the last checkpoint. A pause that came in
    /// after it holds here until resume or cancel, as at a checkpoint (ready cannot be paused).
    Task<Status> enter_ready();
    void set_total(uint64_t bytes) { total_bytes_ = bytes; }
    void add_done(uint64_t bytes) { done_bytes_ += bytes; }
    EventLoop* loop_;

  private:
    uint64_t id_;
    std::string type_;
    std::shared_ptr<Export> export_;
    uint64_t export_id_ = 0;
    std::string export_name_;
    JobState state_ = JobState::kCreated;
    std::string error_;
    bool cancelled_ = false;
    bool units_stopped_ = false;      // see stop_units()
    uint64_t speed_bytes_per_s_ = 0;  // 0: unlimited
    bool speed_lifted_ = false;       // see lift_speed_limit()
    uint64_t done_bytes_ = 0;
    uint64_t total_bytes_ = 0;
    // Rate limiting: bytes done since `window_start_`.
    std::chrono::steady_clock::time_point window_start_;
    uint64_t window_bytes_ = 0;
    WaitQueue resumed_;
};

}  // namespace imgfs
