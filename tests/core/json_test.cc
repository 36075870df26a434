#include "core/json.h"

#include <gtest/gtest.h>

namespace imgfs {
namespace {

TEST(JsonTest, NestedContainersAndEscapes) {
    JsonWriter w;
    w.begin_object();
    w.field("name", "vm\"1\n");
    w.field("size", uint64_t{1} << 40);
    w.field("ok", true);
    w.key("layers");
    w.begin_array();
    w.begin_object();
    w.field("file", "a.qcow2");
    w.end_object();
    w.value(int64_t{-3});
    w.null();
    w.end_array();
    w.end_object();
    EXPECT_EQ(
        w.str(),
        R"({"name":"vm\"1\n","size":1099511627776,"ok":true,"layers":[{"file":"a.qcow2"},-3,null]})");
}

TEST(JsonTest, ControlCharactersAreEscaped) {
    EXPECT_EQ(json_quote("a\x01"), "\"a\\u0001\"");
}

// What `info` and `jobs` echo (a file name, a refused command) need not be UTF-8; the JSON
// must be, or strict parsers (Python's json) reject the whole document.
TEST(JsonTest, BytesThatAreNotUtf8BecomeReplacementCharacters) {
    EXPECT_EQ(json_quote("base=\xff"), "\"base=\\ufffd\"");
    EXPECT_EQ(json_quote("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
              "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");          // kept as they are
    EXPECT_EQ(json_quote("\xc3"), "\"\\ufffd\"");                        // cut short
    EXPECT_EQ(json_quote("\xc0\xaf"), "\"\\ufffd\\ufffd\"");             // overlong '/'
    EXPECT_EQ(json_quote("\xed\xa0\x80"), "\"\\ufffd\\ufffd\\ufffd\"");  // a surrogate
    EXPECT_EQ(json_quote("\xf4\x90\x80\x80"), "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");  // past U+10FFFF
    EXPECT_EQ(json_quote("\xe2\x82x"), "\"\\ufffd\\ufffdx\"");
}

}  // namespace
}  // namespace imgfs
