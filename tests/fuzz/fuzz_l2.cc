// libFuzzer target: the L2 entry helpers (types, runs, problems, compressed descriptors, the
// table encoding). Byte 0 chooses the geometry, the rest is a table (tests/fuzz/fuzz_drivers.h).
#include <cstdio>
#include <cstdlib>

#include "fuzz/fuzz_drivers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string finding = imgfs::fuzz::drive_l2(imgfs::ConstBuf(data, size));
    if (!finding.empty()) {
        std::fprintf(stderr, "fuzz_l2: %s\n", finding.c_str());
        std::abort();
    }
    return 0;
}
