// TensorRT backend: a serialized plan from `iqe build --backend tensorrt` run through the
// TensorRT 10 C++ runtime (name-based I/O tensors, enqueueV3). Compiled only with
// -DIQE_WITH_TENSORRT=ON where TensorRT and the CUDA runtime are found. Written against
// the official headers (NvInfer.h, cuda_runtime_api.h); never compiled or run on this
// project's machines (no GPU, no TensorRT).
#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>

#include "iqe/engine.hpp"
#include "iqe/errors.hpp"

namespace iqe {
namespace {

class Logger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
        if (severity <= Severity::kERROR && msg != nullptr) last_error = msg;
    }
    std::string last_error;
};

void cuda_check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(status));
}

struct CudaFree {
    void operator()(void* p) const { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<void, CudaFree>;

DeviceBuffer device_alloc(std::size_t bytes) {
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes), "cudaMalloc");
    return DeviceBuffer(p);
}

float half_bits_to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000) << 16;
    std::uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                --exp;
            }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

std::size_t element_size(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: return 4;
        case nvinfer1::DataType::kHALF: return 2;
        default: throw Error("tensorrt: the plan has an I/O tensor that is neither float32 nor float16");
    }
}

class TrtBackend final : public Backend {
public:
    explicit TrtBackend(const std::string& plan_path) {
        std::ifstream in(plan_path, std::ios::binary);
        if (!in) throw InputError(plan_path + ": plan file missing; rebuild the engine with `iqe build`");
        std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (!runtime_) throw Error("tensorrt: createInferRuntime failed");
        engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
        if (!engine_) throw Error(plan_path + ": tensorrt cannot deserialize the plan (" + logger_.last_error + ")");
        context_.reset(engine_->createExecutionContext());
        if (!context_) throw Error("tensorrt: createExecutionContext failed");
        cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
        for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
            const char* name = engine_->getIOTensorName(i);
            if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) input_ = name;
            else outputs_.push_back(name);
        }
    }

    ~TrtBackend() override {
        if (stream_ != nullptr) cudaStreamDestroy(stream_);
    }

    std::string name() const override { return "tensorrt"; }

    Outputs infer(const float* images, int batch, int size) override {
        const std::size_t count = std::size_t(batch) * 3 * size * size;
        nvinfer1::Dims4 dims(batch, 3, size, size);
        if (!context_->setInputShape(input_.c_str(), dims))
            throw Error("tensorrt: batch " + std::to_string(batch) + " is outside the plan's profile");
        if (engine_->getTensorDataType(input_.c_str()) != nvinfer1::DataType::kFLOAT)
            throw Error("tensorrt: the plan's input is not float32 (the exported graph takes float32 images)");
        DeviceBuffer d_in = device_alloc(count * sizeof(float));
        cuda_check(cudaMemcpyAsync(d_in.get(), images, count * sizeof(float), cudaMemcpyHostToDevice, stream_),
                   "copy in");
        context_->setTensorAddress(input_.c_str(), d_in.get());
        std::vector<DeviceBuffer> d_out;
        std::vector<std::vector<std::int64_t>> shapes;
        std::vector<std::size_t> counts;
        for (const auto& name : outputs_) {
            nvinfer1::Dims d = context_->getTensorShape(name.c_str());
            std::vector<std::int64_t> shape(d.d, d.d + d.nbDims);
            std::size_t n = 1;
            for (auto v : shape) n *= std::size_t(v);
            d_out.push_back(device_alloc(n * element_size(engine_->getTensorDataType(name.c_str()))));
            context_->setTensorAddress(name.c_str(), d_out.back().get());
            shapes.push_back(shape);
            counts.push_back(n);
        }
        if (!context_->enqueueV3(stream_)) throw Error("tensorrt: enqueueV3 failed (" + logger_.last_error + ")");
        Outputs out;
        std::vector<std::vector<std::uint16_t>> half_out(outputs_.size());
        for (std::size_t i = 0; i < outputs_.size(); ++i) {
            Tensor t;
            t.shape = shapes[i];
            t.data.resize(counts[i]);
            if (engine_->getTensorDataType(outputs_[i].c_str()) == nvinfer1::DataType::kHALF) {
                half_out[i].resize(counts[i]);
                cuda_check(cudaMemcpyAsync(half_out[i].data(), d_out[i].get(), counts[i] * 2, cudaMemcpyDeviceToHost,
                                           stream_), "copy out");
            } else {
                cuda_check(cudaMemcpyAsync(t.data.data(), d_out[i].get(), counts[i] * 4, cudaMemcpyDeviceToHost,
                                           stream_), "copy out");
            }
            out.emplace(outputs_[i], std::move(t));
        }
        cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        for (std::size_t i = 0; i < outputs_.size(); ++i)
            if (!half_out[i].empty()) {
                auto& data = out[outputs_[i]].data;
                for (std::size_t k = 0; k < counts[i]; ++k) data[k] = half_bits_to_float(half_out[i][k]);
            }
        return out;
    }

private:
    Logger logger_;  // outlives every TensorRT object (declared first, destroyed last)
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    cudaStream_t stream_ = nullptr;
    std::string input_;
    std::vector<std::string> outputs_;
};

}  // namespace

std::unique_ptr<Backend> make_tensorrt_backend(const std::string& plan_path) {
    return std::make_unique<TrtBackend>(plan_path);
}

// tensorrt.__version__ of the same release ("major.minor.patch.build").
std::string tensorrt_version() {
    return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
           std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
}

bool tensorrt_compiled() { return true; }

std::pair<std::string, std::string> cuda_device() {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return {"", ""};
    return {prop.name, std::to_string(prop.major) + "." + std::to_string(prop.minor)};
}

}  // namespace iqe
