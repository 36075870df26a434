#include "drivers/raw.h"

#include <cstring>

#include "core/json.h"
#include "core/transaction.h"

namespace imgfs {

namespace {

struct Magic {
    const char* format;
    const char* bytes;
    size_t length;
};

// Formats a probing reader (QEMU among them) would recognise from the first sector.
constexpr Magic kMagics[] = {
    {"qcow2", "QFI\xfb", 4},
    {"qed", "QED\0", 4},
    {"vmdk", "KDMV", 4},
    {"vmdk", "COWD", 4},
    {"vmdk", "# Disk DescriptorFile", 21},
    {"vpc", "conectix", 8},
    {"vhdx", "vhdxfile", 8},
    {"luks", "LUKS\xba\xbe", 6},
    {"vdi", "<<< Oracle VM VirtualBox Disk Image >>>", 39},
    {"vdi", "<<< innotek VirtualBox Disk Image >>>", 37},
    {"parallels", "WithoutFreeSpace", 16},
    {"parallels", "WithouFreSpacExt", 16},
    {"cloop", "#!/bin/sh\n#V2.0 Format\n", 23},
    {"bochs", "Bochs Virtual HD Image", 22},
};

constexpr uint64_t kSectorBytes = 512;

}  // namespace

const char* detect_image_magic(ConstBuf sector) {
    for (const Magic& m : kMagics) {
        if (sector.size() >= m.length && std::memcmp(sector.data(), m.bytes, m.length) == 0) {
            return m.format;
        }
    }
    return nullptr;
}

std::shared_ptr<RawNode> RawNode::open(NodeEnv env, std::string name, Transaction* tx,
                                       std::shared_ptr<Node> file, RawOptions options) {
    auto node = std::make_shared<RawNode>(env, std::move(name), options);
    tx->attach(node.get(), std::move(file), ChildRole::kFile, "file");
    node->init_from_file();
    return node;
}

RawNode::RawNode(NodeEnv env, std::string name, RawOptions options)
    : Node(env, std::move(name)), options_(options) {}

void RawNode::init_from_file() {
    Node* f = file()->node();
    size_ = f->size();
    read_only_ = f->read_only() || options_.read_only;
    limits_ = f->limits();
    // Whole sectors, so the guard always sees the complete new first sector.
    limits_.request_alignment = std::max<uint32_t>(limits_.request_alignment, kSectorBytes);
    caps_ = f->caps();
}

Task<Status> RawNode::set_writable(bool writable) {
    if (writable && file()->node()->read_only()) {
        co_return make_error(EROFS, "{}: its file was opened read-only", name());
    }
    if (!writable && !read_only_) {
        CO_TRY(co_await flush());
    }
    if (writable && read_only_) {
        expect_writes();  // the backend claims it before the first write
    }
    read_only_ = !writable;
    co_return Status{};
}

Task<Result<bool>> RawNode::claim_writes() {
    CO_TRY_ASSIGN(bool fresh, co_await Node::claim_writes());
    if (fresh) {
        size_ = file()->node()->size();
    }
    co_return fresh;
}

void RawNode::describe(JsonWriter* out) const {
    out->field("format_probed", options_.probed);
}

void RawNode::child_perm(const Child& /*child*/, Perms node_perm, Perms node_shared, Perms* perm,
                         Perms* shared) const {
    // The raw format adds nothing: its storage is used exactly as the format node is.
    *perm = node_perm | perm::kConsistentRead;
    *shared = node_shared;
}

Task<Status> RawNode::do_read(uint64_t offset, MutBuf buf) {
    co_return co_await file()->read(offset, buf);
}

Task<Status> RawNode::do_write(uint64_t offset, ConstBuf buf) {
    if (offset < kSectorBytes) {
        if (const char* format = detect_image_magic(buf.first(kSectorBytes))) {
            co_return make_error(EPERM,
                                 "{}: refusing to write a {} header into the first sector of a "
                                 "raw image (its format is guessed whenever it is an image's "
                                 "root)",
                                 name(), format);
        }
    }
    CO_TRY(co_await file()->write(offset, buf));
    size_ = std::max(size_, file()->node()->size());
    co_return Status{};
}

Task<Status> RawNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    co_return co_await file()->write_zeroes(offset, bytes, may_unmap);
}

Task<Status> RawNode::do_discard(uint64_t offset, uint64_t bytes) {
    co_return co_await file()->discard(offset, bytes);
}

Task<Status> RawNode::do_flush() {
    co_return co_await file()->flush();
}

Task<Result<BlockStatus>> RawNode::do_block_status(uint64_t offset, uint64_t bytes) {
    co_return co_await file()->block_status(offset, bytes);
}

Task<Status> RawNode::do_truncate(uint64_t new_size) {
    CO_TRY(co_await file()->truncate(new_size));
    size_ = new_size;
    co_return Status{};
}

}  // namespace imgfs
