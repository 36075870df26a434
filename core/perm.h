// Permissions on graph edges. Each edge says what its user does with the node (perm) and what it
// lets every other user of that node do (shared). Two users conflict when one needs something
// the other does not share.
#pragma once

#include <cstdint>
#include <string>

namespace imgfs {

using Perms = uint32_t;

namespace perm {
/// The node's content must stay what this user last saw unless this user changes it.
inline constexpr Perms kConsistentRead = 1U << 0;
/// Writes that change guest-visible data.
inline constexpr Perms kWrite = 1U << 1;
/// Writes that leave guest-visible data as it was (copying data a layer above already shows).
inline constexpr Perms kWriteUnchanged = 1U << 2;
/// Changing the size.
inline constexpr Perms kResize = 1U << 3;
inline constexpr Perms kAll = kConsistentRead | kWrite | kWriteUnchanged | kResize;
}  // namespace perm

/// "consistent-read|write", for messages.
std::string perms_to_string(Perms p);

}  // namespace imgfs
