// Where an image named on the command line lives (imgfs create, info, io): a path's directory,
// or a Ceph pool for rbd:POOL[/NAMESPACE]/IMAGE.
#pragma once

#include <memory>
#include <string>

#include "core/event_loop.h"
#include "core/result.h"
#include "drivers/store.h"

namespace imgfs::cli {

struct ImageLocation {
    std::unique_ptr<Store> store;  // the directory or the pool's namespace
    std::string name;              // the image's name in it
    bool in_pool = false;
};

/// True for rbd:... names (a pool image, not a path).
bool names_pool_image(const std::string& file);

/// Opens the store that holds `file`: the directory of a path, or for
/// rbd:POOL[/NAMESPACE]/IMAGE the pool's namespace, connecting with $CEPH_CONF (else
/// /etc/ceph/ceph.conf) as client $CEPH_ID (else admin). `loop` is where the pool resumes its
/// callers; it must outlive the store.
Result<ImageLocation> locate_image(const std::string& file, EventLoop* loop);

}  // namespace imgfs::cli
