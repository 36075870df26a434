#include "drivers/backing_probe.h"

#include <algorithm>
#include <cstring>
#include <unistd.h>

#include <sys/stat.h>

#include "core/buffer.h"
#include "drivers/qcow2/format.h"
#include "drivers/store.h"

namespace imgfs {

namespace {

// Reads are whole aligned blocks: the descriptor may be O_DIRECT (mount option direct).
constexpr uint64_t kBlockBytes = 4096;

bool has_qcow2_magic(ConstBuf first) {
    return first.size() >= 4 && qcow2::load_be32(first.data() + qcow2::kOffMagic) == qcow2::kMagic;
}

// How many bytes from the start parse_header needs to give the answer it would give on the
// whole header cluster. With a backing name inside the cluster: up to its end (the extension
// area stops at the name). Otherwise the cluster, since the extensions may run to its end. A
// header too broken to say is parsed from the first block, which is enough for its error.
uint64_t header_bytes_wanted(ConstBuf first) {
    if (!has_qcow2_magic(first) || first.size() < qcow2::kOffClusterBits + 4) {
        return first.size();
    }
    uint32_t bits = qcow2::load_be32(first.data() + qcow2::kOffClusterBits);
    if (bits < qcow2::kMinClusterBits || bits > qcow2::kMaxClusterBits) {
        return first.size();
    }
    uint64_t cluster = uint64_t{1} << bits;
    uint64_t off = qcow2::load_be64(first.data() + qcow2::kOffBackingFileOffset);
    uint64_t len = qcow2::load_be32(first.data() + qcow2::kOffBackingFileSize);
    if (off != 0 && off <= cluster && len <= cluster - off) {
        return std::max<uint64_t>(off + len, first.size());
    }
    return cluster;
}

// The backing name a header imgfs cannot use still records (an encrypted image, an external
// data file, an unknown feature): QEMU may open the image, and its backing file is in use all
// the same. Where the header fields are too damaged to say, "".
std::string backing_name_of_unusable_header(ConstBuf head) {
    if (head.size() < qcow2::kOffBackingFileSize + 4) {
        return {};
    }
    const uint64_t off = qcow2::load_be64(head.data() + qcow2::kOffBackingFileOffset);
    const uint64_t len = qcow2::load_be32(head.data() + qcow2::kOffBackingFileSize);
    if (off == 0 || len == 0 || len > qcow2::kMaxBackingNameBytes || off > head.size() ||
        len > head.size() - off) {
        return {};
    }
    std::string name(reinterpret_cast<const char*>(head.data() + off), len);
    return name.substr(0, name.find('\0'));  // cut at a NUL, as QEMU reads it
}

ImageProbe parse_probe(ConstBuf head, FileId id, uint64_t file_bytes, const std::string& file) {
    ImageProbe p;
    p.id = id;
    p.file_bytes = file_bytes;
    if (!has_qcow2_magic(head)) {
        p.format = "raw";
        return p;
    }
    p.format = "qcow2";
    Result<qcow2::Header> h = qcow2::parse_header(head, p.file_bytes, file);
    if (!h) {
        p.header_error = std::move(h).error();
        p.backing = backing_name_of_unusable_header(head);
        return p;
    }
    p.backing = std::move(h->backing_file);
    p.backing_format = std::move(h->backing_format);
    return p;
}

// Reads until `buf` is full or the file ends; the bytes read, errors naming the file.
Result<size_t> read_at(StoreFile* f, MutBuf buf, uint64_t offset, const std::string& file) {
    Result<size_t> got = f->read_at(buf, offset);
    if (!got) {
        return make_error(got.error().errnum, "reading {}", file);
    }
    return got;
}

}  // namespace

Result<ImageProbe> probe_file(StoreFile* f, const std::string& file) {
    TRY_ASSIGN(uint64_t file_bytes, f->size());
    AlignedBuffer buf(kBlockBytes);
    TRY_ASSIGN(size_t got, read_at(f, buf.span(), 0, file));
    uint64_t want = header_bytes_wanted(ConstBuf(buf.data(), got));
    if (want > got && got == kBlockBytes) {
        buf = AlignedBuffer(align_up(want, kBlockBytes));
        TRY_ASSIGN(got, read_at(f, buf.span(), 0, file));
    }
    return parse_probe(ConstBuf(buf.data(), std::min<uint64_t>(got, want)), f->id(), file_bytes,
                       file);
}

Task<Result<ImageProbe>> probe_node(Node* node, FileId id, std::string file) {
    AlignedBuffer buf(kBlockBytes);
    // The node reads zeros past its end; what lies before it is what the file holds.
    uint64_t got = std::min<uint64_t>(node->size(), kBlockBytes);
    if (Status st = co_await node->read(0, buf.span()); !st) {
        co_return make_error(st.error().errnum, "reading {}", file);
    }
    uint64_t want = header_bytes_wanted(ConstBuf(buf.data(), got));
    if (want > got && got == kBlockBytes) {
        buf = AlignedBuffer(align_up(want, kBlockBytes));
        got = std::min<uint64_t>(node->size(), buf.size());
        if (Status st = co_await node->read(0, buf.span()); !st) {
            co_return make_error(st.error().errnum, "reading {}", file);
        }
    }
    co_return parse_probe(ConstBuf(buf.data(), std::min<uint64_t>(got, want)), id, node->size(),
                          file);
}

Result<ImageProbe> probe_image(Store* store, const std::string& file) {
    TRY_ASSIGN(std::unique_ptr<StoreFile> f, store->open(file, true, false));
    return probe_file(f.get(), file);
}

Result<std::string> read_backing_field(StoreFile* f, const std::string& file) {
    AlignedBuffer head(kBlockBytes);
    TRY_ASSIGN(size_t got, read_at(f, head.span(), 0, file));
    if (got < qcow2::kOffBackingFileSize + 4 || !has_qcow2_magic(ConstBuf(head.data(), got))) {
        return std::string();
    }
    uint64_t off = qcow2::load_be64(head.data() + qcow2::kOffBackingFileOffset);
    uint32_t len = qcow2::load_be32(head.data() + qcow2::kOffBackingFileSize);
    if (len == 0) {
        return std::string();
    }
    // No name lies past the largest header cluster; anything else is a damaged header.
    if (len > qcow2::kMaxBackingNameBytes || off > (uint64_t{1} << qcow2::kMaxClusterBits)) {
        return make_error(EINVAL, "{}: the header's backing file field is implausible", file);
    }
    uint64_t start = align_down(off, kBlockBytes);
    AlignedBuffer name(align_up(off + len, kBlockBytes) - start);
    Result<size_t> n = read_at(f, name.span(), start, file);
    if (!n || *n < off + len - start) {
        return make_error(n ? EIO : n.error().errnum, "{}: cannot read the backing file name",
                          file);
    }
    // Cut at a NUL, as the header parser does: some writers count a terminating NUL in the
    // size, and the name must compare equal to the one the open followed.
    const auto* chars = reinterpret_cast<const char*>(name.data() + (off - start));
    return std::string(chars, ::strnlen(chars, len));
}

}  // namespace imgfs
