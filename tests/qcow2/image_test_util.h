// Helpers for tests that open real images: qemu-img as the oracle, whole-image reads, chains.
#pragma once

#include <fcntl.h>
#include <string>
#include <vector>

#include "drivers/image_chain.h"
#include "test_util.h"

namespace imgfs::test {

/// Runs a command, failing the test (with its output) if it exits non-zero.
void must(const std::string& cmd);

/// `qemu-img convert -O raw` of `image` (with optional extra args such as -l snapshot.name=s).
std::vector<uint8_t> qemu_convert_raw(const std::string& image, const std::string& extra = "");

struct CheckResult {
    int exit_code = -1;
    uint64_t corruptions = 0;
    uint64_t leaks = 0;
    uint64_t check_errors = 0;
    std::string output;
};
CheckResult qemu_check(const std::string& image);

/// Writes bytes to a file (replacing it).
void write_file(const std::string& path, const std::vector<uint8_t>& data);
std::vector<uint8_t> read_file(const std::string& path);

/// An image directory with an open fd, for open_chain.
class ImageDir : public TempDir {
  public:
    ImageDir() : fd_(::open(path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {}
    [[nodiscard]] int fd() const { return fd_.get(); }

  private:
    UniqueFd fd_;
};

/// Reads the whole node.
Task<Result<std::vector<uint8_t>>> read_all(Node* node);

/// The big-endian 64-bit word at `offset` of a file (a header field, a table entry).
uint64_t be64_at(const std::string& path, uint64_t offset);
/// Overwrites that word (to damage an image on purpose).
void put_be64_at(const std::string& path, uint64_t offset, uint64_t value);

/// First differing offset, or -1.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b);

}  // namespace imgfs::test
