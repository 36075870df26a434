#include "core/json.h"

#include <cassert>
#include <cmath>

#include <fmt/format.h>

namespace imgfs {

namespace {

// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629: no overlong
// forms, no surrogates, nothing past U+10FFFF), or 0.
size_t utf8_sequence(std::string_view s) {
    auto at = [&s](size_t i) { return static_cast<unsigned char>(s[i]); };
    const unsigned char c = at(0);
    size_t n = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80;
        hi = c == 0xED ? 0x9F : 0xBF;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        lo = c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xF4 ? 0x8F : 0xBF;
    } else {
        return 0;
    }
    if (s.size() < n || at(1) < lo || at(1) > hi) {
        return 0;
    }
    for (size_t i = 2; i < n; ++i) {
        if (at(i) < 0x80 || at(i) > 0xBF) {
            return 0;
        }
    }
    return n;
}

}  // namespace

std::string json_quote(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for (size_t i = 0; i < s.size(); ++i) {
        const char ch = s[i];
        auto c = static_cast<unsigned char>(ch);
        if (c >= 0x80) {
            // JSON is Unicode: a byte that is not part of well-formed UTF-8 (a file name or
            // a command in another encoding, echoed in an error) becomes U+FFFD.
            const size_t n = utf8_sequence(s.substr(i));
            if (n == 0) {
                out += "\\ufffd";
            } else {
                out.append(s.substr(i, n));
                i += n - 1;
            }
            continue;
        }
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
