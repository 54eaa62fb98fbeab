#include "iqe/engine.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "iqe/errors.hpp"
#include "iqe/sources.hpp"

namespace fs = std::filesystem;

namespace iqe {
namespace {

nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        throw InputError(path + ": not valid JSON (" + e.what() + ")");
    }
}

std::string str_field(const nlohmann::json& j, const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return "";
    if (it->is_string()) return it->get<std::string>();
    return it->dump();
}

std::string rebuild_command(const std::string& engine_dir, const std::string& backend, const std::string& precision) {
    return "run `iqe build " + engine_dir + " --backend " + backend + " --precision " + precision + "`";
}

}  // namespace

std::string Manifest::file_name(const std::string& backend, const std::string& precision) {
    return "manifest." + backend + "." + precision + ".json";
}

Manifest Manifest::read(const std::string& engine_dir, const std::string& backend, const std::string& precision) {
    const std::string name = file_name(backend, precision);
    const std::string path = (fs::path(engine_dir) / name).string();
    if (!fs::is_regular_file(path))
        throw EngineMismatch(engine_dir + ": no " + backend + " " + precision + " engine (" + name + " missing); " +
                             rebuild_command(engine_dir, backend, precision));
    nlohmann::json j = read_json(path);
    Manifest m;
    m.path = path;
    m.backend = str_field(j, "backend");
    m.backend_version = str_field(j, "backend_version");
    m.precision = str_field(j, "precision");
    m.graph = str_field(j, "graph");
    m.onnx_file = str_field(j, "onnx_file");
    m.onnx_sha256 = str_field(j, "onnx_sha256");
    m.config_sha256 = str_field(j, "config_sha256");
    m.device = str_field(j, "device");
    m.compute_capability = str_field(j, "compute_capability");
    m.plan_file = str_field(j, "plan_file");
    try {
        auto profile = j.at("batch_profile").at("images");
        for (int i = 0; i < 3; ++i) m.batch_images[i] = profile.at(i).get<int>();
    } catch (const nlohmann::json::exception&) {
        throw InputError(path + ": batch_profile.images is missing or malformed");
    }
    return m;
}

std::string sha256_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw InputError(path + ": cannot read");
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
    std::vector<char> buf(1 << 20);
    while (in) {
        in.read(buf.data(), std::streamsize(buf.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), std::size_t(in.gcount()));
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx.get(), digest, &n);
    std::string hex;
    char b[3];
    for (unsigned i = 0; i < n; ++i) {
        std::snprintf(b, sizeof b, "%02x", digest[i]);
        hex += b;
    }
    return hex;
}

// Keep in step with iqe/engine/manifest.py check_manifest: same order, same messages.
void check_manifest(const Manifest& m, const std::string& engine_dir, const std::string& backend_version,
                    const std::string& device, const std::string& compute_capability) {
    const std::string rebuild = rebuild_command(engine_dir, m.backend, m.precision);
    const std::string onnx_path = (fs::path(engine_dir) / m.onnx_file).string();
    if (m.onnx_file.empty() || !fs::is_regular_file(onnx_path))
        throw EngineMismatch("engine refused: " + m.onnx_file + " is missing from " + engine_dir +
                             "; run `iqe export` then " + rebuild);
    if (sha256_file(onnx_path) != m.onnx_sha256)
        throw EngineMismatch("engine refused: onnx_sha256 of " + m.onnx_file + " differs from " +
                             Manifest::file_name(m.backend, m.precision) + "; " + rebuild);
    if (backend_version != m.backend_version)
        throw EngineMismatch("engine refused: built with " + m.backend + " " + m.backend_version +
                             ", this machine has " + backend_version + "; " + rebuild);
    auto none = [](const std::string& s) { return s.empty() ? std::string("None") : s; };
    if (m.backend == "tensorrt" && (device != m.device || compute_capability != m.compute_capability))
        throw EngineMismatch("engine refused: built for " + m.device + " (sm " + none(m.compute_capability) +
                             "), this machine has " + device + " (sm " + none(compute_capability) + "); " + rebuild);
}

std::string backend_version(const std::string& backend) {
    if (backend == "onnxruntime") return onnxruntime_version();
    if (backend == "tensorrt") {
        std::string v = tensorrt_version();
        if (v.empty())
            throw InputError("TensorRT is not compiled into this iqe-native (configure with -DIQE_WITH_TENSORRT=ON "
                             "where TensorRT is installed); use --backend onnxruntime");
        return v;
    }
    throw InputError("unknown backend '" + backend + "'; known: onnxruntime, tensorrt");
}

Engine::Engine(const std::string& engine_dir_raw, const EngineOptions& options) {
    const std::string engine_dir = normalize_path(engine_dir_raw);
    if (options.backend != "onnxruntime" && options.backend != "tensorrt")
        throw InputError("unknown backend '" + options.backend + "'; known: onnxruntime, tensorrt");
    if (options.precision != "fp32" && options.precision != "fp16")
        throw InputError("--precision must be one of fp32, fp16, got '" + options.precision + "'");
    manifest_ = Manifest::read(engine_dir, options.backend, options.precision);
    std::string version = backend_version(options.backend);
    auto [device, cc] = options.backend == "tensorrt" ? cuda_device() : std::pair<std::string, std::string>{};
    check_manifest(manifest_, engine_dir, version, device, cc);
    const std::string export_name = "export." + options.precision + ".json";
    const std::string export_path = (fs::path(engine_dir) / export_name).string();
    if (!fs::is_regular_file(export_path))
        throw InputError(engine_dir + ": no " + options.precision + " export (" + export_name + " missing); run `iqe export BUNDLE --out " +
                         engine_dir + " --precision " + options.precision + "`");
    nlohmann::json info = read_json(export_path);
    if (!info.contains("image_size") || !info["image_size"].is_number_integer())
        throw InputError(export_path + ": image_size is missing");
    image_size_ = info["image_size"].get<int>();
    if (options.backend == "onnxruntime")
        backend_ = make_onnxruntime_backend((fs::path(engine_dir) / manifest_.onnx_file).string(), options.threads);
    else
        backend_ = make_tensorrt_backend((fs::path(engine_dir) / manifest_.plan_file).string());
}

Engine::~Engine() = default;

Outputs Engine::infer(const float* images, int batch) {
    const int max = std::max(1, max_batch());
    if (batch <= max) return backend_->infer(images, batch, image_size_);
    const std::size_t per_image = std::size_t(3) * image_size_ * image_size_;
    Outputs all;
    for (int start = 0; start < batch; start += max) {
        int n = std::min(max, batch - start);
        Outputs part = backend_->infer(images + per_image * start, n, image_size_);
        for (auto& [name, t] : part) {
            auto& dst = all[name];
            if (dst.shape.empty()) {
                dst.shape = t.shape;
                dst.shape[0] = 0;
            }
            dst.shape[0] += t.shape[0];
            dst.data.insert(dst.data.end(), t.data.begin(), t.data.end());
        }
    }
    return all;
}

}  // namespace iqe
