// qcow2 header parsing, validation and serialisation, on hand-built byte-level headers: every
// field of the fixtures is written explicitly (with the spec's name beside it), so a test reads
// as "this header, with this one field changed, is refused with this error".
#include "drivers/qcow2/format.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "drivers/qcow2/create.h"

namespace imgfs {
namespace {

using qcow2::CompressionType;
using qcow2::Geometry;
using qcow2::Header;
using qcow2::load_be32;
using qcow2::load_be64;
using qcow2::store_be32;
using qcow2::store_be64;

constexpr uint32_t kClusterBits = 16;
constexpr uint64_t kCluster = 1ULL << kClusterBits;
// The fixtures describe a 4-cluster file: header, refcount table, refcount block, L1 table.
constexpr uint64_t kFileSize = 4 * kCluster;
constexpr uint64_t kRefcountTableOffset = 1 * kCluster;
constexpr uint64_t kL1Offset = 3 * kCluster;
constexpr uint64_t kVirtualSize = 1ULL << 30;  // 1 GiB: two L2 tables of 512 MiB each
const std::string kImage = "vm1.qcow2";

// Field offsets (docs/interop/qcow2.txt, "Header").
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffBackingOffset = 8;
constexpr size_t kOffBackingSize = 16;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffSize = 24;
constexpr size_t kOffCryptMethod = 32;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1Offset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffRefcountTableClusters = 56;
constexpr size_t kOffNbSnapshots = 60;
constexpr size_t kOffSnapshotsOffset = 64;
constexpr size_t kOffIncompatible = 72;
constexpr size_t kOffCompatible = 80;
constexpr size_t kOffAutoclear = 88;
constexpr size_t kOffRefcountOrder = 96;
constexpr size_t kOffHeaderLength = 100;
constexpr size_t kOffCompressionType = 104;

// The first cluster of a version 2 image: the 72-byte header, then (all zero) the end of the
// header extensions.
std::vector<uint8_t> v2_cluster() {
    std::vector<uint8_t> c(kCluster, 0);
    uint8_t* p = c.data();
    store_be32(p + kOffMagic, qcow2::kMagic);                       // magic: "QFI\xfb"
    store_be32(p + kOffVersion, 2);                                 // version
    store_be64(p + kOffBackingOffset, 0);                           // backing_file_offset: none
    store_be32(p + kOffBackingSize, 0);                             // backing_file_size
    store_be32(p + kOffClusterBits, kClusterBits);                  // cluster_bits: 64 KiB clusters
    store_be64(p + kOffSize, kVirtualSize);                         // size: virtual disk bytes
    store_be32(p + kOffCryptMethod, 0);                             // crypt_method: none
    store_be32(p + kOffL1Size, 2);                                  // l1_size: entries
    store_be64(p + kOffL1Offset, kL1Offset);                        // l1_table_offset
    store_be64(p + kOffRefcountTableOffset, kRefcountTableOffset);  // refcount_table_offset
    store_be32(p + kOffRefcountTableClusters, 1);                   // refcount_table_clusters
    store_be32(p + kOffNbSnapshots, 0);                             // nb_snapshots
    store_be64(p + kOffSnapshotsOffset, 0);                         // snapshots_offset
    // 72..79: header extension type 0 (end), length 0 -- already zero.
    return c;
}

// The first cluster of a version 3 image: the 112-byte header (through compression_type,
// padded to a multiple of 8), then (all zero) the end of the header extensions.
std::vector<uint8_t> v3_cluster() {
    std::vector<uint8_t> c(kCluster, 0);
    uint8_t* p = c.data();
    store_be32(p + kOffMagic, qcow2::kMagic);                       // magic: "QFI\xfb"
    store_be32(p + kOffVersion, 3);                                 // version
    store_be64(p + kOffBackingOffset, 0);                           // backing_file_offset: none
    store_be32(p + kOffBackingSize, 0);                             // backing_file_size
    store_be32(p + kOffClusterBits, kClusterBits);                  // cluster_bits: 64 KiB clusters
    store_be64(p + kOffSize, kVirtualSize);                         // size: virtual disk bytes
    store_be32(p + kOffCryptMethod, 0);                             // crypt_method: none
    store_be32(p + kOffL1Size, 2);                                  // l1_size: entries
    store_be64(p + kOffL1Offset, kL1Offset);                        // l1_table_offset
    store_be64(p + kOffRefcountTableOffset, kRefcountTableOffset);  // refcount_table_offset
    store_be32(p + kOffRefcountTableClusters, 1);                   // refcount_table_clusters
    store_be32(p + kOffNbSnapshots, 0);                             // nb_snapshots
    store_be64(p + kOffSnapshotsOffset, 0);                         // snapshots_offset
    store_be64(p + kOffIncompatible, 0);                            // incompatible_features
    store_be64(p + kOffCompatible, 0);                              // compatible_features
    store_be64(p + kOffAutoclear, 0);                               // autoclear_features
    store_be32(p + kOffRefcountOrder, 4);   // refcount_order: 16-bit refcounts
    store_be32(p + kOffHeaderLength, 112);  // header_length
    p[kOffCompressionType] = 0;             // compression_type: zlib
    // 105..111: padding to a multiple of 8.
    // 112..119: header extension type 0 (end), length 0 -- already zero.
    return c;
}

// Writes a header extension at `pos`; returns where the next one goes (data padded to 8).
size_t put_ext(std::vector<uint8_t>* c, size_t pos, uint32_t type, const std::vector<uint8_t>& d) {
    store_be32(c->data() + pos, type);
    store_be32(c->data() + pos + 4, static_cast<uint32_t>(d.size()));
    std::memcpy(c->data() + pos + 8, d.data(), d.size());
    return pos + 8 + ((d.size() + 7) & ~size_t{7});
}

std::vector<uint8_t> bytes(const std::string& s) {
    return {s.begin(), s.end()};
}

// One 48-byte feature name table entry.
std::vector<uint8_t> feature(uint8_t type, uint8_t bit, const std::string& name) {
    std::vector<uint8_t> e(48, 0);
    e[0] = type;
    e[1] = bit;
    std::memcpy(e.data() + 2, name.data(), name.size());
    return e;
}

// Stores a backing file name at `offset` and points the header at it.
void put_backing(std::vector<uint8_t>* c, uint64_t offset, const std::string& name) {
    store_be64(c->data() + kOffBackingOffset, offset);
    store_be32(c->data() + kOffBackingSize, static_cast<uint32_t>(name.size()));
    std::memcpy(c->data() + offset, name.data(), name.size());
}

Result<Header> parse(const std::vector<uint8_t>& c, uint64_t file_size = kFileSize) {
    return qcow2::parse_header(ConstBuf(c), file_size, kImage);
}

// The parse failed with `errnum` and a message naming the image and containing `what`.
::testing::AssertionResult refused(const Result<Header>& r, int errnum, const std::string& what) {
    if (r.ok()) {
        return ::testing::AssertionFailure()
               << "parsed, expected an error about \"" << what << "\"";
    }
    const Error& e = r.error();
    if (e.errnum != errnum) {
        return ::testing::AssertionFailure()
               << "errnum " << e.errnum << ", expected " << errnum << " (" << e.context << ")";
    }
    if (e.context.find(what) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "message \"" << e.context << "\" does not mention \"" << what << "\"";
    }
    if (e.context.find(kImage) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "message \"" << e.context << "\" does not name the image";
    }
    return ::testing::AssertionSuccess();
}

std::vector<uint8_t> serialize(Header h) {
    auto out = qcow2::serialize_header(&h);
    EXPECT_TRUE(out.ok()) << out.error().message();
    return out.ok() ? *out : std::vector<uint8_t>{};
}

// Pads a serialised header to a whole cluster, as it would be on disk.
std::vector<uint8_t> as_cluster(std::vector<uint8_t> v, uint64_t cluster = kCluster) {
    v.resize(cluster, 0);
    return v;
}

// ---- valid headers ----

TEST(Qcow2Format, ParsesVersion3Header) {
    auto r = parse(v3_cluster());
    ASSERT_TRUE(r.ok()) << r.error().message();
    const Header& h = *r;
    EXPECT_EQ(h.version, 3U);
    EXPECT_EQ(h.cluster_bits, kClusterBits);
    EXPECT_EQ(h.cluster_size(), kCluster);
    EXPECT_EQ(h.size, kVirtualSize);
    EXPECT_EQ(h.crypt_method, 0U);
    EXPECT_EQ(h.l1_size, 2U);
    EXPECT_EQ(h.l1_table_offset, kL1Offset);
    EXPECT_EQ(h.refcount_table_offset, kRefcountTableOffset);
    EXPECT_EQ(h.refcount_table_clusters, 1U);
    EXPECT_EQ(h.nb_snapshots, 0U);
    EXPECT_EQ(h.incompatible, 0U);
    EXPECT_EQ(h.compatible, 0U);
    EXPECT_EQ(h.autoclear, 0U);
    EXPECT_EQ(h.refcount_order, 4U);
    EXPECT_EQ(h.header_length, 112U);
    EXPECT_EQ(h.compression_type, CompressionType::kZlib);
    EXPECT_EQ(h.unknown_fields, std::vector<uint8_t>(7, 0));  // the padding 105..111
    EXPECT_TRUE(h.backing_file.empty());
    EXPECT_FALSE(h.backing_format.has_value());
    EXPECT_TRUE(h.feature_names.empty());
    EXPECT_TRUE(h.other_extensions.empty());
    EXPECT_FALSE(h.extended_l2());
}

TEST(Qcow2Format, ParsesVersion2Header) {
    auto r = parse(v2_cluster());
    ASSERT_TRUE(r.ok()) << r.error().message();
    const Header& h = *r;
    EXPECT_EQ(h.version, 2U);
    EXPECT_EQ(h.cluster_bits, kClusterBits);
    EXPECT_EQ(h.size, kVirtualSize);
    EXPECT_EQ(h.l1_size, 2U);
    EXPECT_EQ(h.l1_table_offset, kL1Offset);
    EXPECT_EQ(h.refcount_table_offset, kRefcountTableOffset);
    // Version 2 implies what version 3 spells out.
    EXPECT_EQ(h.incompatible, 0U);
    EXPECT_EQ(h.compatible, 0U);
    EXPECT_EQ(h.autoclear, 0U);
    EXPECT_EQ(h.refcount_order, 4U);
    EXPECT_EQ(h.header_length, qcow2::kV2HeaderBytes);
    EXPECT_EQ(h.compression_type, CompressionType::kZlib);
}

TEST(Qcow2Format, ParsesVersion3HeaderWithoutCompressionTypeField) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffHeaderLength, 104);  // ends before compression_type
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->header_length, 104U);
    EXPECT_EQ(r->compression_type, CompressionType::kZlib);
    EXPECT_TRUE(r->unknown_fields.empty());
}

TEST(Qcow2Format, ParsesAFileShorterThanACluster) {
    auto c = v3_cluster();
    c.resize(512);  // the whole file is one sector: the tables do not fit, but the header does
    auto r = parse(c, 512);
    EXPECT_TRUE(refused(r, EINVAL, "beyond the end of the file"));
    c.resize(100);  // not even the fixed v3 fields
    EXPECT_TRUE(refused(parse(c, 100), EINVAL, "too short"));
}

TEST(Qcow2Format, KnownIncompatibleBitsAreAccepted) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, qcow2::kIncompatDirty | qcow2::kIncompatCorrupt);
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->incompatible, qcow2::kIncompatDirty | qcow2::kIncompatCorrupt);
    EXPECT_EQ(r->describe_incompatible(r->incompatible), "dirty bit, corrupt bit");
}

TEST(Qcow2Format, ZstdCompressionWithItsFeatureBit) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, qcow2::kIncompatCompression);
    c[kOffCompressionType] = 1;  // zstd
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->compression_type, CompressionType::kZstd);
}

// ---- serialisation ----

TEST(Qcow2Format, SerializingAParsedHeaderGivesTheSameBytes) {
    auto c = v3_cluster();
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    auto out = serialize(*r);
    ASSERT_EQ(out.size(), 120U);  // 112-byte header + end-of-extensions marker
    EXPECT_EQ(out, std::vector<uint8_t>(c.begin(), c.begin() + 120));

    auto c2 = v2_cluster();
    auto r2 = parse(c2);
    ASSERT_TRUE(r2.ok()) << r2.error().message();
    auto out2 = serialize(*r2);
    ASSERT_EQ(out2.size(), 80U);  // 72-byte header + end-of-extensions marker
    EXPECT_EQ(out2, std::vector<uint8_t>(c2.begin(), c2.begin() + 80));
}

TEST(Qcow2Format, RoundTripKeepsEveryField) {
    Header h;
    h.version = 3;
    h.cluster_bits = 16;
    h.size = kVirtualSize;
    h.l1_size = 2;
    h.l1_table_offset = kL1Offset;
    h.refcount_table_offset = kRefcountTableOffset;
    h.refcount_table_clusters = 1;
    h.incompatible = qcow2::kIncompatDirty | qcow2::kIncompatCompression;
    h.compatible = qcow2::kCompatLazyRefcounts | (1ULL << 40);
    h.autoclear = 1ULL << 1;
    h.refcount_order = 5;
    h.header_length = 120;  // 8 bytes of fields we do not know beyond the padding
    h.compression_type = CompressionType::kZstd;
    h.unknown_fields = {0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    h.backing_file = "base.qcow2";
    h.backing_format = "qcow2";
    h.feature_names.push_back({0, 0, "dirty bit"});
    h.feature_names.push_back({1, 0, "lazy refcounts"});
    h.other_extensions.push_back({0x12345678, {1, 2, 3}});

    Header copy = h;
    auto out = qcow2::serialize_header(&copy);
    ASSERT_TRUE(out.ok()) << out.error().message();
    // The backing name goes last, after the extensions; the header records where.
    EXPECT_EQ(copy.backing_file_size, 10U);
    EXPECT_EQ(copy.backing_file_offset + copy.backing_file_size, out->size());
    EXPECT_EQ(load_be64(out->data() + kOffBackingOffset), copy.backing_file_offset);
    EXPECT_EQ(load_be32(out->data() + kOffHeaderLength), 120U);

    auto r = parse(as_cluster(*out));
    ASSERT_TRUE(r.ok()) << r.error().message();
    const Header& p = *r;
    EXPECT_EQ(p.version, h.version);
    EXPECT_EQ(p.cluster_bits, h.cluster_bits);
    EXPECT_EQ(p.size, h.size);
    EXPECT_EQ(p.l1_size, h.l1_size);
    EXPECT_EQ(p.l1_table_offset, h.l1_table_offset);
    EXPECT_EQ(p.refcount_table_offset, h.refcount_table_offset);
    EXPECT_EQ(p.refcount_table_clusters, h.refcount_table_clusters);
    EXPECT_EQ(p.incompatible, h.incompatible);
    EXPECT_EQ(p.compatible, h.compatible);
    EXPECT_EQ(p.autoclear, h.autoclear);
    EXPECT_EQ(p.refcount_order, h.refcount_order);
    EXPECT_EQ(p.header_length, h.header_length);
    EXPECT_EQ(p.compression_type, h.compression_type);
    EXPECT_EQ(p.unknown_fields, h.unknown_fields);
    EXPECT_EQ(p.backing_file, h.backing_file);
    EXPECT_EQ(p.backing_format, h.backing_format);
    ASSERT_EQ(p.feature_names.size(), 2U);
    EXPECT_EQ(p.feature_names[1].type, 1);
    EXPECT_EQ(p.feature_names[1].bit, 0);
    EXPECT_EQ(p.feature_names[1].name, "lazy refcounts");
    ASSERT_EQ(p.other_extensions.size(), 1U);
    EXPECT_EQ(p.other_extensions[0].type, 0x12345678U);
    EXPECT_EQ(p.other_extensions[0].data, (std::vector<uint8_t>{1, 2, 3}));
    EXPECT_EQ(p.backing_file_offset, copy.backing_file_offset);

    // And the second generation is byte-identical to the first.
    Header again = p;
    auto out2 = qcow2::serialize_header(&again);
    ASSERT_TRUE(out2.ok()) << out2.error().message();
    EXPECT_EQ(*out2, *out);
}

TEST(Qcow2Format, UnknownExtensionIsPreservedVerbatim) {
    auto c = v3_cluster();
    const std::vector<uint8_t> payload = {0xde, 0xad, 0xbe, 0xef, 0x01};  // 5 bytes: padded to 8
    const std::vector<uint8_t> bitmaps(24, 0x42);  // an extension we do not interpret either
    size_t pos = put_ext(&c, 112, 0x0badcafe, payload);
    pos = put_ext(&c, pos, qcow2::kExtBitmaps, bitmaps);
    // `pos` is the end marker (already zero).
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_EQ(r->other_extensions.size(), 2U);
    EXPECT_EQ(r->other_extensions[0].type, 0x0badcafeU);
    EXPECT_EQ(r->other_extensions[0].data, payload);
    EXPECT_EQ(r->other_extensions[1].type, qcow2::kExtBitmaps);
    EXPECT_EQ(r->other_extensions[1].data, bitmaps);

    // Serialised, the extension area is exactly what the image had, in the same order.
    auto out = serialize(*r);
    ASSERT_EQ(out.size(), pos + 8);
    EXPECT_EQ(std::vector<uint8_t>(out.begin() + 112, out.end()),
              std::vector<uint8_t>(c.begin() + 112, c.begin() + static_cast<ptrdiff_t>(pos + 8)));
    // Byte by byte: type, length, data, zero padding.
    EXPECT_EQ(load_be32(out.data() + 112), 0x0badcafeU);
    EXPECT_EQ(load_be32(out.data() + 116), 5U);
    EXPECT_EQ(std::vector<uint8_t>(out.begin() + 120, out.begin() + 125), payload);
    EXPECT_EQ(std::vector<uint8_t>(out.begin() + 125, out.begin() + 128),
              std::vector<uint8_t>(3, 0));
}

TEST(Qcow2Format, BackingFormatExtensionAndBackingFileName) {
    auto c = v3_cluster();
    size_t pos = put_ext(&c, 112, qcow2::kExtBackingFormat, bytes("qcow2"));
    EXPECT_EQ(pos, 128U);  // 112 + 8 + 5 padded to 8; the end marker follows at 128
    put_backing(&c, 512, "images/base.qcow2");
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->backing_file, "images/base.qcow2");
    ASSERT_TRUE(r->backing_format.has_value());
    EXPECT_EQ(*r->backing_format, "qcow2");
    EXPECT_EQ(r->backing_file_offset, 512U);
    EXPECT_EQ(r->backing_file_size, 17U);
    EXPECT_TRUE(r->other_extensions.empty());

    // Serialised, the name moves right after the end-of-extensions marker.
    Header h = *r;
    auto out = qcow2::serialize_header(&h);
    ASSERT_TRUE(out.ok()) << out.error().message();
    EXPECT_EQ(h.backing_file_offset, 136U);  // 112 + 16 (backing format) + 8 (end)
    EXPECT_EQ(std::string(out->begin() + 136, out->end()), "images/base.qcow2");
    auto again = parse(as_cluster(*out));
    ASSERT_TRUE(again.ok()) << again.error().message();
    EXPECT_EQ(again->backing_file, "images/base.qcow2");
    EXPECT_EQ(again->backing_format, std::optional<std::string>("qcow2"));
}

TEST(Qcow2Format, Version2BackingNameRightAfterTheHeader) {
    // qemu-img's old layout: no extensions at all, the name directly at offset 72.
    auto c = v2_cluster();
    put_backing(&c, 72, "base.img");
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->backing_file, "base.img");
    EXPECT_FALSE(r->backing_format.has_value());
}

// A name with a NUL byte in it names the file before the NUL, as QEMU reads it (a C string):
// that is the file the kernel opens, so it is also the name imgfs resolves and shows.
TEST(Qcow2Format, NamesEndAtTheirFirstNulByte) {
    auto c = v3_cluster();
    put_ext(&c, 112, qcow2::kExtBackingFormat, bytes(std::string("raw\0junk", 8)));
    put_backing(&c, 512, std::string("base.img\0/../../etc/passwd", 26));
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->backing_file, "base.img");
    EXPECT_EQ(r->backing_format, std::optional<std::string>("raw"));
}

TEST(Qcow2Format, BackingNameOf1023BytesIsAccepted) {
    auto c = v3_cluster();
    put_backing(&c, 512, std::string(qcow2::kMaxBackingNameBytes, 'a'));
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->backing_file.size(), 1023U);
}

TEST(Qcow2Format, SerializeRefusesWhatDoesNotFit) {
    Header h;
    h.backing_file = std::string(1024, 'a');
    auto r = qcow2::serialize_header(&h);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().errnum, ENAMETOOLONG);

    Header small;
    small.cluster_bits = 9;  // 512 bytes: 112 + 8 + 400 does not fit
    small.backing_file = std::string(400, 'b');
    auto r2 = qcow2::serialize_header(&small);
    ASSERT_FALSE(r2.ok());
    EXPECT_EQ(r2.error().errnum, ENOSPC);
    EXPECT_NE(r2.error().context.find("do not fit"), std::string::npos) << r2.error().context;
}

// ---- incompatible features ----

TEST(Qcow2Format, UnknownIncompatibleBitIsNamedFromTheFeatureTable) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, 1ULL << 9);
    std::vector<uint8_t> table = feature(1, 9, "compatible namesake");  // wrong type: ignored
    auto incompat = feature(0, 9, "frobnicated clusters");
    table.insert(table.end(), incompat.begin(), incompat.end());
    put_ext(&c, 112, qcow2::kExtFeatureTable, table);
    auto r = parse(c);
    EXPECT_TRUE(refused(r, ENOTSUP, "frobnicated clusters"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().context.find("namesake"), std::string::npos) << r.error().context;
}

TEST(Qcow2Format, UnknownIncompatibleBitWithoutTableEntryIsNamedByNumber) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, (1ULL << 9) | (1ULL << 63));
    put_ext(&c, 112, qcow2::kExtFeatureTable, feature(0, 10, "another feature"));
    auto r = parse(c);
    EXPECT_TRUE(refused(r, ENOTSUP, "bit 9"));
    EXPECT_TRUE(refused(r, ENOTSUP, "bit 63"));

    // No table at all.
    auto plain = v3_cluster();
    store_be64(plain.data() + kOffIncompatible, 1ULL << 5);
    EXPECT_TRUE(refused(parse(plain), ENOTSUP, "bit 5"));
}

TEST(Qcow2Format, ExternalDataFileIsRefused) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, qcow2::kIncompatDataFile);
    EXPECT_TRUE(refused(parse(c), ENOTSUP, "external data file"));
}

TEST(Qcow2Format, EncryptionIsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffCryptMethod, 1);  // AES
    EXPECT_TRUE(refused(parse(c), ENOTSUP, "encrypted"));
    store_be32(c.data() + kOffCryptMethod, 2);  // LUKS
    EXPECT_TRUE(refused(parse(c), ENOTSUP, "crypt_method 2"));
}

// ---- refused headers ----

TEST(Qcow2Format, BadMagicIsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffMagic, 0x514649fa);
    EXPECT_TRUE(refused(parse(c), EINVAL, "bad magic"));
    // Shorter than any header: the same answer, without reading past the buffer.
    auto tiny = v3_cluster();
    tiny.resize(71);
    EXPECT_TRUE(refused(parse(tiny, 71), EINVAL, "not a qcow2 image"));
}

TEST(Qcow2Format, VersionsOtherThan2And3AreRefused) {
    for (uint32_t v : {0U, 1U, 4U}) {
        auto c = v3_cluster();
        store_be32(c.data() + kOffVersion, v);
        EXPECT_TRUE(refused(parse(c), ENOTSUP, fmt::format("version {}", v))) << v;
    }
}

TEST(Qcow2Format, ClusterBitsOutOfRangeAreRefused) {
    for (uint32_t bits : {0U, 8U, 22U, 63U}) {
        auto c = v3_cluster();
        store_be32(c.data() + kOffClusterBits, bits);
        EXPECT_TRUE(refused(parse(c), EINVAL, fmt::format("cluster_bits {}", bits))) << bits;
    }
}

TEST(Qcow2Format, BadHeaderLengthIsRefused) {
    for (uint32_t len : {108U, 113U, 96U, 72U, 0U}) {  // not a multiple of 8, or < 104
        auto c = v3_cluster();
        store_be32(c.data() + kOffHeaderLength, len);
        EXPECT_TRUE(refused(parse(c), EINVAL, fmt::format("header_length {}", len))) << len;
    }
    // Longer than the cluster.
    auto c = v3_cluster();
    store_be32(c.data() + kOffHeaderLength, static_cast<uint32_t>(kCluster + 8));
    EXPECT_TRUE(refused(parse(c), EINVAL, "header_length"));
}

TEST(Qcow2Format, RefcountOrderAbove6IsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffRefcountOrder, 7);
    EXPECT_TRUE(refused(parse(c), EINVAL, "refcount_order 7"));
    store_be32(c.data() + kOffRefcountOrder, 6);  // 64-bit refcounts are fine
    EXPECT_TRUE(parse(c).ok());
}

TEST(Qcow2Format, UnalignedL1TableIsRefused) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffL1Offset, kL1Offset + 512);
    EXPECT_TRUE(refused(parse(c), EINVAL, "L1 table offset 0x30200 is not cluster aligned"));
}

TEST(Qcow2Format, L1TableBeyondEndOfFileIsRefused) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffL1Offset, kFileSize);  // starts at EOF
    EXPECT_TRUE(refused(parse(c), EINVAL, "L1 table"));
    EXPECT_TRUE(refused(parse(c), EINVAL, "beyond the end of the file"));
    // Starts inside, ends outside: 16 bytes at the file's last cluster fit, 2 clusters do not.
    auto big = v3_cluster();
    store_be32(big.data() + kOffL1Size, static_cast<uint32_t>(kCluster / 8 + 1));
    EXPECT_TRUE(refused(parse(big), EINVAL, "beyond the end of the file"));
    // At offset 0 it would be the header.
    auto zero = v3_cluster();
    store_be64(zero.data() + kOffL1Offset, 0);
    EXPECT_TRUE(refused(parse(zero), EINVAL, "overlaps the header"));
}

TEST(Qcow2Format, L1TableTooSmallForTheVirtualSizeIsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffL1Size, 1);  // covers 512 MiB of 1 GiB
    EXPECT_TRUE(refused(parse(c), EINVAL, "too small for a virtual size of 1073741824"));
    // One byte over a multiple of the L2 span needs one more entry.
    store_be64(c.data() + kOffSize, (512ULL << 20) + 1);
    EXPECT_TRUE(refused(parse(c), EINVAL, "too small"));
    store_be64(c.data() + kOffSize, 512ULL << 20);
    EXPECT_TRUE(parse(c).ok());
}

TEST(Qcow2Format, HugeL1TableIsRefusedBeforeAnyAllocation) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffL1Size, 0xffffffff);
    EXPECT_TRUE(refused(parse(c), EFBIG, "too large"));
}

TEST(Qcow2Format, RefcountTableBeyondEndOfFileIsRefused) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffRefcountTableOffset, kFileSize + kCluster);
    EXPECT_TRUE(refused(parse(c), EINVAL, "refcount table"));
    EXPECT_TRUE(refused(parse(c), EINVAL, "beyond the end of the file"));
    // Starts inside, 4 clusters long: runs past EOF.
    auto c2 = v3_cluster();
    store_be32(c2.data() + kOffRefcountTableClusters, 4);
    EXPECT_TRUE(refused(parse(c2), EINVAL, "beyond the end of the file"));
}

TEST(Qcow2Format, RefcountTableOfZeroClustersIsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + kOffRefcountTableClusters, 0);
    EXPECT_TRUE(refused(parse(c), EINVAL, "refcount table size (0 clusters)"));
}

TEST(Qcow2Format, BackingNameLongerThan1023BytesIsRefused) {
    auto c = v3_cluster();
    put_backing(&c, 512, std::string(1024, 'a'));
    EXPECT_TRUE(refused(parse(c), EINVAL, "backing file name (1024 bytes at 512) is invalid"));
}

TEST(Qcow2Format, BackingNameOutsideTheFirstClusterIsRefused) {
    auto c = v3_cluster();
    // Starts inside the cluster, ends past it.
    store_be64(c.data() + kOffBackingOffset, kCluster - 8);
    store_be32(c.data() + kOffBackingSize, 16);
    EXPECT_TRUE(refused(parse(c), EINVAL, "backing file name lies outside the header cluster"));
    // Starts past it.
    store_be64(c.data() + kOffBackingOffset, 2 * kCluster);
    store_be32(c.data() + kOffBackingSize, 8);
    EXPECT_TRUE(refused(parse(c), EINVAL, "backing file name"));
}

TEST(Qcow2Format, ExtensionRunningPastTheClusterIsRefused) {
    auto c = v3_cluster();
    store_be32(c.data() + 112, 0x0badcafe);
    store_be32(c.data() + 116, static_cast<uint32_t>(kCluster - 120 + 1));  // one byte too long
    EXPECT_TRUE(refused(parse(c), EINVAL, "header extension 0xbadcafe"));
    EXPECT_TRUE(refused(parse(c), EINVAL, "runs past the header area"));
    // Exactly to the end of the cluster fits; without room for an end marker the area simply
    // ends there (QEMU accepts this too).
    store_be32(c.data() + 116, static_cast<uint32_t>(kCluster - 120));
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_EQ(r->other_extensions.size(), 1U);
    EXPECT_EQ(r->other_extensions[0].data.size(), kCluster - 120);
}

TEST(Qcow2Format, ExtensionRunningIntoTheBackingNameIsRefused) {
    auto c = v3_cluster();
    put_backing(&c, 512, "base.qcow2");
    store_be32(c.data() + 112, 0x0badcafe);
    store_be32(c.data() + 116, 512 - 120 + 1);  // overlaps the name's first byte
    EXPECT_TRUE(refused(parse(c), EINVAL, "runs past the header area"));
}

// The feature name table only names bits for messages. One of odd length, or a second one,
// made the image unreadable though QEMU opens it: whole entries count, a partial one does not.
TEST(Qcow2Format, AnOddOrSecondFeatureTableIsReadAsFarAsItGoes) {
    auto c = v3_cluster();
    std::vector<uint8_t> table = feature(0, 0, "dirty bit");
    table.resize(48 + 47, 0);  // one whole entry and a partial one
    size_t pos = put_ext(&c, 112, qcow2::kExtFeatureTable, table);
    put_ext(&c, pos, qcow2::kExtFeatureTable, feature(1, 0, "lazy refcounts"));
    auto r = parse(c);
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_EQ(r->feature_names.size(), 2U);
    EXPECT_EQ(r->feature_names[0].name, "dirty bit");
    EXPECT_EQ(r->feature_names[1].name, "lazy refcounts");
}

TEST(Qcow2Format, DuplicateBackingFormatIsRefused) {
    auto c = v3_cluster();
    size_t pos = put_ext(&c, 112, qcow2::kExtBackingFormat, bytes("raw"));
    put_ext(&c, pos, qcow2::kExtBackingFormat, bytes("qcow2"));
    EXPECT_TRUE(refused(parse(c), EINVAL, "duplicate backing format"));
}

TEST(Qcow2Format, CompressionTypeMustMatchTheFeatureBit) {
    auto zstd_without_bit = v3_cluster();
    zstd_without_bit[kOffCompressionType] = 1;
    EXPECT_TRUE(refused(parse(zstd_without_bit), EINVAL,
                        "compression type 1 does not match the compression feature bit"));

    auto bit_without_zstd = v3_cluster();
    store_be64(bit_without_zstd.data() + kOffIncompatible, qcow2::kIncompatCompression);
    EXPECT_TRUE(refused(parse(bit_without_zstd), EINVAL, "compression type 0 does not match"));

    auto unknown_type = v3_cluster();
    store_be64(unknown_type.data() + kOffIncompatible, qcow2::kIncompatCompression);
    unknown_type[kOffCompressionType] = 2;
    EXPECT_TRUE(refused(parse(unknown_type), EINVAL, "compression type 2"));
}

TEST(Qcow2Format, ExtendedL2NeedsClustersOfAtLeast16KiB) {
    auto c = v3_cluster();
    store_be64(c.data() + kOffIncompatible, qcow2::kIncompatExtendedL2);
    store_be32(c.data() + kOffClusterBits, 13);  // 8 KiB
    store_be64(c.data() + kOffSize, 1 << 20);    // 1 MiB: one L1 entry covers it
    store_be32(c.data() + kOffL1Size, 1);
    EXPECT_TRUE(refused(parse(c, 64 * 8192), EINVAL, "extended L2"));

    store_be32(c.data() + kOffClusterBits, 14);  // 16 KiB: the smallest allowed
    auto r = parse(c, 64 * 16384);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_TRUE(r->extended_l2());
}

// ---- geometry ----

TEST(Qcow2Geometry, StandardL2With64KiBClusters) {
    auto r = parse(v3_cluster());
    ASSERT_TRUE(r.ok()) << r.error().message();
    Geometry g = Geometry::from(*r);
    EXPECT_EQ(g.cluster_bits, 16U);
    EXPECT_EQ(g.cluster_size, 65536U);
    EXPECT_FALSE(g.extended_l2);
    EXPECT_EQ(g.l2_entry_bytes, 8U);
    EXPECT_EQ(g.l2_bits, 13U);
    EXPECT_EQ(g.l2_entries, 8192U);
    EXPECT_EQ(g.subclusters, 1U);
    EXPECT_EQ(g.subcluster_bits, 16U);
    EXPECT_EQ(g.subcluster_size, 65536U);
    EXPECT_EQ(g.refcount_order, 4U);
    EXPECT_EQ(g.refcount_bits, 16U);
    EXPECT_EQ(g.refblock_entries, 32768U);
    EXPECT_EQ(g.refcount_max, 0xffffU);
    EXPECT_EQ(g.compressed_offset_bits, 54U);  // 62 - (16 - 8)
    EXPECT_EQ(g.l2_span(), 512ULL << 20);

    // Guest offset 0x2000_1234_5678 -> L1 index, L2 index, offset in the cluster.
    const uint64_t guest = 0x200012345678ULL;
    EXPECT_EQ(g.l1_index(guest), guest >> 29);
    EXPECT_EQ(g.l2_index(guest), (guest >> 16) & 8191);
    EXPECT_EQ(g.in_cluster(guest), 0x5678U);
    EXPECT_EQ(g.cluster_start(guest), 0x200012340000ULL);
    EXPECT_EQ(g.subcluster_index(guest), 0U);
    EXPECT_EQ(g.l1_entries_for(0), 0U);
    EXPECT_EQ(g.l1_entries_for(1), 1U);
    EXPECT_EQ(g.l1_entries_for(512ULL << 20), 1U);
    EXPECT_EQ(g.l1_entries_for((512ULL << 20) + 1), 2U);
}

TEST(Qcow2Geometry, ExtendedL2) {
    Header h;
    h.cluster_bits = 16;
    h.incompatible = qcow2::kIncompatExtendedL2;
    Geometry g = Geometry::from(h);
    EXPECT_TRUE(g.extended_l2);
    EXPECT_EQ(g.l2_entry_bytes, 16U);
    EXPECT_EQ(g.l2_bits, 12U);
    EXPECT_EQ(g.l2_entries, 4096U);
    EXPECT_EQ(g.subclusters, 32U);
    EXPECT_EQ(g.subcluster_bits, 11U);
    EXPECT_EQ(g.subcluster_size, 2048U);
    EXPECT_EQ(g.subcluster_index(0x12345ULL), (0x2345U >> 11));
    EXPECT_EQ(g.l2_span(), 256ULL << 20);

    h.cluster_bits = 14;  // the smallest extended geometry: 512-byte subclusters
    g = Geometry::from(h);
    EXPECT_EQ(g.l2_bits, 10U);
    EXPECT_EQ(g.subcluster_size, 512U);
}

TEST(Qcow2Geometry, ClusterSizeAndRefcountWidthExtremes) {
    Header h;
    h.cluster_bits = 9;
    h.refcount_order = 0;
    Geometry g = Geometry::from(h);
    EXPECT_EQ(g.cluster_size, 512U);
    EXPECT_EQ(g.l2_bits, 6U);
    EXPECT_EQ(g.l2_entries, 64U);
    EXPECT_EQ(g.refcount_bits, 1U);
    EXPECT_EQ(g.refblock_entries, 4096U);  // 512 bytes of 1-bit counts
    EXPECT_EQ(g.refcount_max, 1U);
    EXPECT_EQ(g.compressed_offset_bits, 61U);

    h.cluster_bits = 21;
    h.refcount_order = 6;
    g = Geometry::from(h);
    EXPECT_EQ(g.cluster_size, 2ULL << 20);
    EXPECT_EQ(g.l2_bits, 18U);
    EXPECT_EQ(g.refcount_bits, 64U);
    EXPECT_EQ(g.refblock_entries, (2ULL << 20) / 8);
    EXPECT_EQ(g.refcount_max, UINT64_MAX);
    EXPECT_EQ(g.compressed_offset_bits, 49U);
}

TEST(Qcow2Format, BigEndianHelpers) {
    uint8_t b[8] = {};
    store_be64(b, 0x0102030405060708ULL);
    EXPECT_EQ(b[0], 0x01);
    EXPECT_EQ(b[7], 0x08);
    EXPECT_EQ(load_be64(b), 0x0102030405060708ULL);
    EXPECT_EQ(load_be32(b + 4), 0x05060708U);
    EXPECT_EQ(qcow2::load_be16(b + 6), 0x0708);
    qcow2::store_be16(b, 0xfffe);
    EXPECT_EQ(b[0], 0xff);
    EXPECT_EQ(b[1], 0xfe);
}

// Sizes near 2^64 wrapped the L1 size computed for them, so create wrote an image with a tiny
// L1 table that no open accepts. Each size is either refused or opens again.
TEST(Qcow2Format, CreateRefusesSizesAnOpenWouldRefuse) {
    for (uint64_t size :
         {uint64_t{1} << 62, (uint64_t{1} << 62) + 1, UINT64_MAX - 4095, UINT64_MAX}) {
        qcow2::CreateOptions o;
        o.size = size;
        o.cluster_size = 2 << 20;
        Result<std::vector<uint8_t>> img = qcow2::build_new_image(o);
        if (!img) {
            EXPECT_TRUE(img.error().errnum == EFBIG || img.error().errnum == EINVAL) << size;
            continue;
        }
        Result<qcow2::Header> h = qcow2::parse_header(
            ConstBuf(img->data(), std::min<size_t>(img->size(), o.cluster_size)), img->size(),
            "img");
        EXPECT_TRUE(h.ok()) << size << ": " << h.error().message();
    }
}

}  // namespace
}  // namespace imgfs
