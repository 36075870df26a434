// parse_command: what one write to a control file may carry.
#include "fuse/control.h"

#include <string>

#include <gtest/gtest.h>

namespace imgfs {
namespace {

std::string refusal(std::string_view written) {
    Result<std::string> r = parse_command(written);
    return r ? std::string() : r.error().context;
}

TEST(ParseCommand, OneLineWithOrWithoutItsNewline) {
    EXPECT_EQ(*parse_command("s1\n"), "s1");
    EXPECT_EQ(*parse_command("base=vm.qcow2"), "base=vm.qcow2");
    EXPECT_EQ(*parse_command("\n"), "");
}

TEST(ParseCommand, RefusalsSayWhatIsWrong) {
    EXPECT_NE(refusal("a\nb\n").find("one write carries one command"), std::string::npos);
    EXPECT_NE(refusal("s1\r\n").find("carriage return"), std::string::npos);
    EXPECT_NE(refusal(std::string("s\0"
                                  "1\n",
                                  4))
                  .find("NUL byte"),
              std::string::npos);
    EXPECT_NE(refusal(std::string(kMaxCommandWrite, 'a')).find("bytes or more"), std::string::npos);
    // A long write without a newline may be the first piece a shell wrote of a longer line.
    EXPECT_NE(refusal(std::string(kMinPieceBytes, 'a')).find("without a line end"),
              std::string::npos);
    EXPECT_EQ(refusal(std::string(kMinPieceBytes, 'a') + "\n"), "");
}

}  // namespace
}  // namespace imgfs
