// Errors inside libiqe. C++ callers catch iqe::Error; the C API (iqe.h) turns every
// exception into a status code and a message, so none crosses the C boundary.
#pragma once

#include <stdexcept>
#include <string>

namespace iqe {

// Base of libiqe's exceptions.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Bad input the user can fix (a file, an option): one line naming the item and the reason.
struct InputError : Error {
    using Error::Error;
};

// The engine on disk does not match its sources or this machine (same text as the Python
// loader's EngineMismatch).
struct EngineMismatch : InputError {
    using InputError::InputError;
};

}  // namespace iqe
