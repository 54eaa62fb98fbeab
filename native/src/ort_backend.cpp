// ONNX Runtime backend through its C++ API (header-only wrappers over the versioned C API:
// headers of 1.21 or later drive any newer libonnxruntime).
#include <onnxruntime_cxx_api.h>
#include <sched.h>
#include <sys/utsname.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <thread>

#include "iqe/engine.hpp"
#include "iqe/errors.hpp"

namespace iqe {
namespace {

int available_cpus() {  // len(os.sched_getaffinity(0)), as the Python runner uses
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    return int(std::thread::hardware_concurrency());
}

float half_to_float(std::uint16_t h) {
    return static_cast<float>(Ort::Float16_t::FromBits(h));
}

class OrtBackend final : public Backend {
public:
    OrtBackend(const std::string& onnx_path, int threads, bool optimize, const std::string& precision)
        : env_(ORT_LOGGING_LEVEL_ERROR, "iqe-native"), session_(nullptr) {
        Ort::SessionOptions opts;
        // The Python OrtRunner's settings: the artefact `iqe build` optimised is opened as it
        // is (optimisation off, the same graph Python runs); one intra-op thread per CPU.
        opts.SetGraphOptimizationLevel(optimize ? GraphOptimizationLevel::ORT_ENABLE_ALL
                                                : GraphOptimizationLevel::ORT_DISABLE_ALL);
        opts.SetIntraOpNumThreads(threads > 0 ? threads : available_cpus());
        opts.SetLogSeverityLevel(3);
        // A GPU build of ONNX Runtime (onnxruntime-gpu's library): CUDA first, CPU for the
        // rest, fp32 without TF32, like the Python runner (not executed here: CPU wheel).
        const auto providers = Ort::GetAvailableProviders();
        if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") != providers.end()) {
            const OrtApi& api = Ort::GetApi();
            OrtCUDAProviderOptionsV2* cuda = nullptr;
            Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
            std::unique_ptr<OrtCUDAProviderOptionsV2, decltype(api.ReleaseCUDAProviderOptions)> guard(
                cuda, api.ReleaseCUDAProviderOptions);
            const char* keys[] = {"use_tf32"};
            const char* values[] = {precision == "fp32" ? "0" : "1"};
            Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
            opts.AppendExecutionProvider_CUDA_V2(*cuda);
        }
        session_ = Ort::Session(env_, onnx_path.c_str(), opts);
        Ort::AllocatorWithDefaultOptions alloc;
        for (std::size_t i = 0; i < session_.GetOutputCount(); ++i)
            output_names_.push_back(session_.GetOutputNameAllocated(i, alloc).get());
        input_name_ = session_.GetInputNameAllocated(0, alloc).get();
        input_type_ = session_.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetElementType();
    }

    std::string name() const override { return "onnxruntime"; }

    Outputs infer(const float* images, int batch, int size) override {
        try {
            return run(images, batch, size);
        } catch (const Ort::Exception& e) {
            throw Error(std::string("onnxruntime: ") + e.what());
        }
    }

private:
    Outputs run(const float* images, int batch, int size) {
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        const std::array<std::int64_t, 4> shape{batch, 3, size, size};
        const std::size_t count = std::size_t(batch) * 3 * size * size;
        std::vector<Ort::Float16_t> half;
        Ort::Value input{nullptr};
        if (input_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
            half.reserve(count);
            for (std::size_t i = 0; i < count; ++i) half.emplace_back(images[i]);
            input = Ort::Value::CreateTensor<Ort::Float16_t>(mem, half.data(), count, shape.data(), shape.size());
        } else {
            input = Ort::Value::CreateTensor<float>(mem, const_cast<float*>(images), count, shape.data(), shape.size());
        }
        std::vector<const char*> names;
        for (const auto& n : output_names_) names.push_back(n.c_str());
        const char* in_name = input_name_.c_str();
        auto values = session_.Run(Ort::RunOptions{nullptr}, &in_name, &input, 1, names.data(), names.size());
        Outputs out;
        for (std::size_t i = 0; i < values.size(); ++i) {
            auto info = values[i].GetTensorTypeAndShapeInfo();
            Tensor t;
            t.shape = info.GetShape();
            const std::size_t n = info.GetElementCount();
            t.data.resize(n);
            if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
                const auto* src = values[i].GetTensorData<std::uint16_t>();
                for (std::size_t k = 0; k < n; ++k) t.data[k] = half_to_float(src[k]);
            } else if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
                const float* src = values[i].GetTensorData<float>();
                std::copy(src, src + n, t.data.begin());
            } else {
                throw Error("onnxruntime: output " + output_names_[i] + " is neither float32 nor float16");
            }
            out.emplace(output_names_[i], std::move(t));
        }
        return out;
    }

    Ort::Env env_;
    Ort::Session session_;
    std::vector<std::string> output_names_;
    std::string input_name_;
    ONNXTensorElementDataType input_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};

}  // namespace

std::unique_ptr<Backend> make_onnxruntime_backend(const std::string& onnx_path, int threads, bool optimize,
                                                  const std::string& precision) {
    try {
        return std::make_unique<OrtBackend>(onnx_path, threads, optimize, precision);
    } catch (const Ort::Exception& e) {
        throw Error(onnx_path + ": onnxruntime cannot load the graph (" + e.what() + ")");
    }
}

std::string onnxruntime_version() { return OrtGetApiBase()->GetVersionString(); }

std::vector<std::string> onnxruntime_providers() { return Ort::GetAvailableProviders(); }

// onnxruntime_backend.py OrtBackend.device / cpu_name.
std::string onnxruntime_device() {
    const auto providers = onnxruntime_providers();
    for (const char* gpu : {"TensorrtExecutionProvider", "CUDAExecutionProvider"})
        if (std::find(providers.begin(), providers.end(), gpu) != providers.end()) return std::string("cuda (") + gpu + ")";
    struct utsname u {};
    const std::string machine = ::uname(&u) == 0 ? u.machine : "";
    std::string cpu;
    std::ifstream in("/proc/cpuinfo");
    for (std::string line; std::getline(in, line);) {
        if (line.rfind("model name", 0) == 0) {
            cpu = line.substr(line.find(':') + 1);
            const auto first = cpu.find_first_not_of(" \t"), last = cpu.find_last_not_of(" \t\r");
            cpu = first == std::string::npos ? "" : cpu.substr(first, last - first + 1);
            break;
        }
    }
    if (cpu.empty()) cpu = "unknown";  // platform.processor() is "" on Linux
    return "cpu (" + machine + ", " + cpu + ")";
}

}  // namespace iqe
