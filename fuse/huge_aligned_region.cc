#include "fuse/huge_aligned_region.h"

#include <sys/mman.h>

namespace imgfs {

HugeAlignedRegion::HugeAlignedRegion(size_t bytes) {
    // One huge page more than asked, so that an aligned start fits; the slack stays mapped
    // (address space only) and is unmapped with the rest.
    const size_t want = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* p = ::mmap(nullptr, want + kHugePageBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        return;
    }
    mapping_ = static_cast<uint8_t*>(p);
    mapped_bytes_ = want + kHugePageBytes;
    auto addr = reinterpret_cast<uintptr_t>(mapping_);
    base_ = mapping_ + ((kHugePageBytes - addr % kHugePageBytes) % kHugePageBytes);
}

HugeAlignedRegion::~HugeAlignedRegion() {
    if (mapping_ != nullptr) {
        ::munmap(mapping_, mapped_bytes_);
    }
}

}  // namespace imgfs
