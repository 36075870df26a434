// Result<T>/Error: errno plus human context, the error channel of every fallible call.
#pragma once

#include <cassert>
#include <cerrno>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace imgfs {

/// An operating error: an errno value (what a FUSE client or a control write will see) and a
/// human-readable context ("vm1.qcow2: L2 table at 0x50000 is beyond end of file").
struct Error {
    int errnum = EIO;
    std::string context;

    /// "context: strerror(errnum)", or just strerror when there is no context.
    [[nodiscard]] std::string message() const;
    /// Prepends "prefix: " to the context; used as errors cross a layer boundary.
    [[nodiscard]] Error wrap(std::string_view prefix) &&;
};

template <typename... Args>
[[nodiscard]] Error make_error(int errnum, fmt::format_string<Args...> format, Args&&... args) {
    return Error{errnum, fmt::format(format, std::forward<Args>(args)...)};
}

/// Holds either a T or an Error. Shaped like std::expected so it can be swapped for it later.
template <typename T>
class [[nodiscard]] Result {
  public:
    Result(T value)
        : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT(google-explicit-constructor)
    Result(Error error)
        : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT(google-explicit-constructor)

    [[nodiscard]] bool ok() const { return v_.index() == 0; }
    explicit operator bool() const { return ok(); }

    T& value() & {
        assert(ok());
        return std::get<0>(v_);
    }
    const T& value() const& {
        assert(ok());
        return std::get<0>(v_);
    }
    T&& value() && {
        assert(ok());
        return std::get<0>(std::move(v_));
    }
    T& operator*() & { return value(); }
    T&& operator*() && { return std::move(*this).value(); }
    T* operator->() { return &value(); }
    const T* operator->() const { return &value(); }

    Error& error() & {
        assert(!ok());
        return std::get<1>(v_);
    }
    const Error& error() const& {
        assert(!ok());
        return std::get<1>(v_);
    }
    Error&& error() && {
        assert(!ok());
        return std::get<1>(std::move(v_));
    }

  private:
    std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
  public:
    Result() = default;
    Result(Error error) : error_(std::move(error)) {}  // NOLINT(google-explicit-constructor)

    [[nodiscard]] bool ok() const { return !error_.has_value(); }
    explicit operator bool() const { return ok(); }
    void value() const { assert(ok()); }

    Error& error() & {
        assert(!ok());
        return *error_;
    }
    const Error& error() const& {
        assert(!ok());
        return *error_;
    }
    Error&& error() && {
        assert(!ok());
        return std::move(*error_);
    }

  private:
    std::optional<Error> error_;
};

using Status = Result<void>;

inline Status ok_status() {
    return {};
}

}  // namespace imgfs

#define IMGFS_CONCAT_INNER(a, b) a##b
#define IMGFS_CONCAT(a, b) IMGFS_CONCAT_INNER(a, b)

/// Propagates an error from a Result-returning expression in a plain function.
#define TRY(expr)                                  \
    do {                                           \
        auto&& try_result_ = (expr);               \
        if (!try_result_) {                        \
            return std::move(try_result_).error(); \
        }                                          \
    } while (0)

/// Declares `decl` from the value of a Result-returning expression, or propagates its error.
#define TRY_ASSIGN(decl, expr) TRY_ASSIGN_IMPL(IMGFS_CONCAT(try_r_, __LINE__), decl, expr, return )

/// The same two for coroutines (co_return instead of return).
#define CO_TRY(expr)                                  \
    do {                                              \
        auto&& try_result_ = (expr);                  \
        if (!try_result_) {                           \
            co_return std::move(try_result_).error(); \
        }                                             \
    } while (0)
#define CO_TRY_ASSIGN(decl, expr) \
    TRY_ASSIGN_IMPL(IMGFS_CONCAT(try_r_, __LINE__), decl, expr, co_return )

#define TRY_ASSIGN_IMPL(tmp, decl, expr, ret) \
    auto tmp = (expr);                        \
    if (!tmp) {                               \
        ret std::move(tmp).error();           \
    }                                         \
    decl = std::move(tmp).value()
