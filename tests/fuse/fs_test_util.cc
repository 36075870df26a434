#include "fs_test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <filesystem>
#include <unistd.h>

#include "drivers/local_store.h"
#include "drivers/qcow2/format.h"

namespace imgfs::test {

// ---- GateNode ----

GateNode::GateNode(NodeEnv env, std::string name, uint64_t size, Limits limits, Capabilities caps)
    : Node(env, std::move(name)), gate_(env.loop) {
    size_ = size;
    limits_ = limits;
    caps_ = caps;
}

void GateNode::release() {
    held_ = false;
    reads_held_ = false;
    gate_.notify_all();
}

Task<void> GateNode::pass(bool read) {
    if (read && reads_held_ && !held_ && reads_to_pass_ > 0) {
        --reads_to_pass_;
        co_return;
    }
    while (held_ || (read && reads_held_)) {
        ++waiting_;
        co_await gate_.wait();
        --waiting_;
    }
}

Task<Result<uint64_t>> GateNode::allocated_bytes() {
    co_return co_await below()->node()->allocated_bytes();
}

Task<Status> GateNode::do_read(uint64_t offset, MutBuf buf) {
    co_await pass(true);
    if (fail_reads != 0) {
        co_return make_error(fail_reads, "{}: read at {} failed (injected)", name(), offset);
    }
    co_return co_await below()->read(offset, buf);
}

Task<Status> GateNode::do_write(uint64_t offset, ConstBuf buf) {
    co_await pass(false);
    if (fail_writes != 0) {
        co_return make_error(fail_writes, "{}: write at {} failed (injected)", name(), offset);
    }
    Status st = co_await below()->write(offset, buf);
    size_ = below()->node()->size();
    co_return st;
}

Task<Status> GateNode::do_write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    co_await pass(false);
    Status st = co_await below()->write_zeroes(offset, bytes, may_unmap);
    size_ = below()->node()->size();
    co_return st;
}

Task<Status> GateNode::do_discard(uint64_t offset, uint64_t bytes) {
    co_await pass(false);
    co_return co_await below()->discard(offset, bytes);
}

Task<Status> GateNode::do_flush() {
    co_await pass(false);
    co_return co_await below()->flush();
}

Task<Result<BlockStatus>> GateNode::do_block_status(uint64_t offset, uint64_t bytes) {
    co_await pass(true);
    co_return co_await below()->block_status(offset, bytes);
}

Task<Status> GateNode::do_truncate(uint64_t new_size) {
    co_await pass(false);
    Status st = co_await below()->truncate(new_size);
    size_ = below()->node()->size();
    co_return st;
}

// ---- FsTest ----

void FsTest::SetUp() {
    LoopTest::SetUp();
    dir_fd_.reset(::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(dir_fd_.valid());
    scratch_ = AlignedBuffer(1 << 20);
}

void FsTest::TearDown() {
    stop();
    gates_.clear();
    LoopTest::TearDown();
}

void FsTest::make_qcow2(const std::string& file, uint64_t size, const std::string& backing,
                        const std::string& backing_format) {
    qcow2::CreateOptions o;
    o.size = size;
    o.backing_file = backing;
    if (!backing.empty()) {
        o.backing_format = backing_format;
    }
    UniqueFd fd(::openat(dir_fd_.get(), file.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.valid()) << file;
    Status st = qcow2::create_image_sync(fd.get(), o);
    ASSERT_TRUE(st.ok()) << st.error().message();
}

void FsTest::make_raw(const std::string& file, uint64_t size) {
    UniqueFd fd(::openat(dir_fd_.get(), file.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.valid()) << file;
    ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
}

void FsTest::start(ImageSetOptions options) {
    std::unique_ptr<Store> store =
        std::make_unique<LocalDirStore>(UniqueFd(::dup(dir_fd_.get())), dir_.path().string());
    if (wrap_store_) {
        store = wrap_store_(std::move(store));
    }
    images_ = std::make_unique<ImageSet>(env(), std::move(store), std::move(options));
    Status st = run(images_->scan());
    ASSERT_TRUE(st.ok()) << st.error().message();
    jobs_ = std::make_unique<JobManager>(images_.get(), &log_);
    control_ = std::make_unique<StandardControl>(images_.get(), jobs_.get(), &log_);
    fs_ = std::make_unique<ExportFs>(images_.get(), control_.get(), &log_, fs_options_);
}

void FsTest::stop() {
    if (images_ == nullptr) {
        return;
    }
    release_gates();
    run(fs_->finish());  // reads ahead still in flight
    fs_.reset();         // drops every open handle's hold on its export
    run(jobs_->shutdown());
    (void)run(images_->close_all());
    control_.reset();
    jobs_.reset();
    images_.reset();
}

GateNode* FsTest::gate_of(const std::string& file) {
    for (auto& g : gates_) {
        if (g->name() == file + " (gate)") {
            return g.get();
        }
    }
    return nullptr;
}

void FsTest::gate_files(ImageSetOptions* options) {
    options->wrap_file = [this](NodeEnv env, Transaction* tx, std::shared_ptr<Node> file,
                                const std::string& name) -> std::shared_ptr<Node> {
        auto g = std::make_shared<GateNode>(env, name + " (gate)", file->size(), file->limits(),
                                            file->caps());
        tx->attach(g.get(), std::move(file), ChildRole::kFiltered, "filtered");
        if (hold_new_gates_) {
            g->hold();
        }
        gates_.push_back(g);
        return g;
    };
}

void FsTest::hold_gates() {
    for (auto& g : gates_) {
        g->hold();
    }
}

void FsTest::hold_gate_reads(int pass_first) {
    for (auto& g : gates_) {
        g->hold_reads(pass_first);
    }
}

void FsTest::release_gates() {
    hold_new_gates_ = false;
    for (auto& g : gates_) {
        g->release();
    }
}

Task<Reply> FsTest::request(uint32_t opcode, uint64_t nodeid, std::vector<uint8_t> arg,
                            std::vector<uint8_t> payload, uint32_t pid) {
    fuse_in_header h{};
    h.opcode = opcode;
    h.pid = pid;
    h.nodeid = nodeid;
    h.unique = unique_++;
    h.len = static_cast<uint32_t>(sizeof h + arg.size() + payload.size());
    // Each request gets its own scratch space (replies may point into it).
    AlignedBuffer scratch(1 << 20);
    FuseRequest req;
    req.header = &h;
    req.arg = ConstBuf(arg.data(), arg.size());
    req.payload = ConstBuf(payload.data(), payload.size());
    req.scratch = scratch.span();
    FuseReply r = co_await fs_->handle(&req);
    Reply out;
    out.error = r.error;
    out.data.assign(r.data.begin(), r.data.end());
    co_return out;
}

uint64_t FsTest::ino(const std::string& path) {
    uint64_t at = ExportFs::kRootIno;
    std::string rest = path;
    while (!rest.empty()) {
        size_t slash = rest.find('/');
        std::string part = rest.substr(0, slash);
        rest = slash == std::string::npos ? std::string() : rest.substr(slash + 1);
        std::vector<uint8_t> arg(part.begin(), part.end());
        arg.push_back(0);
        Reply r = run(request(FUSE_LOOKUP, at, std::move(arg), {}));
        if (r.error != 0) {
            return 0;
        }
        at = r.as<fuse_entry_out>().nodeid;
    }
    return at;
}

uint64_t FsTest::open(uint64_t ino, uint32_t flags) {
    fuse_open_in in{};
    in.flags = flags;
    Reply r = run(request(FUSE_OPEN, ino, bytes_of(in), {}));
    EXPECT_EQ(r.error, 0) << "open of inode " << ino;
    return r.as<fuse_open_out>().fh;
}

void FsTest::release(uint64_t ino, uint64_t fh) {
    fuse_release_in in{};
    in.fh = fh;
    (void)run(request(FUSE_RELEASE, ino, bytes_of(in), {}));
}

Task<int> FsTest::control_task(uint64_t ino, std::string text, uint32_t pid) {
    std::vector<std::string> one;
    one.push_back(std::move(text));
    std::vector<int> errors = co_await control_writes_task(ino, std::move(one), pid);
    co_return errors.front();
}

Task<std::vector<int>> FsTest::control_writes_task(uint64_t ino, std::vector<std::string> writes,
                                                   uint32_t pid) {
    fuse_open_in open_in{};
    open_in.flags = O_WRONLY;
    Reply opened = co_await request(FUSE_OPEN, ino, bytes_of(open_in), {});
    if (opened.error != 0) {
        co_return std::vector<int>(writes.size(), opened.error);
    }
    uint64_t fh = opened.as<fuse_open_out>().fh;
    std::vector<int> errors;
    uint64_t offset = 0;
    for (const std::string& text : writes) {
        fuse_write_in w{};
        w.fh = fh;
        w.offset = offset;
        w.size = static_cast<uint32_t>(text.size());
        Reply written = co_await request(FUSE_WRITE, ino, bytes_of(w),
                                         std::vector<uint8_t>(text.begin(), text.end()), pid);
        errors.push_back(written.error);
        offset += text.size();
    }
    fuse_release_in rel{};
    rel.fh = fh;
    (void)co_await request(FUSE_RELEASE, ino, bytes_of(rel), {});
    co_return errors;
}

std::vector<int> FsTest::control_writes(const std::string& path, std::vector<std::string> writes) {
    uint64_t i = ino(path);
    if (i == 0) {
        return std::vector<int>(writes.size(), ENOENT);
    }
    return run(control_writes_task(i, std::move(writes)));
}

int FsTest::control(const std::string& path, const std::string& text) {
    uint64_t i = ino(path);
    if (i == 0) {
        return ENOENT;
    }
    return run(control_task(i, text));
}

std::string FsTest::read_text(const std::string& path) {
    uint64_t i = ino(path);
    if (i == 0) {
        return {};
    }
    uint64_t fh = open(i, O_RDONLY);
    Reply r = run(read_task(i, fh, 0, 1 << 20));
    release(i, fh);
    return std::string(r.data.begin(), r.data.end());
}

Task<Reply> FsTest::read_task(uint64_t ino, uint64_t fh, uint64_t offset, uint32_t size) {
    fuse_read_in in{};
    in.fh = fh;
    in.offset = offset;
    in.size = size;
    co_return co_await request(FUSE_READ, ino, bytes_of(in), {});
}

std::vector<uint8_t> FsTest::read_raw(const std::string& name) {
    uint64_t i = ino(name + ".raw");
    EXPECT_NE(i, 0U) << name;
    uint64_t fh = open(i, O_RDONLY);
    std::vector<uint8_t> out;
    for (;;) {
        Reply r = run(read_task(i, fh, out.size(), 1 << 20));
        EXPECT_EQ(r.error, 0);
        if (r.error != 0 || r.data.empty()) {
            break;
        }
        out.insert(out.end(), r.data.begin(), r.data.end());
    }
    release(i, fh);
    return out;
}

void FsTest::write_raw(const std::string& name, uint64_t offset, const std::vector<uint8_t>& data) {
    uint64_t i = ino(name + ".raw");
    ASSERT_NE(i, 0U) << name;
    uint64_t fh = open(i, O_RDWR);
    fuse_write_in w{};
    w.fh = fh;
    w.offset = offset;
    w.size = static_cast<uint32_t>(data.size());
    Reply r = run(request(FUSE_WRITE, i, bytes_of(w), data));
    EXPECT_EQ(r.error, 0);
    release(i, fh);
}

Task<Reply> FsTest::getattr_task(uint64_t ino) {
    fuse_getattr_in in{};
    co_return co_await request(FUSE_GETATTR, ino, bytes_of(in), {});
}

Task<Reply> FsTest::lseek_task(uint64_t ino, uint64_t fh, uint64_t offset, uint32_t whence) {
    fuse_lseek_in in{};
    in.fh = fh;
    in.offset = offset;
    in.whence = whence;
    co_return co_await request(FUSE_LSEEK, ino, bytes_of(in), {});
}

Task<Reply> FsTest::fallocate_task(uint64_t ino, uint64_t fh, uint32_t mode, uint64_t offset,
                                   uint64_t length) {
    fuse_fallocate_in in{};
    in.fh = fh;
    in.mode = mode;
    in.offset = offset;
    in.length = length;
    co_return co_await request(FUSE_FALLOCATE, ino, bytes_of(in), {});
}

Task<Reply> FsTest::setattr_size_task(uint64_t ino, uint64_t size) {
    fuse_setattr_in in{};
    in.valid = FATTR_SIZE;
    in.size = size;
    co_return co_await request(FUSE_SETATTR, ino, bytes_of(in), {});
}

void FsTest::idle(int ms) {
    auto pause = [](EventLoop* loop, int n) -> Task<void> {
        co_await loop->sleep(std::chrono::milliseconds(n));
    };
    run(pause(loop_.get(), ms));
}

std::vector<std::string> FsTest::chain(const std::string& name) {
    std::vector<std::string> out;
    std::string text = read_text(".control/" + name + "/snapshot");
    size_t pos = 0;
    while (pos < text.size()) {
        size_t nl = text.find('\n', pos);
        out.push_back(text.substr(pos, nl - pos));
        pos = nl == std::string::npos ? text.size() : nl + 1;
    }
    return out;
}

std::vector<std::string> FsTest::chain_on_disk(const std::string& root) {
    std::vector<std::string> out;
    std::string file = root;
    while (!file.empty() && out.size() < 64) {
        out.push_back(file);
        UniqueFd fd(::openat(dir_fd_.get(), file.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd.valid()) {
            out.push_back("(missing)");
            break;
        }
        uint8_t head[20] = {};
        if (::pread(fd.get(), head, sizeof head, 0) != sizeof head ||
            qcow2::load_be32(head) != qcow2::kMagic) {
            break;
        }
        uint64_t off = qcow2::load_be64(head + 8);
        uint32_t len = qcow2::load_be32(head + 16);
        file.assign(len, '\0');
        if (len != 0 && ::pread(fd.get(), file.data(), len, static_cast<off_t>(off)) != len) {
            file.clear();
        }
    }
    return out;
}

std::vector<std::string> FsTest::open_files() {
    std::vector<std::string> out;
    std::string prefix = std::filesystem::canonical(dir_.path()).string() + "/";
    for (const auto& ent : std::filesystem::directory_iterator("/proc/self/fd")) {
        std::error_code ec;
        std::string target = std::filesystem::read_symlink(ent.path(), ec).string();
        if (!ec && target.rfind(prefix, 0) == 0) {
            out.push_back(target.substr(prefix.size()));
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

bool FsTest::lockable(const std::string& file) {
    UniqueFd fd(::openat(dir_fd_.get(), file.c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) {
        return false;
    }
    // QEMU's lock bytes: 100.. (permissions used) and 200.. (not shared).
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 100;
    fl.l_len = 200;
    return ::fcntl(fd.get(), F_OFD_GETLK, &fl) == 0 && fl.l_type == F_UNLCK;
}

}  // namespace imgfs::test
