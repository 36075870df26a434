#include "drivers/qcow2/snapshot_table.h"

#include <algorithm>

namespace imgfs::qcow2 {

Result<SnapshotTable> parse_snapshot_table(ConstBuf b, uint32_t count, const Header& h,
                                           uint64_t file_size, const std::string& image) {
    SnapshotTable table;
    const uint64_t cs = h.cluster_size();
    uint64_t pos = 0;
    for (uint32_t i = 0; i < count; ++i) {
        if (b.size() < 40 || pos > b.size() - 40) {
            return make_error(EINVAL, "{}: snapshot table entry {} runs past the table", image, i);
        }
        const uint8_t* p = b.data() + pos;
        SnapshotEntry e;
        e.l1_table_offset = load_be64(p);
        e.l1_size = load_be32(p + 8);
        uint16_t id_len = load_be16(p + 12);
        uint16_t name_len = load_be16(p + 14);
        uint32_t extra = load_be32(p + 36);
        uint64_t len = 40 + uint64_t{extra} + id_len + name_len;
        if (len > b.size() - pos) {
            return make_error(EINVAL, "{}: snapshot table entry {} runs past the table", image, i);
        }
        if (extra >= 16) {
            e.disk_size = load_be64(p + 48);
        } else {
            e.disk_size = h.size;
        }
        const char* s = reinterpret_cast<const char*>(p + 40 + extra);
        e.id.assign(s, id_len);
        e.name.assign(s + id_len, name_len);
        uint64_t l1_bytes = uint64_t{e.l1_size} * 8;
        if (l1_bytes > kMaxL1Bytes || (e.l1_table_offset & (cs - 1)) != 0 ||
            e.l1_table_offset > file_size || l1_bytes > file_size - e.l1_table_offset ||
            (e.l1_table_offset == 0 && e.l1_size != 0)) {
            return make_error(EINVAL,
                              "{}: snapshot '{}' has an invalid L1 table ({} entries at "
                              "{:#x})",
                              image, e.name, e.l1_size, e.l1_table_offset);
        }
        pos += (len + 7) & ~uint64_t{7};
        table.entries.push_back(std::move(e));
    }
    table.table_bytes = pos;
    return table;
}

Task<Result<SnapshotTable>> read_snapshot_table(Child* file, const Header* header,
                                                uint64_t file_size, std::string image) {
    const Header& h = *header;  // the caller's, alive across this call (it awaits it)
    if (h.nb_snapshots == 0) {
        co_return SnapshotTable{};
    }
    // Entries have variable length: read a little, and more only if the entries need it.
    uint64_t avail = file_size - std::min(file_size, h.snapshots_offset);
    uint64_t limit = std::min<uint64_t>(avail, kMaxSnapshotTableBytes);
    uint64_t want =
        std::min<uint64_t>(limit, std::max<uint64_t>(65536, uint64_t{h.nb_snapshots} * 128));
    for (;;) {
        std::vector<uint8_t> buf(want);
        CO_TRY(co_await file->read(h.snapshots_offset, buf));
        Result<SnapshotTable> t = parse_snapshot_table(buf, h.nb_snapshots, h, file_size, image);
        if (t.ok() || want >= limit) {
            co_return t;
        }
        want = std::min(limit, want * 4);
    }
}

}  // namespace imgfs::qcow2
