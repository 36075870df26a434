// libFuzzer target: a whole qcow2 image held in memory, opened read-write, read, written,
// zeroed, discarded, grown, flushed, closed and reopened (tests/fuzz/fuzz_drivers.h).
//
// IMGFS_FUZZ_STRICT=1 also aborts when a successful write or zeroing does not read back (off by
// default: a damaged image may lose writes without that being a crash).
// IMGFS_FUZZ_VERBOSE=1 prints the driver's log lines, for replaying one input.
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "fuzz/fuzz_drivers.h"

namespace {

// One loop for the whole process: the in-memory storage never submits I/O, so the loop only
// runs coroutines, and setting up a ring per input would only cost time.
imgfs::EventLoop* fuzz_loop() {
    static std::unique_ptr<imgfs::EventLoop> loop = [] {
        auto l = imgfs::EventLoop::create();
        if (!l.ok()) {
            std::fprintf(stderr, "fuzz_image: %s\n", l.error().message().c_str());
            std::abort();
        }
        return std::move(*l);
    }();
    return loop.get();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const bool strict = std::getenv("IMGFS_FUZZ_STRICT") != nullptr;
    imgfs::fuzz::ImageReport report;
    std::string finding =
        imgfs::fuzz::drive_image(fuzz_loop(), imgfs::ConstBuf(data, size), &report);
    if (imgfs::fuzz::FuzzLogger::verbose()) {
        std::fprintf(stderr,
                     "fuzz_image: opened %d (%s), %d ops, %d failed (%s), %d mismatches (%s), "
                     "reopened %d\n",
                     report.opened, report.open_error.c_str(), report.ops, report.failed_ops,
                     report.first_failure.c_str(), report.mismatches, report.first_mismatch.c_str(),
                     report.reopened);
    }
    if (finding.empty() && strict && report.mismatches != 0) {
        finding = "read after write: " + report.first_mismatch;
    }
    if (!finding.empty()) {
        std::fprintf(stderr, "fuzz_image: %s\n", finding.c_str());
        std::abort();
    }
    return 0;
}
