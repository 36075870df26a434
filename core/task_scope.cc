#include "core/task_scope.h"

#include <cassert>
#include <cstdlib>

namespace imgfs {

namespace {

// The frame of a spawned task's runner. It starts eagerly and frees itself at the end; the scope
// counts it, which is what keeps it from being "detached".
struct ScopeRunner {
    struct promise_type {
        ScopeRunner get_return_object() noexcept { return {}; }
        std::suspend_never initial_suspend() noexcept { return {}; }
        std::suspend_never final_suspend() noexcept { return {}; }
        void return_void() noexcept {}
        void unhandled_exception() noexcept { std::abort(); }
    };
};

}  // namespace

// A named function, not a lambda: the runner's frame must own its arguments.
static ScopeRunner run_in_scope(Task<void> task, void (*done)(void*), void* scope) {
    co_await std::move(task);
    done(scope);
}

TaskScope::~TaskScope() {
    assert(active_ == 0 && "TaskScope destroyed with running tasks");
}

void TaskScope::spawn(Task<void> task) {
    ++active_;
    run_in_scope(
        std::move(task), [](void* self) { static_cast<TaskScope*>(self)->task_done(); }, this);
}

void TaskScope::task_done() {
    assert(active_ > 0);
    if (--active_ == 0) {
        idle_.notify_all();
    }
}

Task<void> TaskScope::join() {
    while (active_ != 0) {
        co_await idle_.wait();
    }
}

}  // namespace imgfs
