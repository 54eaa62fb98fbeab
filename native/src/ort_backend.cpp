// ONNX Runtime backend through its C++ API (header-only wrappers over the versioned C API:
// headers of 1.21 or later drive any newer libonnxruntime).
#include <onnxruntime_cxx_api.h>
#include <sched.h>

#include <algorithm>
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
    OrtBackend(const std::string& onnx_path, int threads)
        : env_(ORT_LOGGING_LEVEL_ERROR, "iqe-native"), session_(nullptr) {
        Ort::SessionOptions opts;
        // The Python OrtRunner's settings: every graph optimisation, one intra-op thread per CPU.
        opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
        opts.SetIntraOpNumThreads(threads > 0 ? threads : available_cpus());
        opts.SetLogSeverityLevel(3);
        // A GPU build of ONNX Runtime (onnxruntime-gpu's library): CUDA first, CPU for the
        // rest, like the Python runner's provider preference (not executed here: CPU wheel).
        const auto providers = Ort::GetAvailableProviders();
        if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") != providers.end()) {
            OrtCUDAProviderOptions cuda{};
            opts.AppendExecutionProvider_CUDA(cuda);
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

std::unique_ptr<Backend> make_onnxruntime_backend(const std::string& onnx_path, int threads) {
    try {
        return std::make_unique<OrtBackend>(onnx_path, threads);
    } catch (const Ort::Exception& e) {
        throw Error(onnx_path + ": onnxruntime cannot load the graph (" + e.what() + ")");
    }
}

std::string onnxruntime_version() { return OrtGetApiBase()->GetVersionString(); }

}  // namespace iqe
