#include "fuse/cli_store.h"

#include <cstdlib>

#include "drivers/local_store.h"
#include "drivers/rbd/rbd_store.h"
#include "fuse/cli_offline.h"

namespace imgfs::cli {

bool names_pool_image(const std::string& file) {
    return is_rbd_spec(file);
}

namespace {

Result<ImageLocation> locate_pool_image(const std::string& file, EventLoop* loop) {
    const size_t slash = file.rfind('/');
    if (slash == std::string::npos || slash + 1 == file.size()) {
        return make_error(EINVAL, "'{}': a pool image is named rbd:POOL[/NAMESPACE]/IMAGE", file);
    }
    TRY_ASSIGN(RbdLocation where, parse_rbd_location(file.substr(0, slash)));
    RadosOptions options;
    if (const char* conf = std::getenv("CEPH_CONF"); conf != nullptr) {
        options.conf_path = conf;
    }
    if (const char* id = std::getenv("CEPH_ID"); id != nullptr && *id != '\0') {
        options.client_id = id;
    }
    TRY_ASSIGN(std::unique_ptr<RbdStore> pool, RbdStore::open(where, options, loop));
    return ImageLocation{std::move(pool), file.substr(slash + 1), true};
}

}  // namespace

Result<ImageLocation> locate_image(const std::string& file, EventLoop* loop) {
    if (names_pool_image(file)) {
        return locate_pool_image(file, loop);
    }
    Result<std::unique_ptr<LocalDirStore>> dir = LocalDirStore::open_dir(dir_of(file));
    if (!dir) {
        return make_error(dir.error().errnum, "cannot open the directory of {}", file);
    }
    return ImageLocation{std::move(*dir), base_of(file), false};
}

}  // namespace imgfs::cli
