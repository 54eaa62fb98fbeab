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

// manifest.<backend>.<precision>.json of manifest schema 2 (iqe/engine/manifest.py Manifest):
// exactly its fields, or the engine is refused as stale, like the Python loader.
struct Manifest {
    std::string backend;
    std::string backend_version;
    std::string precision;
    std::string graph;
    std::string onnx_file;
    std::string onnx_sha256;
    std::string bundle_sha256;        // "" when null (exported without a bundle record)
    std::string config_sha256;
    std::string device;
    std::string compute_capability;   // "" when null
    std::array<int, 3> batch_images{1, 8, 32};  // batch_profile["images"]: min, opt, max
    std::string artefact;             // the file the runner loads (optimised ONNX, TensorRT plan)
    std::string artefact_sha256;
    std::string artefact_data;        // extra.artefact_data: the artefact's external weights, "" when none
    std::vector<std::string> providers;  // extra.providers (onnxruntime)
    bool optimized = false;           // extra.optimized: the artefact is already optimised (opened as is)
    std::string iqe_version;
    std::string path;                 // where it was read from

    static std::string file_name(const std::string& backend, const std::string& precision);
    // Throws EngineMismatch with Manifest.read's messages: missing, unreadable, another
    // schema, other fields.
    static Manifest read(const std::string& engine_dir, const std::string& backend, const std::string& precision);
};

// What the running machine offers, for the manifest check.
struct MachineInfo {
    std::string iqe_version;       // the iqe version this library was built with
    std::string backend_version;
    std::string device;            // the backend's device string, as the Python backend words it
    std::string compute_capability;  // "" for None
    std::vector<std::string> providers;  // onnxruntime execution providers available
};

// The Python loader's check_manifest (no bundle given): iqe version, backend version, the
// ONNX graph and the artefact present and unchanged (sha256), then the backend's own
// checks (providers, artefact weights, device). Throws EngineMismatch naming the first
// reason with the rebuild command, in the same words as iqe.engine.manifest.
void check_manifest(const Manifest& m, const std::string& engine_dir, const MachineInfo& machine);

// With a bundle (`iqe score --model BUNDLE --engine DIR`): EngineMismatch unless the engine
// was built from it (manifest.py check_bundle's message).
void check_bundle(const Manifest& m, const std::string& engine_dir, const std::string& bundle_dir);

// bundle.py bundle_sha256: sha256 over the hex sha256 of config.json and model.safetensors.
std::string bundle_sha256(const std::string& bundle_dir);

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
    std::string bundle;                   // when set, the engine must have been built from this bundle
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
// `optimize`: let ONNX Runtime optimise at session creation (a raw export); false opens an
// already optimised artefact as it is (what `iqe build` writes on CPU).
std::unique_ptr<Backend> make_onnxruntime_backend(const std::string& onnx_path, int threads, bool optimize,
                                                  const std::string& precision);
std::vector<std::string> onnxruntime_providers();  // available execution providers
// The onnxruntime backend's device string: "cuda (<provider>)" or "cpu (<machine>, <CPU model>)".
std::string onnxruntime_device();
std::unique_ptr<Backend> make_tensorrt_backend(const std::string& plan_path);
std::string onnxruntime_version();
std::string tensorrt_version();  // "" when built without TensorRT
bool tensorrt_compiled();
// (device name, compute capability) TensorRT would run on; ("", "") without CUDA.
std::pair<std::string, std::string> cuda_device();

}  // namespace iqe
