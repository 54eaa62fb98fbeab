// Engines: the directory `iqe export` + `iqe build` write, checked like the Python loader
// (iqe/engine/manifest.py, iqe/engine/build.py load_runner), and the backends that run it.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace iqe {

// manifest.<backend>.<precision>.json, read by field name (unknown fields are ignored, so
// manifests from newer builds with more fields still load).
struct Manifest {
    std::string backend;
    std::string backend_version;
    std::string precision;
    std::string graph;
    std::string onnx_file;
    std::string onnx_sha256;
    std::string config_sha256;
    std::string device;
    std::string compute_capability;  // "" when null
    std::array<int, 3> batch_images{1, 8, 32};  // batch_profile["images"]: min, opt, max
    std::string plan_file;  // "" when null
    std::string path;       // where it was read from

    static std::string file_name(const std::string& backend, const std::string& precision);
    // Throws EngineMismatch when the file is missing (the Python loader's message).
    static Manifest read(const std::string& engine_dir, const std::string& backend, const std::string& precision);
};

// The Python loader's check_manifest: the ONNX file exists and matches its sha256, the
// backend version is the one here, and (TensorRT) the device matches. Throws
// EngineMismatch naming the first differing field and the rebuild command, with the same
// text as iqe.engine.manifest.check_manifest.
void check_manifest(const Manifest& m, const std::string& engine_dir, const std::string& backend_version,
                    const std::string& device, const std::string& compute_capability);

// Hex sha256 of a file's bytes.
std::string sha256_file(const std::string& path);

// Outputs of one batch, float32, keyed by the fused graph's output names (score, score_query,
// score_text, score_few, map, map_query, map_text, map_smooth, map_max).
struct Tensor {
    std::vector<std::int64_t> shape;
    std::vector<float> data;
};
using Outputs = std::map<std::string, Tensor>;

// A backend runs the fused graph: float32 images [B, 3, S, S] in [0, 1] -> outputs.
class Backend {
public:
    virtual ~Backend() = default;
    virtual Outputs infer(const float* images, int batch, int size) = 0;
    virtual std::string name() const = 0;
};

// The backend's version string as the Python loader compares it (onnxruntime.__version__,
// tensorrt.__version__).
std::string backend_version(const std::string& backend);

struct EngineOptions {
    std::string backend = "onnxruntime";  // onnxruntime | tensorrt
    std::string precision = "fp32";       // fp32 | fp16
    int threads = 0;                      // intra-op threads; 0: the CPUs this process may use
};

// A checked engine directory with its backend, ready to infer.
class Engine {
public:
    // Reads export.<precision>.json and the manifest, checks it, creates the backend.
    // Throws InputError / EngineMismatch with the Python loader's messages.
    Engine(const std::string& engine_dir, const EngineOptions& options);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    int image_size() const { return image_size_; }
    int max_batch() const { return manifest_.batch_images[2]; }
    const Manifest& manifest() const { return manifest_; }

    // Runs `batch` images, split into chunks of at most max_batch().
    Outputs infer(const float* images, int batch);

private:
    Manifest manifest_;
    int image_size_ = 0;
    std::unique_ptr<Backend> backend_;
};

// Backend factories (defined by the backend sources compiled in).
std::unique_ptr<Backend> make_onnxruntime_backend(const std::string& onnx_path, int threads);
std::unique_ptr<Backend> make_tensorrt_backend(const std::string& plan_path);
std::string onnxruntime_version();
std::string tensorrt_version();  // "" when built without TensorRT
bool tensorrt_compiled();
// (device name, compute capability) TensorRT would run on; ("", "") without CUDA.
std::pair<std::string, std::string> cuda_device();

}  // namespace iqe
