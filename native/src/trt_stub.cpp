// Built without TensorRT (IQE_WITH_TENSORRT off or TensorRT not found).
#include "iqe/engine.hpp"
#include "iqe/errors.hpp"

namespace iqe {

std::unique_ptr<Backend> make_tensorrt_backend(const std::string&) {
    throw InputError("TensorRT is not compiled into this iqe-native; use --backend onnxruntime");
}

std::string tensorrt_version() { return ""; }

bool tensorrt_compiled() { return false; }

std::pair<std::string, std::string> cuda_device() { return {"", ""}; }

}  // namespace iqe
