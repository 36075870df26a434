#include "drivers/rbd/ceph_api.h"

#include <cassert>
#include <cerrno>
#include <dlfcn.h>
#include <mutex>
#include <string>

namespace imgfs {

namespace {

struct Loaded {
    CephApi api;
    std::string failure;  // empty: every function was found
};

// Resolves every function of `lib` named in the list into `api`; false (and `failure` set) at
// the first one missing.
template <typename Fn>
bool resolve(void* lib, const char* name, Fn* out, std::string* failure) {
    *out = reinterpret_cast<Fn>(::dlsym(lib, name));
    if (*out == nullptr) {
        *failure = std::string("no ") + name + " in the Ceph client libraries";
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
    if (!l.failure.empty()) {
        return make_error(ELIBACC,
                          "Ceph pools need the Ceph client libraries (Debian: librados2 "
                          "and librbd1): {}",
                          l.failure);
    }
    return &l.api;
}

const CephApi& ceph() {
    const Loaded& l = loaded_once();
    assert(l.failure.empty() && "ceph() before a successful load_ceph_api()");
    return l.api;
}

}  // namespace imgfs
