#include "drivers/qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

namespace imgfs::qcow2 {

namespace {

Status inflate_raw(ConstBuf in, MutBuf out) {
    z_stream s{};
    // Raw deflate with a 4 KiB window, as qcow2 writes it.
    if (inflateInit2(&s, -12) != Z_OK) {
        return make_error(ENOMEM, "zlib: cannot initialise");
    }
    s.next_in = const_cast<Bytef*>(in.data());  // NOLINT: zlib's API is not const-correct
    s.avail_in = static_cast<uInt>(in.size());
    s.next_out = out.data();
    s.avail_out = static_cast<uInt>(out.size());
    int ret = inflate(&s, Z_FINISH);
    bool full = s.avail_out == 0;
    inflateEnd(&s);
    // The stream may end exactly at the cluster end, or be cut off there by the sector padding.
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) && full) {
        return {};
    }
    return make_error(EIO,
                      "zlib: broken compressed cluster (inflate returned {}, {} bytes "
                      "missing)",
                      ret, s.avail_out);
}

Status zstd_decompress(ConstBuf in, MutBuf out) {
    ZSTD_DCtx* ctx = ZSTD_createDCtx();
    if (ctx == nullptr) {
        return make_error(ENOMEM, "zstd: cannot initialise");
    }
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    ZSTD_outBuffer ob{out.data(), out.size(), 0};
    size_t ret = 0;
    // Stop as soon as the cluster is full; what follows in the last sector is padding.
    while (ob.pos < ob.size) {
        size_t before_in = ib.pos;
        size_t before_out = ob.pos;
        ret = ZSTD_decompressStream(ctx, &ob, &ib);
        if (ZSTD_isError(ret) || (ib.pos == before_in && ob.pos == before_out)) {
            break;
        }
    }
    ZSTD_freeDCtx(ctx);
    if (ob.pos == ob.size) {
        return {};
    }
    return make_error(EIO, "zstd: broken compressed cluster ({})",
                      ZSTD_isError(ret) ? ZSTD_getErrorName(ret) : "stream too short");
}

}  // namespace

Status decompress_cluster(CompressionType type, ConstBuf in, MutBuf out) {
    switch (type) {
        case CompressionType::kZlib:
            return inflate_raw(in, out);
        case CompressionType::kZstd:
            return zstd_decompress(in, out);
    }
    return make_error(ENOTSUP, "unknown compression type");
}

}  // namespace imgfs::qcow2
