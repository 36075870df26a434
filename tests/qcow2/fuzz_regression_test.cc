// The fuzz targets' inputs, replayed through the code the targets run (tests/fuzz/fuzz_drivers.h),
// so that this suite needs no libFuzzer and builds with gcc too.
//
//  * FuzzRegression: every crash the fuzzers found is stored under
//    tests/fuzz/regressions/<target>/<name> and runs here as test <target>_<name>. Each must
//    come back without a finding, and (unbounded memory was one of the bugs) without making
//    the process grow by more than a budget.
//  * FuzzDrivers: the drivers on valid images built in memory, with trailing bytes that steer
//    the operations. On a valid image every successful write must read back as written, so
//    here that is checked as well (the fuzzer cannot: its images are damaged).
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <sys/resource.h>

#include "drivers/qcow2/create.h"
#include "fuzz/fuzz_drivers.h"
#include "qcow2/image_test_util.h"
#include "test_util.h"

namespace imgfs {
namespace {

// Growth of the process's peak RSS one stored input may cause. Legitimate runs stay far below:
// the storage grows by at most 48 MiB, tables and caches are bounded by the format's limits.
constexpr uint64_t kMemoryBudgetBytes = 384ULL << 20;

struct StoredInput {
    std::string target;  // fuzz_header, fuzz_image, fuzz_l2
    std::string name;
    std::string path;
};

// For gtest's listing: the file rather than the bytes of the struct.
[[maybe_unused]] void PrintTo(const StoredInput& in, std::ostream* os) {
    *os << in.target << "/" << in.name;
}

std::vector<StoredInput> stored_inputs() {
    std::vector<StoredInput> out;
    const std::filesystem::path root =
        std::filesystem::path(IMGFS_SOURCE_DIR) / "tests" / "fuzz" / "regressions";
    std::error_code ec;
    for (const auto& dir : std::filesystem::directory_iterator(root, ec)) {
        if (!dir.is_directory()) {
            continue;
        }
        for (const auto& file : std::filesystem::directory_iterator(dir.path(), ec)) {
            if (file.is_regular_file()) {
                out.push_back({dir.path().filename().string(), file.path().filename().string(),
                               file.path().string()});
            }
        }
    }
    std::sort(out.begin(), out.end(), [](const StoredInput& a, const StoredInput& b) {
        return a.target != b.target ? a.target < b.target : a.name < b.name;
    });
    return out;
}

std::string test_name(const StoredInput& in) {
    std::string s = in.target + "_" + in.name;
    std::replace_if(
        s.begin(), s.end(),
        [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) == 0; }, '_');
    return s;
}

uint64_t peak_rss_bytes() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return static_cast<uint64_t>(u.ru_maxrss) * 1024;
}

class FuzzRegression : public test::LoopTest, public ::testing::WithParamInterface<StoredInput> {};

TEST_P(FuzzRegression, RunsCleanly) {
    const StoredInput& in = GetParam();
    const std::vector<uint8_t> bytes = test::read_file(in.path);
    ASSERT_FALSE(bytes.empty()) << in.path;
    const uint64_t rss_before = peak_rss_bytes();
    std::string finding;
    if (in.target == "fuzz_header") {
        finding = fuzz::drive_header(bytes);
    } else if (in.target == "fuzz_l2") {
        finding = fuzz::drive_l2(bytes);
    } else if (in.target == "fuzz_image") {
        fuzz::ImageReport report;
        finding = fuzz::drive_image(loop_.get(), bytes, &report);
        std::printf("%s: opened %d (%s), %d ops, %d failed (%s), reopened %d\n", in.name.c_str(),
                    report.opened, report.open_error.c_str(), report.ops, report.failed_ops,
                    report.first_failure.c_str(), report.reopened);
    } else {
        FAIL() << "no fuzz target is called " << in.target << " (" << in.path << ")";
    }
    EXPECT_EQ(finding, "") << in.path;
    const uint64_t grown = peak_rss_bytes() - rss_before;
    EXPECT_LE(grown, kMemoryBudgetBytes)
        << in.path << ": the process grew by " << (grown >> 20) << " MiB for one input";
}

INSTANTIATE_TEST_SUITE_P(Stored, FuzzRegression, ::testing::ValuesIn(stored_inputs()),
                         [](const auto& param_info) { return test_name(param_info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FuzzRegression);

// A moved or renamed folder would otherwise make the cases above vanish without a failure.
TEST(FuzzRegressionInputs, TheStoredInputsAreFound) {
    EXPECT_FALSE(stored_inputs().empty()) << "nothing found under tests/fuzz/regressions";
}

// ---- the drivers on valid images ----

struct ImageCase {
    const char* name;
    qcow2::CreateOptions options;
};

std::vector<ImageCase> image_cases() {
    auto make = [](uint32_t version, uint32_t cluster, uint32_t refcount_bits, bool extended_l2,
                   bool lazy, const char* backing) {
        qcow2::CreateOptions o;
        o.size = 3ULL << 20;
        o.version = version;
        o.cluster_size = cluster;
        o.refcount_bits = refcount_bits;
        o.extended_l2 = extended_l2;
        o.lazy_refcounts = lazy;
        if (backing != nullptr) {
            o.backing_file = backing;
            o.backing_format = "raw";
        }
        return o;
    };
    return {
        {"v2_64k", make(2, 65536, 16, false, false, nullptr)},
        {"v3_512", make(3, 512, 16, false, false, nullptr)},
        {"v3_4k_refcount1", make(3, 4096, 1, false, false, nullptr)},
        {"v3_4k_refcount64", make(3, 4096, 64, false, false, nullptr)},
        {"extl2_16k", make(3, 16384, 16, true, false, nullptr)},
        {"lazy_4k", make(3, 4096, 16, false, true, nullptr)},
        {"v2_backing", make(2, 4096, 16, false, false, "base.raw")},
        {"v3_backing_extl2", make(3, 32768, 16, true, false, "base.raw")},
    };
}

class FuzzDrivers : public test::LoopTest {};

TEST_F(FuzzDrivers, ValidImagesReadBackWhatWasWritten) {
    std::mt19937_64 rng(20240611);
    int opened = 0;
    int ops = 0;
    for (const ImageCase& ic : image_cases()) {
        Result<std::vector<uint8_t>> image = qcow2::build_new_image(ic.options);
        ASSERT_TRUE(image.ok()) << ic.name << ": " << image.error().message();
        for (int variant = 0; variant < 12; ++variant) {
            // Trailing bytes (leaked space, as far as the format is concerned) that choose the
            // storage, the caches and the operations.
            std::vector<uint8_t> input = *image;
            std::vector<uint8_t> tail = test::random_bytes(&rng, 64);
            input.insert(input.end(), tail.begin(), tail.end());
            fuzz::ImageReport report;
            std::string finding = fuzz::drive_image(loop_.get(), input, &report);
            EXPECT_EQ(finding, "") << ic.name << " variant " << variant;
            EXPECT_TRUE(report.opened)
                << ic.name << " variant " << variant << ": " << report.open_error;
            EXPECT_EQ(report.mismatches, 0)
                << ic.name << " variant " << variant << ": " << report.first_mismatch;
            EXPECT_TRUE(report.reopened) << ic.name << " variant " << variant;
            opened += report.opened ? 1 : 0;
            ops += report.ops;
        }
    }
    std::printf("%d images opened, %d operations\n", opened, ops);
}

TEST_F(FuzzDrivers, HeadersOfValidImagesRoundTrip) {
    for (const ImageCase& ic : image_cases()) {
        Result<std::vector<uint8_t>> image = qcow2::build_new_image(ic.options);
        ASSERT_TRUE(image.ok()) << ic.name << ": " << image.error().message();
        std::vector<uint8_t> first(
            image->begin(),
            image->begin() + std::min<std::ptrdiff_t>(static_cast<std::ptrdiff_t>(image->size()),
                                                      ic.options.cluster_size));
        EXPECT_EQ(fuzz::drive_header(first), "") << ic.name;
        EXPECT_EQ(fuzz::drive_header(*image), "") << ic.name;
    }
}

TEST_F(FuzzDrivers, L2HelpersAgreeOnRandomTables) {
    std::mt19937_64 rng(7);
    for (int i = 0; i < 256; ++i) {
        std::vector<uint8_t> input = test::random_bytes(&rng, 1 + 16 * 64);
        // Mostly plausible entries: clear the reserved bits of some words.
        for (size_t e = 0; e + 8 <= input.size() - 1; e += 16) {
            if (rng() % 2 == 0) {
                input[1 + e + 1] = 0;
                input[1 + e + 7] &= 0x01;
            }
        }
        EXPECT_EQ(fuzz::drive_l2(input), "") << "table " << i;
    }
}

}  // namespace
}  // namespace imgfs
