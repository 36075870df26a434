#include "core/backend.h"

#include "core/transaction.h"

namespace imgfs {

Child* BlockBackend::attach(Transaction* tx, std::shared_ptr<Node> node, Perms perm, Perms shared) {
    return tx->attach(this, std::move(node), ChildRole::kUser, "root", perm, shared);
}

bool BlockBackend::writable() const {
    return root() != nullptr && (root()->perm() & perm::kWrite) != 0;
}

Status BlockBackend::check_writable() const {
    if (root() == nullptr) {
        return make_error(ENODEV, "{} has no image attached", name_);
    }
    if (!writable()) {
        return make_error(EROFS, "{} is read-only", name_);
    }
    return {};
}

Task<Status> BlockBackend::read(uint64_t offset, MutBuf buf) {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    if (root() == nullptr) {
        co_return make_error(ENODEV, "{} has no image attached", name_);
    }
    InFlightGuard guard(this);
    co_return co_await root()->read(offset, buf);
}

Task<Status> BlockBackend::write(uint64_t offset, ConstBuf buf) {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    CO_TRY(check_writable());
    InFlightGuard guard(this);
    co_return co_await root()->write(offset, buf);
}

Task<Status> BlockBackend::write_zeroes(uint64_t offset, uint64_t bytes, bool may_unmap) {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    CO_TRY(check_writable());
    InFlightGuard guard(this);
    co_return co_await root()->write_zeroes(offset, bytes, may_unmap);
}

Task<Status> BlockBackend::discard(uint64_t offset, uint64_t bytes) {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    CO_TRY(check_writable());
    InFlightGuard guard(this);
    co_return co_await root()->discard(offset, bytes);
}

Task<Status> BlockBackend::flush() {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    if (root() == nullptr) {
        co_return make_error(ENODEV, "{} has no image attached", name_);
    }
    InFlightGuard guard(this);
    co_return co_await root()->flush();
}

Task<Status> BlockBackend::truncate(uint64_t new_size) {
    if (quiesced()) {
        co_await wait_unquiesced();
    }
    CO_TRY(check_writable());
    if ((root()->perm() & perm::kResize) == 0) {
        co_return make_error(EPERM, "{} may not change its size", name_);
    }
    InFlightGuard guard(this);
    co_return co_await root()->truncate(new_size);
}

}  // namespace imgfs
