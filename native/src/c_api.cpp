// The C API: RAII objects behind opaque handles; every exception becomes a status.
#include "iqe/iqe.h"

#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "iqe/engine.hpp"
#include "iqe/errors.hpp"
#include "iqe/results.hpp"
#include "iqe/scoring.hpp"
#include "iqe/sources.hpp"

struct iqe_engine {
    std::unique_ptr<iqe::Engine> engine;
    std::string dir;  // as opened (for the run record)
};

namespace {

thread_local std::string last_error;

template <typename F>
iqe_status guarded(F&& body) noexcept {
    try {
        body();
        last_error.clear();
        return IQE_OK;
    } catch (const iqe::EngineMismatch& e) {
        last_error = e.what();
        return IQE_ENGINE_MISMATCH;
    } catch (const iqe::InputError& e) {
        last_error = e.what();
        return IQE_INPUT_ERROR;
    } catch (const std::exception& e) {
        last_error = e.what();
        return IQE_RUNTIME_ERROR;
    } catch (...) {
        last_error = "unknown error";
        return IQE_RUNTIME_ERROR;
    }
}

}  // namespace

extern "C" {

const char* iqe_version(void) { return "0.1.0"; }

const char* iqe_last_error(void) { return last_error.c_str(); }

iqe_status iqe_engine_open(const char* engine_dir, const char* backend, const char* precision, int threads,
                           iqe_engine** out) {
    return guarded([&] {
        if (engine_dir == nullptr || out == nullptr) throw iqe::InputError("iqe_engine_open: engine_dir and out are required");
        iqe::EngineOptions options;
        if (backend) options.backend = backend;
        if (precision) options.precision = precision;
        options.threads = threads;
        auto handle = std::make_unique<iqe_engine>();
        handle->engine = std::make_unique<iqe::Engine>(engine_dir, options);
        handle->dir = engine_dir;
        *out = handle.release();
    });
}

void iqe_engine_close(iqe_engine* engine) { delete engine; }

int iqe_engine_image_size(const iqe_engine* engine) { return engine ? engine->engine->image_size() : 0; }

iqe_status iqe_engine_score(iqe_engine* engine, const float* images, int batch, iqe_scores* scores, float* map,
                            float* map_smooth) {
    return guarded([&] {
        if (engine == nullptr || images == nullptr || scores == nullptr || batch < 1)
            throw iqe::InputError("iqe_engine_score: engine, images, scores and batch >= 1 are required");
        iqe::Outputs out = engine->engine->infer(images, batch);
        auto column = [&](const char* name, int j) { return out.at(name).data[std::size_t(j) * (out.at(name).data.size() / batch)]; };
        for (int j = 0; j < batch; ++j)
            scores[j] = {column("score", j), column("score_query", j), column("score_text", j), column("score_few", j),
                         column("map_max", j)};
        if (map) std::memcpy(map, out.at("map").data.data(), out.at("map").data.size() * sizeof(float));
        if (map_smooth)
            std::memcpy(map_smooth, out.at("map_smooth").data.data(), out.at("map_smooth").data.size() * sizeof(float));
    });
}

iqe_status iqe_score_files(iqe_engine* engine, const char* const* inputs, int n_inputs, const char* out_dir,
                           int save_maps, int batch, int* scored) {
    return guarded([&] {
        if (engine == nullptr || inputs == nullptr || n_inputs < 1 || out_dir == nullptr)
            throw iqe::InputError("iqe_score_files: engine, inputs (n_inputs >= 1) and out_dir are required");
        iqe::ScoreOptions options;
        options.batch = batch > 0 ? batch : 8;
        options.keep_maps = save_maps != 0;
        std::vector<std::string> paths(inputs, inputs + n_inputs);
        iqe::Json::Array input_list(paths.begin(), paths.end());
        iqe::Json record = iqe::Json::object();
        record.set("inputs", iqe::Json::array(std::move(input_list)))
            .set("engine", iqe::normalize_path(engine->dir))
            .set("runtime", "iqe-native")
            .set("backend", engine->engine->manifest().backend)
            .set("precision", engine->engine->manifest().precision)
            .set("window", iqe::Json::array({}))
            .set("save_maps", save_maps != 0);
        iqe::RunOutput output(out_dir, record, save_maps != 0);
        auto results = iqe::score_to_folder(*engine->engine, paths, options, output);
        if (scored) {
            *scored = 0;
            for (const auto& r : results) *scored += r.error ? 0 : 1;
        }
    });
}

iqe_status iqe_preprocess_file(const char* path, int size, float* out) {
    return guarded([&] {
        if (path == nullptr || out == nullptr || size < 1) throw iqe::InputError("iqe_preprocess_file: path, out and size >= 1 are required");
        bool done = false;
        for (const auto& source : iqe::discover_in_order({path})) {
            iqe::read_items(source, size, {}, false, [&](iqe::Item&& item) {
                if (done) return;
                done = true;
                if (item.error) throw iqe::InputError(*item.error);
                std::memcpy(out, item.image.data(), item.image.size() * sizeof(float));
            });
        }
        if (!done) throw iqe::InputError(std::string(path) + ": no image");
    });
}

}  // extern "C"
