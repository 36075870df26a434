// ForwardingStore: a Store that passes every call to another one. Tests derive from it and
// override the calls they fail or count, as a directory on a failing disk or a pool does.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "drivers/store.h"

namespace imgfs::test {

class ForwardingStore : public Store {
  public:
    explicit ForwardingStore(std::unique_ptr<Store> inner) : inner_(std::move(inner)) {}

    [[nodiscard]] const StoreCaps& caps() const override { return inner_->caps(); }
    [[nodiscard]] const std::string& display_name() const override {
        return inner_->display_name();
    }
    [[nodiscard]] const std::string& real_path() const override { return inner_->real_path(); }
    [[nodiscard]] std::string own_name(const std::string& recorded) const override {
        return inner_->own_name(recorded);
    }
    [[nodiscard]] std::string recorded_name(const std::string& name) const override {
        return inner_->recorded_name(name);
    }
    [[nodiscard]] std::string external_name(const std::string& recorded) const override {
        return inner_->external_name(recorded);
    }
    Result<std::vector<StoreEntry>> list() override { return inner_->list(); }
    Result<FileId> id_of(const std::string& name, bool follow_links) override {
        return inner_->id_of(name, follow_links);
    }
    Result<std::unique_ptr<StoreFile>> open(const std::string& name, bool read_only,
                                            bool direct) override {
        return inner_->open(name, read_only, direct);
    }
    Task<Result<std::unique_ptr<StoreFile>>> open_from_loop(std::string name,
                                                            FileOptions options) override {
        return inner_->open_from_loop(std::move(name), options);
    }
    Result<std::unique_ptr<StoreFile>> create_exclusive(const std::string& name) override {
        return inner_->create_exclusive(name);
    }
    Status rename_noreplace(const std::string& from, const std::string& to) override {
        return inner_->rename_noreplace(from, to);
    }
    Status add_name(const std::string& existing, const std::string& name) override {
        return inner_->add_name(existing, name);
    }
    Status remove(const std::string& name) override { return inner_->remove(name); }
    Status sync() override { return inner_->sync(); }
    Result<StoreSpace> space() override { return inner_->space(); }
    Status lock_for_serving() override { return inner_->lock_for_serving(); }
    Result<bool> may_be_in_creation(const std::string& name) override {
        return inner_->may_be_in_creation(name);
    }
    Result<bool> open_elsewhere(const std::string& name) override {
        return inner_->open_elsewhere(name);
    }

  protected:
    Store* inner() const { return inner_.get(); }

  private:
    std::unique_ptr<Store> inner_;
};

}  // namespace imgfs::test
