#include "fuse/read_ahead.h"

#include <cstring>

#include <sys/mman.h>

#include "core/wait_queue.h"
#include "fuse/huge_aligned_region.h"

namespace imgfs {

struct ReadAhead::Window {
    Window(Executor* executor) : region(kWindowBytes), filled(executor) {
        if (region.ok()) {
            // A huge page where the kernel has one: reads ahead are large (see the header).
            ::madvise(region.base(), kWindowBytes, MADV_HUGEPAGE);
        }
    }
    Window(const Window&) = delete;
    Window& operator=(const Window&) = delete;

    [[nodiscard]] bool holds(uint64_t off, uint64_t n) const {
        return off >= offset && off - offset <= bytes && n <= bytes - (off - offset);
    }

    HugeAlignedRegion region;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    uint64_t generation = 0;  // the backend's content generation when it was started
    bool ok = false;          // filled without error
    AsyncEvent filled;
};

ReadAhead::ReadAhead(Executor* executor, ReadAheadOptions options)
    : executor_(executor), options_(options), scope_(executor) {}

ReadAhead::~ReadAhead() = default;

size_t ReadAhead::windows() const {
    size_t n = 0;
    for (const auto& [id, s] : streams_) {
        n += s.windows.size();
    }
    return n;
}

Task<void> ReadAhead::join() {
    co_await scope_.join();
}

void ReadAhead::finish(uint64_t id) {
    auto it = streams_.find(id);
    if (it != streams_.end() && it->second.reads > 0) {
        --it->second.reads;
    }
}

Task<Status> ReadAhead::read(std::shared_ptr<Export> e, uint64_t offset, MutBuf buf) {
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
    struct Finish {
        ReadAhead* self;
        uint64_t id;
        ~Finish() { self->finish(id); }
    } finish_read{this, id};
    if (hit != nullptr) {
        if (!hit->filled.is_set()) {
            ++stats_.waited;
            co_await hit->filled.wait();
        }
        // Checked again after the wait: a write or a drained section may have begun meanwhile,
        // and a failed image serves nothing from memory.
        if (hit->ok && hit->generation == e->backend->content_generation() &&
            !e->backend->fenced() && e->backend->root() != nullptr) {
            std::memcpy(buf.data(), hit->region.base() + (offset - hit->offset), n);
            ++stats_.used;
            co_return Status{};
        }
    }
    co_return co_await e->backend->read(offset, buf);
}

std::shared_ptr<ReadAhead::Window> ReadAhead::find(const Stream& s, uint64_t generation,
                                                   uint64_t offset, uint64_t bytes) {
    for (const auto& w : s.windows) {
        if (w->generation == generation && w->holds(offset, bytes)) {
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
    scope_.spawn(fill(executor_, e, std::move(w)));
}

std::shared_ptr<ReadAhead::Window> ReadAhead::take_window(Stream* s, uint64_t reader,
                                                          uint64_t generation) {
    // A window nothing else holds (use_count 1: the stream's own reference) is neither being
    // filled nor read from; it is done with once it is stale or behind the reader.
    auto done_with = [](const std::shared_ptr<Window>& w, uint64_t at, uint64_t gen) {
        return w.use_count() == 1 && (w->generation != gen || w->offset + w->bytes <= at);
    };
    for (const auto& w : s->windows) {
        if (done_with(w, reader, generation)) {
            return w;
        }
    }
    if (windows() < kMaxWindows) {
        auto w = std::make_shared<Window>(executor_);
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

Task<void> ReadAhead::fill(Executor* executor, std::shared_ptr<Export> e,
                           std::shared_ptr<Window> w) {
    // The client's own read goes to the disk first: it is what the client waits for.
    co_await Yield{executor};
    Status st = co_await e->backend->read_ahead(w->offset, MutBuf(w->region.base(), w->bytes));
    w->ok = st.ok();
    w->filled.set();
}

}  // namespace imgfs
