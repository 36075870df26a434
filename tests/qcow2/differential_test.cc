// Differential matrix: images built by qemu-img (every version, cluster size, refcount width,
// extended L2, compression type, a 3-deep chain with a shorter raw base, an internal snapshot, a
// dirty lazy-refcounts image, metadata preallocation) must read byte for byte as
// `qemu-img convert -O raw` says; after seeded random writes, zero-writes and discards through our
// driver (aligned and not, small and multi-cluster, several in flight at once) `qemu-img compare`
// with a model must find them identical and `qemu-img check` must find no errors and no leaks.
//
// Every case runs twice, the store being the parameter: on a directory, and on a Ceph pool
// (a throwaway cluster) into which the files qemu-img made are imported with `rbd import`; after
// the writes the top is exported back with `rbd export` for the same qemu-img checks. The test
// body does not know which store it drives.
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "drivers/ceph_util.h"
#include "drivers/local_store.h"
#include "drivers/qcow2/qcow2_node.h"
#include "drivers/rbd/rbd_store.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

using test::must;

struct ImageSpec {
    std::string name;
    uint64_t cluster_size;
    std::function<void(const std::string& dir)> build;
    std::string snapshot = {};  // internal snapshot whose content must survive our writes
};

constexpr uint64_t kMiB = 1ULL << 20;

std::string q(const std::string& dir, const std::string& file) {
    return "'" + dir + "/" + file + "'";
}

// Writes a mix of patterns, zeroes and discards with qemu-io so the image has every kind of
// cluster (data, zero, unallocated, partially written).
void populate(const std::string& image, uint64_t cs, uint64_t size,
              const std::string& fmt = "qcow2") {
    auto n = [](uint64_t v) { return std::to_string(v); };
    std::string cmds;
    auto c = [&](const std::string& s) { cmds += " -c '" + s + "'"; };
    c("write -P 0x11 0 " + n(cs));
    c("write -P 0x22 " + n(3 * cs + 100) + " 5000");
    c("write -P 0x33 " + n(10 * cs) + " " + n(4 * cs));
    c("write -z " + n(12 * cs) + " " + n(cs));
    c("write -P 0x44 " + n(20 * cs) + " " + n(2 * cs));
    c("discard " + n(20 * cs) + " " + n(cs));
    c("write -P 0x55 " + n(size - 8192) + " 8192");
    c("write -P 0x66 " + n(size / 2 + 512) + " " + n(cs / 2 + 512));
    must("qemu-io -f " + fmt + cmds + " '" + image + "' >/dev/null");
}

void plain(const std::string& dir, const std::string& opts, uint64_t cs, uint64_t size) {
    must("qemu-img create -q -f qcow2 -o " + opts + " " + q(dir, "top.qcow2") + " " +
         std::to_string(size));
    populate(dir + "/top.qcow2", cs, size);
}

void compressed(const std::string& dir, const std::string& type) {
    uint64_t size = 32 * kMiB;
    must("qemu-img create -q -f raw " + q(dir, "src.raw") + " " + std::to_string(size));
    populate(dir + "/src.raw", 65536, size, "raw");
    // Partly incompressible data too.
    must("head -c 300000 /dev/urandom > " + q(dir, "rnd") + " && dd if=" + q(dir, "rnd") +
         " of=" + q(dir, "src.raw") + " bs=4096 seek=1000 conv=notrunc status=none");
    must("qemu-img convert -c -O qcow2 -o compression_type=" + type + " " + q(dir, "src.raw") +
         " " + q(dir, "top.qcow2"));
}

void chain(const std::string& dir) {
    uint64_t cs = 65536;
    must("qemu-img create -q -f raw " + q(dir, "base.raw") + " 24M");
    populate(dir + "/base.raw", cs, 24 * kMiB, "raw");
    must("qemu-img create -q -f qcow2 -b base.raw -F raw " + q(dir, "mid.qcow2") + " 48M");
    must("qemu-io -f qcow2 -c 'write -P 0x77 " + std::to_string(2 * cs) + " " +
         std::to_string(3 * cs) + "' -c 'write -z 0 4096' " + q(dir, "mid.qcow2") + " >/dev/null");
    must("qemu-img create -q -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 " +
         q(dir, "top.qcow2") + " 64M");
    must("qemu-io -f qcow2 -c 'write -P 0x88 " + std::to_string(3 * cs + 4096) +
         " 8192' -c 'write -P 0x99 40M 1M' " + q(dir, "top.qcow2") + " >/dev/null");
}

void snapshot(const std::string& dir) {
    uint64_t cs = 65536;
    plain(dir, "cluster_size=65536", cs, 64 * kMiB);
    must("qemu-img snapshot -c s1 " + q(dir, "top.qcow2"));
    must("qemu-io -f qcow2 -c 'write -P 0xab " + std::to_string(10 * cs) + " 4096' " +
         q(dir, "top.qcow2") + " >/dev/null");
}

void dirty_lazy(const std::string& dir) {
    must("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + q(dir, "top.qcow2") + " 64M");
    // qemu-io dies by SIGKILL with refcounts not written: the image is left dirty.
    test::shell(
        "qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 192k' "
        "-c 'sigraise 9' " +
        q(dir, "top.qcow2") + " >/dev/null 2>&1");
    test::CheckResult r = test::qemu_check(dir + "/top.qcow2");
    ASSERT_GT(r.corruptions, 0U) << "the image should be dirty with stale refcounts: " << r.output;
}

std::vector<ImageSpec> specs() {
    return {
        {"v2_64k", 65536, [](const std::string& d) { plain(d, "compat=0.10", 65536, 64 * kMiB); }},
        {"v3_512_refcount1", 512,
         [](const std::string& d) {
             plain(d, "cluster_size=512,refcount_bits=1", 512, 16 * kMiB);
         }},
        {"v3_4k_refcount64", 4096,
         [](const std::string& d) {
             plain(d, "cluster_size=4096,refcount_bits=64", 4096, 64 * kMiB);
         }},
        {"v3_64k", 65536,
         [](const std::string& d) { plain(d, "cluster_size=65536", 65536, 64 * kMiB); }},
        {"v3_2m", 2 * kMiB,
         [](const std::string& d) { plain(d, "cluster_size=2M", 2 * kMiB, 256 * kMiB); }},
        {"extended_l2_64k", 65536,
         [](const std::string& d) { plain(d, "extended_l2=on", 65536, 64 * kMiB); }},
        {"extended_l2_2m", 2 * kMiB,
         [](const std::string& d) {
             plain(d, "extended_l2=on,cluster_size=2M", 2 * kMiB, 128 * kMiB);
         }},
        {"compressed_zlib", 65536, [](const std::string& d) { compressed(d, "zlib"); }},
        {"compressed_zstd", 65536, [](const std::string& d) { compressed(d, "zstd"); }},
        {"chain_raw_qcow2_qcow2", 65536, chain},
        {"internal_snapshot", 65536, snapshot, "s1"},
        {"dirty_lazy_refcounts", 65536, dirty_lazy},
        {"prealloc_metadata", 65536,
         [](const std::string& d) { plain(d, "preallocation=metadata", 65536, 64 * kMiB); }},
    };
}

struct Op {
    int kind;  // 0 write, 1 zero, 2 zero+unmap, 3 discard
    uint64_t offset;
    uint64_t bytes;
    uint8_t seed;
};

// Batches of ops with disjoint ranges, so running a batch concurrently has one right answer.
std::vector<std::vector<Op>> make_ops(uint64_t size, uint64_t cs, uint64_t seed, int count) {
    std::mt19937_64 rng(seed);
    std::vector<std::vector<Op>> batches;
    int made = 0;
    while (made < count) {
        std::vector<Op> batch;
        int k = 1 + static_cast<int>(rng() % 8);
        for (int i = 0; i < k && made < count; ++i) {
            Op op{};
            int r = static_cast<int>(rng() % 10);
            op.kind = r < 6 ? 0 : r < 7 ? 1 : r < 9 ? 2 : 3;
            uint64_t len = 0;
            switch (rng() % 4) {
                case 0:
                    len = 1 + rng() % 9000;  // small, unaligned
                    break;
                case 1:
                    len = cs * (1 + rng() % 3);  // whole clusters
                    break;
                case 2:
                    len = 512 * (1 + rng() % 64);
                    break;
                default:
                    len = 1 + rng() % std::min<uint64_t>(3 * cs, 4 * kMiB);
                    break;
            }
            len = std::min(len, std::min<uint64_t>(4 * kMiB, size));
            uint64_t off = rng() % (size - len + 1);
            if (rng() % 2 == 0) {
                off = align_down(off, rng() % 2 == 0 ? cs : 512);
            }
            // Two writes into one unallocated cluster (disjoint bytes) in the same batch are
            // the case the allocation lock exists for: make them common.
            if (!batch.empty() && rng() % 3 == 0) {
                const Op& prev = batch.back();
                uint64_t cl = align_down(prev.offset, cs);
                off = cl + (prev.offset - cl + prev.bytes + 1) % cs;
                len = std::min<uint64_t>(len, 4096);
                off = std::min(off, size - len);
            }
            op.offset = off;
            op.bytes = len;
            op.seed = static_cast<uint8_t>(rng());
            bool overlap = false;
            for (const Op& o : batch) {
                if (op.offset < o.offset + o.bytes && o.offset < op.offset + op.bytes) {
                    overlap = true;
                }
            }
            if (!overlap) {
                batch.push_back(op);
                ++made;
            }
        }
        batches.push_back(std::move(batch));
    }
    return batches;
}

std::vector<uint8_t> pattern(const Op& op) {
    std::vector<uint8_t> d(op.bytes);
    for (size_t i = 0; i < d.size(); ++i) {
        d[i] = static_cast<uint8_t>(op.seed + i * 7 + (i >> 9));
    }
    return d;
}

Task<void> run_op(Node* node, Op op, Status* out) {
    switch (op.kind) {
        case 0: {
            std::vector<uint8_t> d = pattern(op);
            *out = co_await node->write(op.offset, d);
            break;
        }
        case 1:
            *out = co_await node->write_zeroes(op.offset, op.bytes, false);
            break;
        case 2:
            *out = co_await node->write_zeroes(op.offset, op.bytes, true);
            break;
        default:
            *out = co_await node->discard(op.offset, op.bytes);
            break;
    }
}

Task<Status> apply(Node* node, std::vector<std::vector<Op>> batches, std::vector<uint8_t>* model) {
    TaskScope scope(node->env().loop);
    for (const auto& batch : batches) {
        std::vector<Status> results(batch.size());
        for (size_t i = 0; i < batch.size(); ++i) {
            scope.spawn(run_op(node, batch[i], &results[i]));
        }
        co_await scope.join();
        for (size_t i = 0; i < batch.size(); ++i) {
            const Op& op = batch[i];
            if (!results[i]) {
                co_return make_error(results[i].error().errnum, "op kind {} at {} ({} bytes): {}",
                                     op.kind, op.offset, op.bytes, results[i].error().message());
            }
            auto it = model->begin() + static_cast<std::ptrdiff_t>(op.offset);
            if (op.kind == 0) {
                std::vector<uint8_t> d = pattern(op);
                std::copy(d.begin(), d.end(), it);
            } else if (op.kind == 3) {
                // Discarded content is unspecified: take what the image now shows.
                CO_TRY(co_await node->read(op.offset, MutBuf(&*it, op.bytes)));
            } else {
                std::fill(it, it + static_cast<std::ptrdiff_t>(op.bytes), 0);
            }
        }
    }
    co_return co_await node->flush();
}

ChainOptions read_only_chain() {
    ChainOptions o;
    o.read_only = true;
    return o;
}

enum class StoreKind { directory, pool };

struct Case {
    ImageSpec spec;
    StoreKind store;
};

// Test names instead of byte dumps in failure messages.
void PrintTo(const Case& c, std::ostream* os) {
    *os << c.spec.name << (c.store == StoreKind::pool ? " on a pool" : " in a directory");
}

// On a pool, every spec; with IMGFS_POOL_CASES=some (the sanitizer run, whose time CI must
// save) the ones that touch other paths of the pool: a chain, compressed clusters, internal
// snapshots, 2 MiB clusters.
bool on_pool(const ImageSpec& spec) {
    const char* which = std::getenv("IMGFS_POOL_CASES");
    if (which == nullptr || std::string(which) != "some") {
        return true;
    }
    return spec.name == "chain_raw_qcow2_qcow2" || spec.name == "compressed_zstd" ||
           spec.name == "internal_snapshot" || spec.name == "v3_2m";
}

std::vector<Case> cases() {
    std::vector<Case> out;
    for (StoreKind kind : {StoreKind::directory, StoreKind::pool}) {
        for (ImageSpec& spec : specs()) {
            if (kind == StoreKind::directory || on_pool(spec)) {
                out.push_back(Case{std::move(spec), kind});
            }
        }
    }
    return out;
}

class Differential : public test::LoopTest, public ::testing::WithParamInterface<Case> {
  protected:
    void TearDown() override {
        LoopTest::TearDown();
        cluster_.reset();
    }

    /// Puts the images qemu-img made in `dir` where the store under test keeps them and returns
    /// that store: the directory itself, or a namespace of a fresh cluster's pool holding a copy
    /// of each file.
    std::unique_ptr<Store> make_store(const test::ImageDir& dir) {
        if (GetParam().store == StoreKind::directory) {
            return LocalDirStore::over(dir.fd());
        }
        if (!cluster_) {
            cluster_ = std::make_unique<test::CephCluster>();
            EXPECT_TRUE(cluster_->ok()) << "the test cluster did not start";
            if (!cluster_->ok()) {
                return nullptr;
            }
            expect_rbd("namespace create rbd/" + ns());
            for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
                const std::string name = entry.path().filename().string();
                expect_rbd("import --no-progress '" + entry.path().string() + "' rbd/" + ns() +
                           "/" + name);
            }
        }
        auto store =
            RbdStore::open(RbdLocation{"rbd", ns()}, test::rados_options(*cluster_), loop_.get());
        EXPECT_TRUE(store.ok()) << store.error().message();
        return store.ok() ? std::move(*store) : nullptr;
    }

    /// Brings the pool's copy of `name` back into `dir` for qemu-img (no-op for a directory).
    void fetch_back(const test::ImageDir& dir, const std::string& name) {
        if (GetParam().store == StoreKind::pool) {
            std::filesystem::remove(dir.file(name));
            expect_rbd("export --no-progress rbd/" + ns() + "/" + name + " '" + dir.file(name) +
                       "'");
        }
    }

    void expect_rbd(const std::string& args) {
        int status = 0;
        cluster_->rbd(args, &status);
        EXPECT_EQ(status, 0) << "rbd " << args;
    }
    std::string ns() const { return GetParam().spec.name; }

    std::unique_ptr<test::CephCluster> cluster_;
};

TEST_P(Differential, MatchesQemu) {
    REQUIRE_TOOL("qemu-img");
    REQUIRE_TOOL("qemu-io");
    if (GetParam().store == StoreKind::pool) {
        REQUIRE_CEPH();
    }
    const ImageSpec& spec = GetParam().spec;
    test::ImageDir dir;
    spec.build(dir.path().string());
    if (HasFatalFailure()) {
        return;
    }
    const std::string top = dir.file("top.qcow2");
    std::vector<uint8_t> expected = test::qemu_convert_raw(top);
    std::vector<uint8_t> snap_before;
    if (!spec.snapshot.empty()) {
        snap_before = test::qemu_convert_raw(top, "-l snapshot.name=" + spec.snapshot);
    }
    std::unique_ptr<Store> store = make_store(dir);
    ASSERT_TRUE(store != nullptr && !HasFailure());

    // Every byte read through our driver (read-only) equals qemu-img's conversion.
    {
        auto chain = run(open_chain(env(), store.get(), "top.qcow2", read_only_chain()));
        ASSERT_TRUE(chain.ok()) << chain.error().message();
        auto data = run(test::read_all(chain->top().get()));
        ASSERT_TRUE(data.ok()) << data.error().message();
        ASSERT_EQ(test::first_difference(*data, expected), -1) << "read differs from qemu-img";
        ASSERT_TRUE(run(close_chain(&*chain)).ok());
    }

    // Random writes against a model.
    std::vector<uint8_t> model = expected;
    {
        auto chain = run(open_chain(env(), store.get(), "top.qcow2", ChainOptions{}));
        ASSERT_TRUE(chain.ok()) << chain.error().message();
        use_rw(chain->top());
        // In a pool the top's lock is taken on the first write, which its writer claims.
        ASSERT_TRUE(run(chain->top()->claim_writes()).ok());
        auto ops = make_ops(model.size(), spec.cluster_size, 1234, 400);
        Status st = run(apply(chain->top().get(), ops, &model));
        ASSERT_TRUE(st.ok()) << st.error().message();
        auto data = run(test::read_all(chain->top().get()));
        ASSERT_TRUE(data.ok()) << data.error().message();
        EXPECT_EQ(test::first_difference(*data, model), -1)
            << "our own reads disagree with the model";
        users_.clear();
        ASSERT_TRUE(run(close_chain(&*chain)).ok());
    }
    store.reset();
    fetch_back(dir, "top.qcow2");
    test::write_file(dir.file("model.raw"), model);
    must("qemu-img compare -q -f raw -F qcow2 '" + dir.file("model.raw") + "' '" + top + "'");
    test::CheckResult check = test::qemu_check(top);
    EXPECT_EQ(check.exit_code, 0) << check.output;
    EXPECT_EQ(check.corruptions, 0U) << check.output;
    EXPECT_EQ(check.leaks, 0U) << check.output;
    if (!spec.snapshot.empty()) {
        EXPECT_EQ(
            test::first_difference(test::qemu_convert_raw(top, "-l snapshot.name=" + spec.snapshot),
                                   snap_before),
            -1)
            << "the internal snapshot changed";
    }
}

INSTANTIATE_TEST_SUITE_P(Matrix, Differential, ::testing::ValuesIn(cases()),
                         [](const auto& param_info) {
                             const Case& c = param_info.param;
                             return c.spec.name +
                                    (c.store == StoreKind::pool ? "_pool" : "_directory");
                         });

}  // namespace
}  // namespace imgfs
