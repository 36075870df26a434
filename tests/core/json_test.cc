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

}  // namespace
}  // namespace imgfs
