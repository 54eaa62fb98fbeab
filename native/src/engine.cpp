#include "iqe/engine.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <tuple>
#include <nlohmann/json.hpp>
#include <sstream>

#include "iqe/errors.hpp"
#include "iqe/pyformat.hpp"
#include "iqe/sources.hpp"

#ifndef IQE_VERSION
#error "IQE_VERSION (iqe/__init__.py __version__) is set by native/CMakeLists.txt"
#endif

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
    return "iqe build " + engine_dir + " --backend " + backend + " --precision " + precision;
}

constexpr int kManifestSchema = 2;  // manifest.py MANIFEST_SCHEMA
// The fields of manifest schema 2 (manifest.py Manifest): a manifest with others is stale.
const std::set<std::string> kManifestFields = {
    "backend", "backend_version", "precision", "graph", "onnx_file", "onnx_sha256", "bundle_sha256",
    "config_sha256", "device", "compute_capability", "batch_profile", "build_seconds", "artefact",
    "artefact_sha256", "iqe_version", "schema", "built_at", "extra"};

// f"{value}" of a JSON value as Python formats it (None, True, numbers, str as is).
std::string py_format(const nlohmann::json& v) {
    if (v.is_null()) return "None";
    if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number_float()) return py_float(v.get<double>());
    return v.dump();
}

std::string short_digest(const std::string& digest) { return digest.empty() ? "(not recorded)" : digest.substr(0, 16); }

// repr() of a list of str, as an f-string shows it.
std::string py_list(const std::vector<std::string>& items) {
    std::string out = "[";
    for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + py_repr(items[i]);
    return out + "]";
}

}  // namespace

std::string Manifest::file_name(const std::string& backend, const std::string& precision) {
    return "manifest." + backend + "." + precision + ".json";
}

// Keep in step with iqe/engine/manifest.py Manifest.read: same checks, same messages.
Manifest Manifest::read(const std::string& engine_dir, const std::string& backend, const std::string& precision) {
    const std::string name = file_name(backend, precision);
    const std::string path = (fs::path(engine_dir) / name).string();
    const std::string rebuild = rebuild_command(engine_dir, backend, precision);
    if (!fs::is_regular_file(path))
        throw EngineMismatch(engine_dir + ": no " + backend + " " + precision + " engine (" + name + " missing); run `" +
                             rebuild + "`");
    nlohmann::json j;
    {
        std::ifstream in(path);
        try {
            j = nlohmann::json::parse(in);
        } catch (const nlohmann::json::exception&) {
            throw EngineMismatch(name + " is unreadable (JSONDecodeError); run `" + rebuild + "`");
        }
    }
    auto schema = j.is_object() ? j.find("schema") : j.end();
    const bool schema_ok = j.is_object() && schema != j.end() && schema->is_number() && !schema->is_boolean() &&
                           schema->get<double>() == kManifestSchema;
    if (!schema_ok) {
        const std::string found = j.is_object() && schema != j.end() ? py_format(*schema) : "none";
        throw EngineMismatch(name + " has manifest schema " + found + ", this iqe writes " +
                             std::to_string(kManifestSchema) + "; run `" + rebuild + "`");
    }
    std::set<std::string> keys;
    for (auto it = j.begin(); it != j.end(); ++it) keys.insert(it.key());
    if (keys != kManifestFields)
        throw EngineMismatch(name + " does not have the fields of manifest schema " + std::to_string(kManifestSchema) +
                             "; run `" + rebuild + "`");
    Manifest m;
    m.path = path;
    using Text = std::string Manifest::*;
    static const std::pair<const char*, Text> kTextFields[] = {
        {"backend", &Manifest::backend}, {"backend_version", &Manifest::backend_version},
        {"precision", &Manifest::precision}, {"graph", &Manifest::graph}, {"onnx_file", &Manifest::onnx_file},
        {"onnx_sha256", &Manifest::onnx_sha256}, {"bundle_sha256", &Manifest::bundle_sha256},
        {"config_sha256", &Manifest::config_sha256}, {"device", &Manifest::device},
        {"compute_capability", &Manifest::compute_capability}, {"artefact", &Manifest::artefact},
        {"artefact_sha256", &Manifest::artefact_sha256}, {"iqe_version", &Manifest::iqe_version}};
    for (const auto& [key, member] : kTextFields) m.*member = str_field(j, key);  // null -> ""
    const auto& extra = j["extra"];
    if (extra.is_object()) {
        m.artefact_data = str_field(extra, "artefact_data");
        if (extra.contains("providers") && extra["providers"].is_array())
            for (const auto& p : extra["providers"])
                if (p.is_string()) m.providers.push_back(p.get<std::string>());
        m.optimized = extra.contains("optimized") && extra["optimized"].is_boolean() && extra["optimized"].get<bool>();
    }
    try {
        auto profile = j.at("batch_profile").at("images");
        for (int i = 0; i < 3; ++i) m.batch_images[i] = profile.at(i).get<int>();
    } catch (const nlohmann::json::exception&) {
        throw EngineMismatch(name + " does not have the fields of manifest schema " + std::to_string(kManifestSchema) +
                             "; run `" + rebuild + "`");
    }
    return m;
}

namespace {

std::string finish_hex(EVP_MD_CTX* ctx) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx, digest, &n);
    std::string hex;
    char b[3];
    for (unsigned i = 0; i < n; ++i) {
        std::snprintf(b, sizeof b, "%02x", digest[i]);
        hex += b;
    }
    return hex;
}

}  // namespace

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
    return finish_hex(ctx.get());
}

// Keep in step with iqe/engine/manifest.py check_manifest and the backends' check_manifest:
// same order, same messages.
void check_manifest(const Manifest& m, const std::string& engine_dir, const MachineInfo& machine) {
    const std::string rebuild = rebuild_command(engine_dir, m.backend, m.precision);
    auto stale = [&](const std::string& reason) {
        return EngineMismatch("engine refused: " + reason + "; run `" + rebuild + "`");
    };
    if (m.iqe_version != machine.iqe_version)
        throw stale("built by iqe " + m.iqe_version + ", this is iqe " + machine.iqe_version);
    if (machine.backend_version != m.backend_version)
        throw stale("built with " + m.backend + " " + m.backend_version + ", this machine has " + machine.backend_version);
    const std::string onnx_path = (fs::path(engine_dir) / m.onnx_file).string();
    if (!fs::is_regular_file(onnx_path))
        throw stale(m.onnx_file + " is missing from " + engine_dir + " (run `iqe export` first)");
    if (sha256_file(onnx_path) != m.onnx_sha256)
        throw stale("onnx_sha256 of " + m.onnx_file + " differs from " + Manifest::file_name(m.backend, m.precision));
    const std::string artefact = (fs::path(engine_dir) / m.artefact).string();
    if (m.artefact.empty() || !fs::is_regular_file(artefact) || sha256_file(artefact) != m.artefact_sha256)
        throw stale(m.artefact + " is missing or changed since the build");
    if (m.backend == "onnxruntime") {
        std::vector<std::string> missing;
        for (const auto& p : m.providers)
            if (std::find(machine.providers.begin(), machine.providers.end(), p) == machine.providers.end())
                missing.push_back(p);
        if (!missing.empty())
            throw stale("built for execution providers " + py_list(missing) + ", which this ONNX Runtime lacks");
        if (!m.artefact_data.empty() && !fs::is_regular_file(fs::path(engine_dir) / m.artefact_data))
            throw stale(m.artefact_data + " (the artefact's weights) is missing");
    }
    auto none = [](const std::string& s) { return s.empty() ? std::string("None") : s; };
    if (machine.device != m.device || machine.compute_capability != m.compute_capability)
        throw stale("built for " + m.device + " (sm " + none(m.compute_capability) + "), this machine has " +
                    machine.device + " (sm " + none(machine.compute_capability) + ")");
}

std::string bundle_sha256(const std::string& bundle_dir) {
    std::string joined;
    for (const char* name : {"config.json", "model.safetensors"}) {
        const fs::path file = fs::path(bundle_dir) / name;
        if (!fs::is_regular_file(file))
            throw InputError(bundle_dir + ": not a model bundle (" + name + " missing)");
        joined += sha256_file(file.string());
    }
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
    EVP_DigestUpdate(ctx.get(), joined.data(), joined.size());
    return finish_hex(ctx.get());
}

// Keep in step with iqe/engine/manifest.py check_bundle.
void check_bundle(const Manifest& m, const std::string& engine_dir, const std::string& bundle_dir) {
    const std::string bundle = normalize_path(bundle_dir);
    const std::string sha = bundle_sha256(bundle);
    if (m.bundle_sha256 == sha) return;
    const std::string origin = m.bundle_sha256.empty() ? "does not record the bundle it was built from"
                                                       : "was built from bundle " + short_digest(m.bundle_sha256);
    throw EngineMismatch("engine refused: " + engine_dir + " " + origin + ", not from " + bundle + " (bundle " +
                         short_digest(sha) + "); build one for this bundle: `iqe export " + bundle +
                         " --out NEW_DIR --precision " + m.precision + " && " +
                         rebuild_command("NEW_DIR", m.backend, m.precision) +
                         "`, or leave out --engine to use the cache");
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
    if (!options.bundle.empty()) check_bundle(manifest_, engine_dir, options.bundle);
    MachineInfo machine;
    machine.iqe_version = IQE_VERSION;
    machine.backend_version = backend_version(options.backend);
    if (options.backend == "tensorrt") {
        std::tie(machine.device, machine.compute_capability) = cuda_device();
    } else {
        machine.device = onnxruntime_device();
        machine.providers = onnxruntime_providers();
    }
    check_manifest(manifest_, engine_dir, machine);
    const std::string export_name = "export." + options.precision + ".json";
    const std::string export_path = (fs::path(engine_dir) / export_name).string();
    if (!fs::is_regular_file(export_path))
        throw EngineMismatch(engine_dir + ": no " + options.precision + " export (" + export_name +
                             " missing); run `iqe export BUNDLE --out " + engine_dir + " --precision " +
                             options.precision + "`");
    nlohmann::json info = read_json(export_path);
    if (!info.contains("image_size") || !info["image_size"].is_number_integer())
        throw InputError(export_path + ": image_size is missing");
    image_size_ = info["image_size"].get<int>();
    const std::string artefact = (fs::path(engine_dir) / manifest_.artefact).string();
    if (options.backend == "onnxruntime")
        backend_ = make_onnxruntime_backend(artefact, options.threads, !manifest_.optimized, options.precision);
    else
        backend_ = make_tensorrt_backend(artefact);
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
