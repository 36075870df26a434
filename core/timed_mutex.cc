#include "core/timed_mutex.h"

#include <algorithm>
#include <cassert>

namespace imgfs {

namespace {

using Clock = std::chrono::steady_clock;
// The timer task looks at least this often, so it ends soon after the last waiter left.
constexpr std::chrono::milliseconds kTimerSlice{50};

}  // namespace

struct TimedMutex::State {
    // A waiting coroutine; lives in its frame while it is linked here.
    struct Waiter {
        std::coroutine_handle<> handle;
        Clock::time_point deadline = Clock::time_point::max();
        bool granted = false;
        Waiter* prev = nullptr;
        Waiter* next = nullptr;
    };

    EventLoop* loop;
    TaskScope* timers;
    bool locked = false;
    bool timer_running = false;
    Waiter* head = nullptr;
    Waiter* tail = nullptr;
    size_t count = 0;

    State(EventLoop* l, TaskScope* t) : loop(l), timers(t) {}

    void push(Waiter* w) {
        w->prev = tail;
        w->next = nullptr;
        (tail != nullptr ? tail->next : head) = w;
        tail = w;
        ++count;
    }
    void unlink(Waiter* w) {
        (w->prev != nullptr ? w->prev->next : head) = w->next;
        (w->next != nullptr ? w->next->prev : tail) = w->prev;
        w->prev = w->next = nullptr;
        --count;
    }
    // Hands the mutex to the oldest waiter, or frees it.
    void unlock() {
        assert(locked);
        Waiter* w = head;
        if (w == nullptr) {
            locked = false;
            return;
        }
        unlink(w);
        w->granted = true;
        loop->schedule(w->handle);
    }
};

// Wakes bounded waiters whose time is up (without the mutex). Runs while any bounded waiter
// exists; holds the state so that it never outlives what it walks.
Task<void> TimedMutex::expire_waiters(std::shared_ptr<State> s) {
    for (;;) {
        const auto now = Clock::now();
        auto next = Clock::time_point::max();
        for (State::Waiter* w = s->head; w != nullptr;) {
            State::Waiter* following = w->next;
            if (w->deadline <= now) {
                s->unlink(w);
                s->loop->schedule(w->handle);
            } else {
                next = std::min(next, w->deadline);
            }
            w = following;
        }
        if (next == Clock::time_point::max()) {
            break;
        }
        co_await s->loop->sleep(
            std::min<std::chrono::nanoseconds>(next - now, std::chrono::nanoseconds(kTimerSlice)));
    }
    s->timer_running = false;
}

// Trivially destructible on purpose: GCC 12 destroys some temporaries of a co_await expression
// twice, which for a shared_ptr member would drop a reference that was never taken.
struct TimedMutex::Enqueue {
    TimedMutex* self;
    State::Waiter* waiter;
    bool await_ready() noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) {
        State* state = self->state_.get();
        waiter->handle = h;
        state->push(waiter);
        if (waiter->deadline != Clock::time_point::max() && !state->timer_running) {
            state->timer_running = true;
            state->timers->spawn(expire_waiters(self->state_));
        }
    }
    void await_resume() noexcept {}
};

TimedMutex::TimedMutex(EventLoop* loop, TaskScope* timers)
    : state_(std::make_shared<State>(loop, timers)) {}

TimedMutex::~TimedMutex() {
    assert(state_->head == nullptr && "TimedMutex destroyed with waiters");
}

TimedMutex::Guard& TimedMutex::Guard::operator=(Guard&& o) noexcept {
    if (this != &o) {
        release();
        state_ = std::move(o.state_);
    }
    return *this;
}

void TimedMutex::Guard::release() {
    if (state_ != nullptr) {
        std::exchange(state_, nullptr)->unlock();
    }
}

std::optional<TimedMutex::Guard> TimedMutex::try_lock() {
    if (state_->locked) {
        return std::nullopt;
    }
    state_->locked = true;
    return Guard(state_);
}

Task<std::optional<TimedMutex::Guard>> TimedMutex::lock_for(std::chrono::nanoseconds timeout) {
    if (!state_->locked) {
        state_->locked = true;
        co_return Guard(state_);
    }
    State::Waiter w;
    w.deadline = Clock::now() + timeout;
    co_await Enqueue{this, &w};
    if (!w.granted) {
        co_return std::nullopt;  // the timer unlinked us
    }
    co_return Guard(state_);
}

Task<TimedMutex::Guard> TimedMutex::lock() {
    if (!state_->locked) {
        state_->locked = true;
        co_return Guard(state_);
    }
    State::Waiter w;
    co_await Enqueue{this, &w};
    assert(w.granted);
    co_return Guard(state_);
}

bool TimedMutex::locked() const {
    return state_->locked;
}

size_t TimedMutex::waiters() const {
    return state_->count;
}

}  // namespace imgfs
