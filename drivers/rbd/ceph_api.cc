#include "drivers/rbd/ceph_api.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <mutex>
#include <string>

namespace imgfs {

namespace {

struct Loaded {
    CephApi api;
    std::string failure;   // empty: every function was found
    bool too_old = false;  // the libraries loaded but lack a function
};

// Resolves `name` in `lib` into `out`; false (and `failure` set) if it is not there.
template <typename Fn>
bool resolve(void* lib, const char* name, Fn* out, std::string* failure) {
    *out = reinterpret_cast<Fn>(::dlsym(lib, name));
    if (*out == nullptr) {
        *failure = std::string("they lack ") + name;
        return false;
    }
    return true;
}

void load(Loaded* loaded) {
    // librbd needs librados, which it names itself; each is opened by the soname the Debian
    // packages librados2 and librbd1 install. Never closed (see the header).
    void* rados = ::dlopen("librados.so.2", RTLD_NOW | RTLD_LOCAL);
    void* rbd = rados != nullptr ? ::dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL) : nullptr;
    if (rbd == nullptr) {
        const char* why = ::dlerror();
        loaded->failure = why != nullptr ? why : "cannot load librados.so.2 and librbd.so.1";
        return;
    }
    std::string* failure = &loaded->failure;
    CephApi* api = &loaded->api;
    bool ok = true;
#define IMGFS_RESOLVE_RADOS(name) ok = ok && resolve(rados, #name, &api->name, failure);
#define IMGFS_RESOLVE_RBD(name) ok = ok && resolve(rbd, #name, &api->name, failure);
    IMGFS_RADOS_FUNCTIONS(IMGFS_RESOLVE_RADOS)
    IMGFS_RBD_FUNCTIONS(IMGFS_RESOLVE_RBD)
#undef IMGFS_RESOLVE_RADOS
#undef IMGFS_RESOLVE_RBD
    loaded->too_old = !ok;
}

Loaded& loaded_once() {
    static std::once_flag once;
    static Loaded loaded;
    std::call_once(once, [] { load(&loaded); });
    return loaded;
}

}  // namespace

Result<const CephApi*> load_ceph_api() {
    const Loaded& l = loaded_once();
    if (l.too_old) {
        return make_error(ELIBACC,
                          "Ceph pools need the Ceph client libraries {} or later (Debian: "
                          "librados2 and librbd1); the ones installed are older: {}",
                          kMinimumCephRelease, l.failure);
    }
    if (!l.failure.empty()) {
        return make_error(ELIBACC,
                          "Ceph pools need the Ceph client libraries (Debian: librados2 and "
                          "librbd1, {} or later): {}",
                          kMinimumCephRelease, l.failure);
    }
    return &l.api;
}

const CephApi& ceph() {
    const Loaded& l = loaded_once();
    if (!l.failure.empty()) {
        // A bug, in every build type: a Ceph call that did not come through a connected
        // cluster (RadosCluster::connect loads the libraries first).
        std::fprintf(stderr, "imgfs: a Ceph call before the libraries were loaded: %s\n",
                     l.failure.c_str());
        std::abort();
    }
    return l.api;
}

}  // namespace imgfs
