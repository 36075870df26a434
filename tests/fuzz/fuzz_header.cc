// libFuzzer target: qcow2 header and extension parsing, the serialise/parse round trip, and
// the snapshot table parser. The input is an image's first cluster (tests/fuzz/fuzz_drivers.h).
#include <cstdio>
#include <cstdlib>

#include "fuzz/fuzz_drivers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string finding = imgfs::fuzz::drive_header(imgfs::ConstBuf(data, size));
    if (!finding.empty()) {
        std::fprintf(stderr, "fuzz_header: %s\n", finding.c_str());
        std::abort();
    }
    return 0;
}
