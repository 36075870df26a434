// Offline: an event loop, a graph and one open chain, for the commands that work on image files
// without a mount (info, io).
#pragma once

#include <cstdio>
#include <fcntl.h>
#include <libgen.h>
#include <memory>
#include <string>

#include "core/backend.h"
#include "core/event_loop.h"
#include "core/graph.h"
#include "core/log.h"
#include "core/transaction.h"
#include "drivers/image_chain.h"
#include "drivers/local_store.h"
#include "fuse/cli_store.h"

namespace imgfs::cli {

inline std::string dir_of(const std::string& path) {
    std::string copy = path;
    return ::dirname(copy.data());
}

inline std::string base_of(const std::string& path) {
    std::string copy = path;
    return ::basename(copy.data());
}

// An event loop and graph for offline commands. Members are destroyed in reverse order: the
// chain's nodes go before the graph, the graph before the loop.
struct Offline {
    Offline() = default;
    Offline(const Offline&) = delete;
    Offline& operator=(const Offline&) = delete;
    StderrLogger log;
    std::unique_ptr<EventLoop> loop;
    Graph graph;
    Chain chain;
    std::unique_ptr<BlockBackend> user;
    std::unique_ptr<Store> dir;  // the image's directory or pool

    ~Offline() {
        user.reset();
        chain.layers.clear();
    }
    NodeEnv env() { return NodeEnv{loop.get(), &log, &graph}; }

    Status open(const std::string& file, bool read_only) {
        auto l = EventLoop::create();
        if (!l) {
            return std::move(l).error();
        }
        loop = std::move(*l);
        TRY_ASSIGN(ImageLocation where, locate_image(file, loop.get()));
        dir = std::move(where.store);
        ChainOptions o;
        o.read_only = read_only;
        TRY_ASSIGN(chain, sync_wait(loop.get(), open_chain(env(), dir.get(), where.name, o)));
        user = std::make_unique<BlockBackend>(loop.get(), "cli");
        Transaction tx(&graph);
        Perms perm = perm::kConsistentRead | (read_only ? 0 : perm::kWrite | perm::kResize);
        user->attach(&tx, chain.top(), perm, perm::kConsistentRead | perm::kWriteUnchanged);
        return tx.commit();
    }
    Status close() {
        if (user && user->root() != nullptr) {
            Transaction tx(&graph);
            tx.detach(user->root());
            // The chain is closed below whatever this says; the caller sees the close's status.
            if (Status detached = tx.commit(); !detached) {
                std::fprintf(stderr, "imgfs: warning: detaching the image: %s\n",
                             detached.error().message().c_str());
            }
        }
        return chain.layers.empty() ? Status{} : sync_wait(loop.get(), close_chain(&chain));
    }
};

}  // namespace imgfs::cli
