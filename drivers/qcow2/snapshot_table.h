// The internal snapshot table: read and validated so that repair can count what snapshots
// reference and so that writes never touch snapshot metadata. (Snapshots are created and
// applied by other tools; imgfs keeps them intact.)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/node.h"
#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

struct SnapshotEntry {
    uint64_t l1_table_offset = 0;
    uint32_t l1_size = 0;
    std::string id;
    std::string name;
    uint64_t disk_size = 0;
};

struct SnapshotTable {
    std::vector<SnapshotEntry> entries;
    uint64_t table_bytes = 0;  // bytes the table occupies at header.snapshots_offset
};

/// Reads header.nb_snapshots entries and checks every L1 table they name lies in the file.
Task<Result<SnapshotTable>> read_snapshot_table(Child* file, const Header* header,
                                                uint64_t file_size, std::string image);

/// Parses a table already in memory (for tests and fuzzing).
Result<SnapshotTable> parse_snapshot_table(ConstBuf bytes, uint32_t count, const Header& header,
                                           uint64_t file_size, const std::string& image);

}  // namespace imgfs::qcow2
