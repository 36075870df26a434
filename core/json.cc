#include "core/json.h"

#include <cassert>
#include <cmath>

#include <fmt/format.h>

namespace imgfs {

std::string json_quote(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for (char ch : s) {
        auto c = static_cast<unsigned char>(ch);
        switch (c) {
            case '"':
                out += "\\\"";
                break;
            case '\\':
                out += "\\\\";
                break;
            case '\n':
                out += "\\n";
                break;
            case '\r':
                out += "\\r";
                break;
            case '\t':
                out += "\\t";
                break;
            default:
                if (c < 0x20) {
                    out += fmt::format("\\u{:04x}", c);
                } else {
                    out += ch;
                }
        }
    }
    out += '"';
    return out;
}

void JsonWriter::before_value() {
    if (after_key_) {
        after_key_ = false;
        return;
    }
    if (!has_element_.empty()) {
        if (has_element_.back()) {
            out_ += ',';
        }
        has_element_.back() = true;
    }
}

void JsonWriter::begin_object() {
    before_value();
    out_ += '{';
    has_element_.push_back(false);
}

void JsonWriter::end_object() {
    assert(!has_element_.empty());
    has_element_.pop_back();
    out_ += '}';
}

void JsonWriter::begin_array() {
    before_value();
    out_ += '[';
    has_element_.push_back(false);
}

void JsonWriter::end_array() {
    assert(!has_element_.empty());
    has_element_.pop_back();
    out_ += ']';
}

void JsonWriter::key(std::string_view k) {
    before_value();
    out_ += json_quote(k);
    out_ += ':';
    after_key_ = true;
}

void JsonWriter::value(std::string_view s) {
    before_value();
    out_ += json_quote(s);
}

void JsonWriter::value(bool b) {
    before_value();
    out_ += b ? "true" : "false";
}

void JsonWriter::value(int64_t v) {
    before_value();
    out_ += fmt::format("{}", v);
}

void JsonWriter::value(uint64_t v) {
    before_value();
    out_ += fmt::format("{}", v);
}

void JsonWriter::value(double v) {
    before_value();
    if (std::isfinite(v)) {
        out_ += fmt::format("{}", v);
    } else {
        out_ += "null";
    }
}

void JsonWriter::raw(std::string_view json) {
    before_value();
    out_ += json;
}

void JsonWriter::null() {
    before_value();
    out_ += "null";
}

}  // namespace imgfs
