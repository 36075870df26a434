// JsonWriter: a small streaming JSON writer for control files and status output.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace imgfs {

class JsonWriter {
  public:
    void begin_object();
    void end_object();
    void begin_array();
    void end_array();
    /// Starts a member of the current object; follow with one value or container.
    void key(std::string_view k);

    void value(std::string_view s);
    void value(const char* s) { value(std::string_view(s)); }
    void value(const std::string& s) { value(std::string_view(s)); }
    void value(bool b);
    void value(int64_t v);
    void value(uint64_t v);
    void value(int v) { value(static_cast<int64_t>(v)); }
    void value(unsigned v) { value(static_cast<uint64_t>(v)); }
    void value(double v);
    void null();
    /// Inserts an already-serialised JSON value.
    void raw(std::string_view json);

    template <typename T>
    void field(std::string_view k, const T& v) {
        key(k);
        value(v);
    }

    [[nodiscard]] const std::string& str() const { return out_; }
    std::string take() { return std::move(out_); }

  private:
    void before_value();

    std::string out_;
    // One entry per open container: whether it already has an element.
    std::vector<bool> has_element_;
    bool after_key_ = false;
};

/// `s` as a JSON string literal, quotes included.
std::string json_quote(std::string_view s);

}  // namespace imgfs
