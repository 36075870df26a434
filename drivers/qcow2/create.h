// Creation of new qcow2 images (imgfs create, snapshot overlays).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/event_loop.h"
#include "core/node.h"
#include "core/result.h"
#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

struct CreateOptions {
    uint64_t size = 0;
    uint32_t cluster_size = 65536;
    uint32_t version = 3;
    uint32_t refcount_bits = 16;
    bool extended_l2 = false;
    bool lazy_refcounts = false;
    CompressionType compression_type = CompressionType::kZlib;  // zstd needs version 3
    std::string backing_file;                   // as recorded in the header; empty: none
    std::optional<std::string> backing_format;  // "qcow2" or "raw"
};

/// Checks the options the way qemu-img would refuse them.
Status validate_create_options(const CreateOptions& o);

/// The complete initial content of a new image: header, refcount table and blocks, L1 table.
Result<std::vector<uint8_t>> build_new_image(const CreateOptions& o);

/// Writes a new image into the empty protocol node `file` (a new file of a store) and makes it
/// durable.
Task<Status> create_image(Node* file, CreateOptions options);

/// The same with plain syscalls, for command-line use outside an event loop.
Status create_image_sync(int fd, const CreateOptions& options);

}  // namespace imgfs::qcow2
