// iqe-native: the native twin of `iqe score` on an engine directory.
//
//   iqe-native score ENGINE_DIR INPUT... --out DIR [--save-maps] [--batch N] [--model BUNDLE]
//                    [--backend onnxruntime|tensorrt] [--precision fp32|fp16]
//                    [--window MODALITY=C,W]... [--threads N] [--quiet]
//   iqe-native preprocess INPUT... --out DIR [--size N] [--window ...]   (model inputs as .npy)
//   iqe-native version
//
// Writes the same results.jsonl rows (and maps/NNNNNN.npz per item with --save-maps) and a run
// record (.iqe-run.jsonl) like `iqe score`; see docs/native.md.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "iqe/engine.hpp"
#include "iqe/errors.hpp"
#include "iqe/results.hpp"
#include "iqe/scoring.hpp"

namespace fs = std::filesystem;

namespace {

const char* kUsage =
    "usage: iqe-native score ENGINE_DIR INPUT... --out DIR [--save-maps] [--batch N (default 8)]\n"
    "                        [--model BUNDLE (refuse an engine built from another bundle)]\n"
    "                        [--backend onnxruntime|tensorrt (default onnxruntime)] [--precision fp32|fp16 (default fp32)]\n"
    "                        [--window MODALITY=C,W | C,W]... [--threads N (default: all CPUs)] [--quiet]\n"
    "       iqe-native preprocess INPUT... --out DIR [--size N (default 240)] [--window ...]\n"
    "       iqe-native bench ENGINE_DIR INPUT... [--repeat N (default 10)] [--batch N] [--threads N] [--preprocess-only]\n"
    "       iqe-native version\n";

struct Args {
    std::vector<std::string> positional;
    std::string out;
    bool save_maps = false, quiet = false, preprocess_only = false;
    int batch = 8, threads = 0, size = 240, repeat = 10;
    std::string backend = "onnxruntime", precision = "fp32", model;
    iqe::WindowOverrides windows;
};

int to_int(const std::string& flag, const std::string& v) {
    char* end = nullptr;
    long n = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0') throw iqe::InputError("argument " + flag + ": invalid int value: '" + v + "'");
    return int(n);
}

Args parse(int argc, char** argv, int first, bool needs_out = true) {
    Args a;
    for (int i = first; i < argc; ++i) {
        std::string s = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw iqe::InputError("argument " + s + ": expected one argument");
            return argv[++i];
        };
        if (s == "--out") a.out = value();
        else if (s == "--save-maps") a.save_maps = true;
        else if (s == "--quiet") a.quiet = true;
        else if (s == "--preprocess-only") a.preprocess_only = true;
        else if (s == "--batch") a.batch = to_int(s, value());
        else if (s == "--threads") a.threads = to_int(s, value());
        else if (s == "--size") a.size = to_int(s, value());
        else if (s == "--repeat") a.repeat = to_int(s, value());
        else if (s == "--backend") a.backend = value();
        else if (s == "--precision") a.precision = value();
        else if (s == "--model") a.model = value();
        else if (s == "--window") {
            auto [key, window] = iqe::parse_window(value());
            a.windows[key] = window;
        }
        else if (s.rfind("--", 0) == 0) throw iqe::InputError("unrecognized argument: " + s);
        else a.positional.push_back(s);
    }
    if (needs_out && a.out.empty()) throw iqe::InputError("the following arguments are required: --out");
    return a;
}

int cmd_score(const Args& a) {
    if (a.positional.size() < 2) throw iqe::InputError("the following arguments are required: ENGINE_DIR INPUT...");
    std::vector<std::string> inputs(a.positional.begin() + 1, a.positional.end());
    // The output folder is checked before the engine is loaded (like `iqe score`).
    iqe::Json::Array input_list(inputs.begin(), inputs.end()), window_list;
    for (const auto& [key, w] : a.windows)
        window_list.emplace_back(key + "=" + iqe::py_float(w.center) + "," + iqe::py_float(w.width));
    iqe::Json record = iqe::Json::object();
    record.set("inputs", iqe::Json::array(std::move(input_list)))
        .set("engine", iqe::normalize_path(a.positional[0]))
        .set("model", a.model.empty() ? iqe::Json(nullptr) : iqe::Json(iqe::normalize_path(a.model)))
        .set("runtime", "iqe-native")
        .set("backend", a.backend)
        .set("precision", a.precision)
        .set("window", iqe::Json::array(std::move(window_list)))
        .set("save_maps", a.save_maps);
    iqe::RunOutput output(a.out, record, a.save_maps);
    iqe::EngineOptions eo;
    eo.backend = a.backend;
    eo.precision = a.precision;
    eo.threads = a.threads;
    eo.bundle = a.model;
    iqe::Engine engine(a.positional[0], eo);
    iqe::ScoreOptions so;
    so.batch = a.batch;
    so.keep_maps = a.save_maps;
    so.windows = a.windows;
    std::size_t n = 0;
    if (!a.quiet) so.on_item = [&n](const iqe::ItemResult&) {
        if (++n % 50 == 0) std::fprintf(stderr, "scoring: %zu slices\r", n);
    };
    auto results = iqe::score_to_folder(engine, inputs, so, output);
    const std::string written = output.results_path();
    std::size_t failed = 0;
    for (const auto& r : results)
        if (r.error) {
            ++failed;
            std::fprintf(stderr, "error: %s\n", r.error->c_str());
        }
    std::fprintf(stderr, "scored %zu of %zu inputs -> %s\n", results.size() - failed, results.size(), written.c_str());
    if (failed == results.size()) {
        std::fprintf(stderr, "nothing could be scored\n");
        return 2;
    }
    return 0;
}

// Model inputs and display images for parity tests: N.npy (float32 [3,S,S]), N.display.npy
// (uint8 HxW or HxWx3, the 8-bit image before resizing) and items.jsonl (key, error, extra).
int cmd_preprocess(const Args& a) {
    if (a.positional.empty()) throw iqe::InputError("the following arguments are required: INPUT...");
    fs::create_directories(a.out);
    std::string lines;
    int n = 0;
    for (const auto& source : iqe::discover_in_order(a.positional)) {
        iqe::read_items(source, a.size, a.windows, true, [&](iqe::Item&& item) {
            iqe::Json row = iqe::Json::object();
            row.set("key", item.key);
            row.set("error", item.error ? iqe::Json(*item.error) : iqe::Json(nullptr));
            row.set("extra", item.extra);
            if (!item.error) {
                const std::string stem = (fs::path(a.out) / std::to_string(n)).string();
                iqe::atomic_write(stem + ".npy", iqe::npy_float32(item.image, {3, a.size, a.size}));
                const auto& d = item.display;
                std::vector<long> shape{d.height, d.width};
                if (d.channels == 3) shape.push_back(3);
                iqe::atomic_write(stem + ".display.npy", iqe::npy_uint8(d.pixels, shape));
                row.set("file", std::to_string(n) + ".npy");
            }
            ++n;
            lines += row.dump() + "\n";
        });
    }
    iqe::atomic_write((fs::path(a.out) / "items.jsonl").string(), lines);
    return 0;
}

// Warm timings for benchmarks/native_vs_python.py: the engine is loaded once, then the
// inputs are scored --repeat times (discovery, decoding, preprocessing, inference each
// time; --preprocess-only: reading and preprocessing alone, no inference). Prints one
// JSON object: load_s, runs_s [...], items.
int cmd_bench(const Args& a) {
    if (a.positional.size() < 2) throw iqe::InputError("the following arguments are required: ENGINE_DIR INPUT...");
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    iqe::EngineOptions eo;
    eo.backend = a.backend;
    eo.precision = a.precision;
    eo.threads = a.threads;
    iqe::Engine engine(a.positional[0], eo);
    const double load_s = std::chrono::duration<double>(clock::now() - t0).count();
    iqe::ScoreOptions so;
    so.batch = a.batch;
    std::vector<std::string> inputs(a.positional.begin() + 1, a.positional.end());
    std::string runs;
    std::size_t items = 0;
    for (int i = 0; i < a.repeat; ++i) {
        auto t = clock::now();
        if (a.preprocess_only) {
            items = 0;
            for (const auto& source : iqe::discover_in_order(inputs))
                iqe::read_items(source, engine.image_size(), so.windows, false, [&items](iqe::Item&&) { ++items; });
        } else {
            items = iqe::score_inputs(engine, inputs, so).size();
        }
        runs += (i ? ", " : "") + iqe::py_float(std::chrono::duration<double>(clock::now() - t).count());
    }
    std::printf("{\"load_s\": %s, \"runs_s\": [%s], \"items\": %zu}\n", iqe::py_float(load_s).c_str(), runs.c_str(), items);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const std::string command = argv[1];
    try {
        if (command == "version") {
            std::printf("iqe-native onnxruntime %s%s\n", iqe::onnxruntime_version().c_str(),
                        iqe::tensorrt_compiled() ? (" tensorrt " + iqe::tensorrt_version()).c_str() : "");
            return 0;
        }
        if (command == "score") return cmd_score(parse(argc, argv, 2));
        if (command == "preprocess") return cmd_preprocess(parse(argc, argv, 2));
        if (command == "bench") return cmd_bench(parse(argc, argv, 2, false));
        std::fputs(kUsage, stderr);
        return 2;
    } catch (const iqe::InputError& e) {
        std::fprintf(stderr, "iqe-native %s: error: %s\n", command.c_str(), e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "iqe-native %s: failed: %s\n", command.c_str(), e.what());
        return 1;
    }
}
