// check_qcow2: a `qemu-img check` for images held in memory (see recorder_util.h). It counts the
// references every table makes (header, L1 and L2 tables of the active state and of internal
// snapshots, data and compressed clusters, the refcount structure itself) and compares them with
// the on-disk refcounts, as qemu's qcow2_check_refcounts does.
#include <algorithm>

#include "drivers/qcow2/format.h"
#include "drivers/qcow2/l2_entry.h"
#include "drivers/qcow2/snapshot_table.h"
#include "qcow2/recorder_util.h"

namespace imgfs::test {

namespace {

using qcow2::Geometry;
using qcow2::Header;
using qcow2::L2Entry;

class Checker {
  public:
    explicit Checker(const std::vector<uint8_t>& image) : img_(image) {}
    ImageCheck run();

  private:
    void problem(const std::string& what) {
        if (out_.corruptions++ == 0) {
            out_.first_problem = what;
        }
    }
    // Counts a reference to every cluster of [offset, offset + bytes); false if it lies
    // outside the file (a corruption). Data may: a new cluster at the end is written only as far
    // as the guest wrote (the rest reads as zeros past the end), and whether the data itself
    // survived is what the read-back checks.
    bool add(uint64_t offset, uint64_t bytes, const char* what, bool may_pass_eof = false);
    void walk_l1(uint64_t l1_offset, uint32_t l1_size, bool active);
    void walk_l2(uint64_t l2_offset, bool active);
    [[nodiscard]] uint64_t refcount(uint64_t cluster) const;
    void check_copied(uint64_t offset, bool copied, const char* what);
    void compare();

    const std::vector<uint8_t>& img_;
    Header h_;
    Geometry g_;
    std::vector<uint32_t> refs_;
    std::vector<std::pair<uint64_t, bool>> copied_;  // offset, flag: checked after counting
    ImageCheck out_;
};

bool Checker::add(uint64_t offset, uint64_t bytes, const char* what, bool may_pass_eof) {
    if (bytes == 0) {
        return true;
    }
    if (!may_pass_eof && (offset > img_.size() || bytes > img_.size() - offset)) {
        problem(fmt::format("{} at {:#x} (+{}) lies beyond the end of the file ({})", what, offset,
                            bytes, img_.size()));
        return false;
    }
    for (uint64_t c = offset >> g_.cluster_bits; c <= (offset + bytes - 1) >> g_.cluster_bits;
         ++c) {
        if (c >= refs_.size()) {
            refs_.resize(c + 1, 0);
        }
        ++refs_[c];
    }
    return true;
}

uint64_t Checker::refcount(uint64_t cluster) const {
    uint64_t block = cluster / g_.refblock_entries;
    if (block >= uint64_t{h_.refcount_table_clusters} * g_.cluster_size / 8) {
        return 0;
    }
    uint64_t entry = qcow2::load_be64(img_.data() + h_.refcount_table_offset + block * 8);
    uint64_t off = entry & ~qcow2::kRefTableReservedMask;
    if (off == 0 || off + g_.cluster_size > img_.size()) {
        return 0;
    }
    const uint8_t* b = img_.data() + off;
    uint64_t i = cluster % g_.refblock_entries;
    switch (g_.refcount_order) {
        case 0:
        case 1:
        case 2: {
            uint32_t per_byte = 8 / g_.refcount_bits;
            uint32_t shift = static_cast<uint32_t>(i % per_byte) * g_.refcount_bits;
            return (b[i / per_byte] >> shift) & ((1U << g_.refcount_bits) - 1);
        }
        case 3:
            return b[i];
        case 4:
            return qcow2::load_be16(b + i * 2);
        case 5:
            return qcow2::load_be32(b + i * 4);
        default:
            return qcow2::load_be64(b + i * 8);
    }
}

void Checker::walk_l2(uint64_t l2_offset, bool active) {
    const uint64_t cs = g_.cluster_size;
    if ((l2_offset & (cs - 1)) != 0 || !add(l2_offset, cs, "L2 table")) {
        problem(fmt::format("L2 table at {:#x} is misaligned or beyond the end", l2_offset));
        return;
    }
    const uint8_t* table = img_.data() + l2_offset;
    for (uint64_t i = 0; i < g_.l2_entries; ++i) {
        L2Entry e = qcow2::load_l2(g_, table, i);
        if (e.unallocated()) {
            continue;
        }
        if (const char* p = qcow2::l2_entry_problem(g_, e)) {
            problem(fmt::format("L2 table at {:#x} entry {}: {}", l2_offset, i, p));
            continue;
        }
        if (e.compressed()) {
            qcow2::CompressedRef c = qcow2::decode_compressed(g_, e.word);
            add(c.host_offset, c.bytes, "compressed cluster", true);
        } else if (e.host_offset() != 0) {
            if (add(e.host_offset(), cs, "data cluster", true) && active) {
                copied_.emplace_back(e.host_offset(), e.copied());
            }
        }
    }
}

void Checker::walk_l1(uint64_t l1_offset, uint32_t l1_size, bool active) {
    if (!add(l1_offset, uint64_t{l1_size} * 8, "L1 table")) {
        return;
    }
    for (uint32_t i = 0; i < l1_size; ++i) {
        uint64_t e = qcow2::load_be64(img_.data() + l1_offset + uint64_t{i} * 8);
        if ((e & qcow2::kL1ReservedMask) != 0) {
            problem(fmt::format("L1 entry {} has reserved bits set: {:#x}", i, e));
        }
        uint64_t off = e & qcow2::kOffsetMask;
        if (off == 0) {
            continue;
        }
        if (active) {
            copied_.emplace_back(off, (e & qcow2::kOflagCopied) != 0);
        }
        walk_l2(off, active);
    }
}

void Checker::check_copied(uint64_t offset, bool copied, const char* what) {
    if (copied != (refcount(offset >> g_.cluster_bits) == 1)) {
        problem(fmt::format("{} at {:#x}: COPIED is {} but the refcount is {}", what, offset,
                            copied, refcount(offset >> g_.cluster_bits)));
    }
}

void Checker::compare() {
    const uint64_t file_clusters = (img_.size() + g_.cluster_size - 1) >> g_.cluster_bits;
    const uint64_t n = std::max<uint64_t>(file_clusters, refs_.size());
    for (uint64_t c = 0; c < n; ++c) {
        uint64_t want = c < refs_.size() ? refs_[c] : 0;
        uint64_t have = refcount(c);
        if (have < want) {
            problem(fmt::format("cluster {} has refcount {} but {} references", c, have, want));
        } else if (have > want) {
            ++out_.leaks;
        }
    }
    for (const auto& [off, flag] : copied_) {
        check_copied(off, flag, "table entry");
    }
}

ImageCheck Checker::run() {
    ConstBuf head(img_.data(), std::min<size_t>(img_.size(), 2U << 20));
    Result<Header> h = qcow2::parse_header(head, img_.size(), "image");
    if (!h) {
        problem("header: " + h.error().message());
        return out_;
    }
    h_ = std::move(*h);
    g_ = Geometry::from(h_);
    out_.dirty = (h_.incompatible & qcow2::kIncompatDirty) != 0;
    if ((h_.incompatible & qcow2::kIncompatCorrupt) != 0) {
        problem("the corrupt bit is set");
    }
    add(0, g_.cluster_size, "header");
    const uint64_t rt_bytes = uint64_t{h_.refcount_table_clusters} * g_.cluster_size;
    if (!add(h_.refcount_table_offset, rt_bytes, "refcount table")) {
        return out_;
    }
    for (uint64_t i = 0; i < rt_bytes / 8; ++i) {
        uint64_t e = qcow2::load_be64(img_.data() + h_.refcount_table_offset + i * 8);
        if ((e & qcow2::kRefTableReservedMask) != 0 || (e & (g_.cluster_size - 1)) != 0) {
            problem(fmt::format("refcount table entry {} is misaligned: {:#x}", i, e));
        } else if (e != 0) {
            add(e, g_.cluster_size, "refcount block");
        }
    }
    walk_l1(h_.l1_table_offset, h_.l1_size, true);
    if (h_.nb_snapshots != 0 && h_.snapshots_offset < img_.size()) {
        ConstBuf rest(img_.data() + h_.snapshots_offset, img_.size() - h_.snapshots_offset);
        Result<qcow2::SnapshotTable> t =
            qcow2::parse_snapshot_table(rest, h_.nb_snapshots, h_, img_.size(), "image");
        if (!t) {
            problem("snapshot table: " + t.error().message());
        } else {
            // The last entry's padding to 8 bytes need not be in the file (qemu-img ends
            // the file right after the entry).
            uint64_t bytes = t->table_bytes;
            uint64_t in_file = img_.size() - h_.snapshots_offset;
            if (bytes > in_file && bytes - in_file < 8) {
                bytes = in_file;
            }
            add(h_.snapshots_offset, bytes, "snapshot table");
            for (const qcow2::SnapshotEntry& s : t->entries) {
                walk_l1(s.l1_table_offset, s.l1_size, false);
            }
        }
    }
    if (!out_.dirty) {
        compare();  // with lazy refcounts a dirty image's refcounts may lag: the open repairs
    }
    return out_;
}

}  // namespace

ImageCheck check_qcow2(const std::vector<uint8_t>& image) {
    return Checker(image).run();
}

}  // namespace imgfs::test
