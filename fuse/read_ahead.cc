#include "fuse/read_ahead.h"

#include <cstring>

#include <sys/mman.h>

#include "core/wait_queue.h"
#include "fuse/huge_aligned_region.h"

namespace imgfs {

struct ReadAhead::Window {
    Window(Executor* executor, size_t* live) : region(kWindowBytes), filled(executor), live_(live) {
        if (region.ok()) {
            // A huge page where the kernel has one: reads ahead are large (see the header).
            ::madvise(region.base(), kWindowBytes, MADV_HUGEPAGE);
        }
        ++*live_;
    }
    Window(const Window&) = delete;
    Window& operator=(const Window&) = delete;
    ~Window() { --*live_; }

    [[nodiscard]] bool failed() const { return filled.is_set() && !ok; }

    [[nodiscard]] bool holds(uint64_t off, uint64_t n) const {
        return off >= offset && off - offset <= bytes && n <= bytes - (off - offset);
    }

    HugeAlignedRegion region;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    uint64_t generation = 0;  // the backend's content generation when it was started
    bool ok = false;          // filled without error
    AsyncEvent filled;

  private:
    size_t* live_;  // ReadAhead::live_windows_, which outlives every window
};

ReadAhead::ReadAhead(Executor* executor, ReadAheadOptions options)
    : executor_(executor), options_(options), scope_(executor) {}

ReadAhead::~ReadAhead() = default;

Task<void> ReadAhead::join() {
    co_await scope_.join();
}

void ReadAhead::closed(uint64_t id) {
    auto it = streams_.find(id);
    if (it != streams_.end()) {
        it->second.windows.clear();
        it->second.run = 0;
    }
}

void ReadAhead::end_read(uint64_t id) {
    auto it = streams_.find(id);
    if (it != streams_.end() && it->second.reads > 0) {
        --it->second.reads;
    }
}

Task<Status> ReadAhead::read(std::shared_ptr<Export> e, uint64_t offset, MutBuf buf) {
    if (!options_.enabled) {
        co_return co_await e->backend->read(offset, buf);
    }
    const uint64_t id = e->id;
    const uint64_t n = buf.size();
    std::shared_ptr<Window> hit;
    {
        // No co_await in this block: `s` is a reference into streams_.
        Stream& s = streams_[id];
        const bool in_order = s.next_offset == offset;
        ++s.reads;
        s.next_offset = offset + n;
        s.run = in_order && s.reads == 1 ? s.run + 1 : 0;
        hit = find(s, e->backend->content_generation(), offset, n);
        if (s.run >= kRunToStart && n >= options_.min_request_bytes && n <= kWindowBytes) {
            for (uint64_t k = 1; k <= kDepth; ++k) {
                start(e, &s, offset, offset + k * n, n);
            }
        } else if (hit == nullptr) {
            // Out of order, or several reads in flight: the client does not need them.
            s.windows.clear();
        }
    }
    struct EndRead {
        ReadAhead* self;
        uint64_t id;
        ~EndRead() { self->end_read(id); }
    } end_read_guard{this, id};
    if (hit != nullptr) {
        const bool waits = !hit->filled.is_set();
        if (waits) {
            co_await hit->filled.wait();
        }
        // Checked again after the wait: a write or a drained section may have begun meanwhile,
        // and a failed image serves nothing from memory.
        if (hit->ok && hit->generation == e->backend->content_generation() &&
            !e->backend->fenced() && e->backend->root() != nullptr) {
            std::memcpy(buf.data(), hit->region.base() + (offset - hit->offset), n);
            ++stats_.used;
            stats_.waited += waits ? 1 : 0;
            co_return Status{};
        }
        hit.reset();  // reusable while the disk is read instead
    }
    co_return co_await e->backend->read(offset, buf);
}

std::shared_ptr<ReadAhead::Window> ReadAhead::find(const Stream& s, uint64_t generation,
                                                   uint64_t offset, uint64_t bytes) {
    for (const auto& w : s.windows) {
        if (w->generation == generation && !w->failed() && w->holds(offset, bytes)) {
            return w;
        }
    }
    return nullptr;
}

void ReadAhead::start(const std::shared_ptr<Export>& e, Stream* s, uint64_t reader, uint64_t offset,
                      uint64_t bytes) {
    BlockBackend* backend = e->backend.get();
    const uint64_t size = backend->size();
    const uint64_t generation = backend->content_generation();
    if (offset >= size || backend->writes_in_flight() != 0 || backend->fenced() ||
        backend->quiesced()) {
        return;
    }
    bytes = std::min(bytes, size - offset);
    if (find(*s, generation, offset, bytes) != nullptr) {
        return;  // already under way
    }
    std::shared_ptr<Window> w = take_window(s, reader, generation);
    if (w == nullptr) {
        return;  // every window in use, or no address space: the reads go to the backend
    }
    w->offset = offset;
    w->bytes = bytes;
    w->generation = generation;
    w->ok = false;
    w->filled.reset();
    ++stats_.started;
    scope_.spawn(fill(e, std::move(w)));
}

std::shared_ptr<ReadAhead::Window> ReadAhead::take_window(Stream* s, uint64_t reader,
                                                          uint64_t generation) {
    // A window nothing else holds (use_count 1: the stream's own reference) is neither being
    // filled nor read from; it is done with once it is stale or behind the reader.
    auto done_with = [](const std::shared_ptr<Window>& w, uint64_t at, uint64_t gen) {
        return w.use_count() == 1 &&
               (w->generation != gen || w->failed() || w->offset + w->bytes <= at);
    };
    for (const auto& w : s->windows) {
        if (done_with(w, reader, generation)) {
            return w;
        }
    }
    if (windows() < kMaxWindows) {
        auto w = std::make_shared<Window>(executor_, &live_windows_);
        if (!w->region.ok()) {
            return nullptr;
        }
        s->windows.push_back(w);
        return w;
    }
    for (auto& [id, other] : streams_) {
        if (&other == s) {
            continue;
        }
        // Another stream's reader is elsewhere: any window of it that nothing holds.
        for (auto it = other.windows.begin(); it != other.windows.end(); ++it) {
            if (it->use_count() == 1) {
                std::shared_ptr<Window> w = std::move(*it);
                other.windows.erase(it);
                s->windows.push_back(w);
                return w;
            }
        }
    }
    return nullptr;
}

Task<void> ReadAhead::fill(std::shared_ptr<Export> e, std::shared_ptr<Window> w) {
    // The client's own read goes to the disk first: it is what the client waits for.
    co_await Yield{executor_};
    Status st = co_await e->backend->read_ahead(w->offset, MutBuf(w->region.base(), w->bytes));
    w->ok = st.ok();
    stats_.failed += w->ok ? 0 : 1;
    w->filled.set();
}

}  // namespace imgfs
