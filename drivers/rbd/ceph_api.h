// CephApi: the librados and librbd functions imgfs calls, loaded when the first pool is
// opened rather than when the daemon starts.
//
// Why not link them: loading Ceph's client libraries runs their initialisers and relocations,
// which kept about 13 MiB resident in every daemon (librbd, libceph-common, librados and what
// they pull in), pools or not, against a peak of 43 MiB for a 1M sequential write to a local
// directory. A mount of a directory never loads them now; `imgfs mount rbd:...` loads them once
// and they stay loaded for the life of the process (librados keeps threads and handlers that a
// dlclose would pull from under them).
//
// The table is the one piece of process-wide state in drivers/: it stands for the dynamic
// linker's own, is written once under std::call_once and never changes after.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "core/result.h"

namespace imgfs {

// clang-format off
#define IMGFS_RADOS_FUNCTIONS(X) \
    X(rados_buffer_free) \
    X(rados_cluster_stat) \
    X(rados_conf_parse_env) \
    X(rados_conf_read_file) \
    X(rados_conf_set) \
    X(rados_connect) \
    X(rados_create2) \
    X(rados_get_instance_id) \
    X(rados_getaddrs) \
    X(rados_ioctx_create) \
    X(rados_ioctx_destroy) \
    X(rados_ioctx_set_namespace) \
    X(rados_shutdown)

#define IMGFS_RBD_FUNCTIONS(X) \
    X(rbd_aio_create_completion) \
    X(rbd_aio_discard) \
    X(rbd_aio_flush) \
    X(rbd_aio_get_arg) \
    X(rbd_aio_get_return_value) \
    X(rbd_aio_read) \
    X(rbd_aio_release) \
    X(rbd_aio_write) \
    X(rbd_aio_write_zeroes) \
    X(rbd_close) \
    X(rbd_config_image_list) \
    X(rbd_config_image_list_cleanup) \
    X(rbd_create4) \
    X(rbd_diff_iterate2) \
    X(rbd_get_create_timestamp) \
    X(rbd_get_features) \
    X(rbd_get_id) \
    X(rbd_get_size) \
    X(rbd_image_options_create) \
    X(rbd_image_options_destroy) \
    X(rbd_image_options_set_uint64) \
    X(rbd_image_spec_list_cleanup) \
    X(rbd_is_exclusive_lock_owner) \
    X(rbd_list2) \
    X(rbd_lock_acquire) \
    X(rbd_lock_get_owners) \
    X(rbd_lock_get_owners_cleanup) \
    X(rbd_lock_release) \
    X(rbd_open) \
    X(rbd_open_read_only) \
    X(rbd_poll_io_events) \
    X(rbd_read) \
    X(rbd_remove) \
    X(rbd_rename) \
    X(rbd_resize2) \
    X(rbd_set_image_notification) \
    X(rbd_watchers_list) \
    X(rbd_watchers_list_cleanup)
// clang-format on

struct CephApi {
#define IMGFS_CEPH_POINTER(name) decltype(&::name) name = nullptr;
    IMGFS_RADOS_FUNCTIONS(IMGFS_CEPH_POINTER)
    IMGFS_RBD_FUNCTIONS(IMGFS_CEPH_POINTER)
#undef IMGFS_CEPH_POINTER
};

/// The oldest Ceph release whose client libraries have every function in the lists (the
/// package recommends it; Debian 12 has 16.2).
inline constexpr const char* kMinimumCephRelease = "16.2";

/// Loads librados.so.2 and librbd.so.1 (once; later calls return the first outcome). ELIBACC
/// naming the missing library and the Debian packages that hold them if either cannot be
/// loaded, or saying they are too old if one lacks a function.
Result<const CephApi*> load_ceph_api();

/// The table; only after load_ceph_api() succeeded (RadosCluster::connect calls it first, and
/// every other Ceph call goes through a connected cluster).
const CephApi& ceph();

}  // namespace imgfs
