// Probing an image file before it is opened: its identity, its format by content (qcow2 or
// raw) and, for qcow2, the backing file it records, taken from a header validated by the same
// parser the qcow2 driver opens images with (qcow2::parse_header). One probe for everything
// that walks chains: the scan (blocking, on the offload thread) and open_chain (on the event
// loop, through the layer's protocol node). It reads the first block, then at most the header
// cluster: up to the end of the backing name when there is one, else the cluster (the extension
// area can run to its end), never more, so a large file or a hostile header costs one or two small
// reads.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "core/event_loop.h"
#include "core/result.h"
#include "core/task.h"
#include "drivers/chain_walk.h"
#include "drivers/store.h"

namespace imgfs {

struct ImageProbe {
    FileId id{};
    uint64_t file_bytes = 0;
    /// By content: "qcow2" if the file starts with the qcow2 magic, else "raw". A file
    /// recorded as raw is raw whatever it holds, so the caller decides what this means.
    std::string format;
    /// The backing file name a qcow2 header records ("" for none and for raw). Also set for a
    /// header imgfs cannot use (header_error), where its fields still name one: that file is
    /// in use by the image all the same.
    std::string backing;
    std::optional<std::string> backing_format;
    /// Set if the file starts with the qcow2 magic but its header is invalid: why. Not an error
    /// of the probe, because the same bytes are a valid raw image when recorded as raw.
    std::optional<Error> header_error;
};

/// Blocking (for the offload thread): probes the file `file` of `store` (opened read-only by
/// the store, so it may not leave it).
Result<ImageProbe> probe_image(Store* store, const std::string& file);

/// Blocking: probes an open file of a store (one open for direct I/O too).
Result<ImageProbe> probe_file(StoreFile* f, const std::string& file);

/// On the event loop: the same probe with its reads through the protocol node the file became
/// (`id` is the file's identity, StoreFile::id()).
Task<Result<ImageProbe>> probe_node(Node* node, FileId id, std::string file);

/// Blocking: only the backing-name field of an image that is open and being written. Unlike
/// the probe it validates nothing else: the rest of the header may be changing under the event
/// loop's writes, while this field changes only in chain edits, which the caller excludes.
Result<std::string> read_backing_field(StoreFile* f, const std::string& file);

}  // namespace imgfs
