#include "iqe/scoring.hpp"

#include <cctype>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include "iqe/errors.hpp"

namespace iqe {
namespace {

// Items from a reader thread through a bounded queue (scoring.py _prefetched).
class Prefetcher {
public:
    Prefetcher(const std::vector<Source>& sources, int size, const WindowOverrides& windows, std::size_t depth)
        : depth_(depth) {
        worker_ = std::thread([this, sources, size, windows] {
            try {
                for (const auto& s : sources) {
                    read_items(s, size, windows, false, [this](Item&& item) { push(std::move(item)); });
                    if (stopped()) return;
                }
            } catch (...) {
                std::lock_guard<std::mutex> lock(mu_);
                failure_ = std::current_exception();
            }
            std::lock_guard<std::mutex> lock(mu_);
            done_ = true;
            cv_.notify_all();
        });
    }

    ~Prefetcher() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
            cv_.notify_all();
        }
        worker_.join();
    }

    std::optional<Item> next() {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty() || done_; });
        if (!queue_.empty()) {
            Item item = std::move(queue_.front());
            queue_.pop_front();
            cv_.notify_all();
            return item;
        }
        if (failure_) std::rethrow_exception(failure_);
        return std::nullopt;
    }

private:
    void push(Item&& item) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return queue_.size() < depth_ || stop_; });
        if (stop_) return;
        queue_.push_back(std::move(item));
        cv_.notify_all();
    }

    bool stopped() {
        std::lock_guard<std::mutex> lock(mu_);
        return stop_;
    }

    std::size_t depth_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Item> queue_;
    bool done_ = false, stop_ = false;
    std::exception_ptr failure_;
    std::thread worker_;
};

}  // namespace

std::pair<std::string, Window> parse_window(const std::string& text) {
    const std::string bad = "argument --window: expected MODALITY=CENTER,WIDTH like CT=40,400, got '" + text + "'";
    auto eq = text.rfind('=');
    std::string key = eq == std::string::npos ? "" : text.substr(0, eq);
    std::string value = eq == std::string::npos ? text : text.substr(eq + 1);
    auto comma = value.find(',');
    if (comma == std::string::npos || value.find(',', comma + 1) != std::string::npos) throw InputError(bad);
    auto number = [&](const std::string& s) {
        char* end = nullptr;
        double v = std::strtod(s.c_str(), &end);
        if (s.empty() || *end != '\0') throw InputError(bad);
        return v;
    };
    double center = number(value.substr(0, comma)), width = number(value.substr(comma + 1));
    if (!(width > 0)) throw InputError("argument --window: window width must be > 0, got " + py_float(width));
    for (auto& c : key) c = char(std::toupper(static_cast<unsigned char>(c)));
    return {key.empty() ? "*" : key, Window{center, width}};
}

namespace {

constexpr double kEmptyStdLevels = 1.0;  // scoring.py EMPTY_STD_LEVELS
// Reader facts carried into results.jsonl, in this order (scoring.py _META_FIELDS).
constexpr const char* kMetaFields[] = {"modality", "SOPInstanceUID", "InstanceNumber", "slice_position", "frame",
                                       "window"};

// scoring.py is_empty_image: grey levels of the model input vary by less than one (std * 255 < 1).
bool is_empty_image(const std::vector<float>& image) {
    if (image.empty()) return false;
    double sum = 0;
    for (float v : image) sum += v;
    const double mean = sum / double(image.size());
    double sq = 0;
    for (float v : image) sq += (v - mean) * (v - mean);
    return std::sqrt(sq / double(image.size())) * 255.0 < kEmptyStdLevels;
}

// " ".join(text.split()): one line, whatever a header held.
std::string one_line(const std::string& text) {
    std::string out, word;
    for (char c : text) {
        if (std::isspace(static_cast<unsigned char>(c))) {
            if (!word.empty()) out += (out.empty() ? "" : " ") + word;
            word.clear();
        } else {
            word += c;
        }
    }
    if (!word.empty()) out += (out.empty() ? "" : " ") + word;
    return out;
}

}  // namespace

std::vector<ItemResult> score_inputs(Engine& engine, const std::vector<std::string>& inputs, const ScoreOptions& options) {
    if (options.batch < 1) throw InputError("--batch must be >= 1, got " + std::to_string(options.batch));
    const int size = engine.image_size();
    std::vector<ItemResult> results;
    std::vector<std::size_t> pending;  // result indices of the images in `batch`
    std::vector<float> batch;
    std::size_t emitted = 0;  // results handed to on_batch so far

    auto emit = [&] {  // every result up to here is final: hand them over in input order
        if (!options.on_batch || emitted == results.size()) return;
        std::vector<ItemResult> done(std::make_move_iterator(results.begin() + long(emitted)),
                                     std::make_move_iterator(results.end()));
        options.on_batch(done);
        for (std::size_t i = 0; i < done.size(); ++i) results[emitted + i] = std::move(done[i]);
        for (std::size_t i = emitted; i < results.size(); ++i) results[i].maps.clear();
        emitted = results.size();
    };

    auto flush = [&] {
        if (pending.empty()) return;
        Outputs out = engine.infer(batch.data(), int(pending.size()));
        for (std::size_t j = 0; j < pending.size(); ++j) {
            ItemResult& r = results[pending[j]];
            for (const char* key : kScoreKeys) {
                auto it = out.find(key);
                if (it == out.end()) continue;
                const std::size_t per = it->second.data.size() / pending.size();
                r.scores.emplace_back(key, double(it->second.data[j * per]));
            }
            if (options.keep_maps && out.count("map") && out.count("map_smooth")) {
                std::vector<std::string> keys{"map", "map_smooth"};
                for (const char* k : kBranchMapKeys)
                    if (out.count(k)) keys.emplace_back(k);
                for (const auto& key : keys) {
                    const Tensor& t = out.at(key);
                    const std::size_t per = t.data.size() / pending.size();
                    r.maps.emplace_back(key, std::vector<float>(t.data.begin() + long(j * per),
                                                                t.data.begin() + long((j + 1) * per)));
                    r.map_shape.assign(t.shape.begin() + 1, t.shape.end());
                }
            }
        }
        pending.clear();
        batch.clear();
    };

    Prefetcher items(discover_in_order(inputs), size, options.windows, std::size_t(2 * options.batch));
    long number = 0;
    while (auto item = items.next()) {
        ItemResult r;
        r.path = item->key;
        r.file = item->file;
        r.number = number++;
        if (item->index) {
            r.extra.set("series", item->source);
            r.extra.set("slice", *item->index);
        }
        for (const char* key : kMetaFields)
            if (const Json* v = item->extra.get(key)) r.extra.set(key, *v);
        if (item->error) r.error = one_line(*item->error);
        else if (is_empty_image(item->image)) r.flags.emplace_back("empty");
        results.push_back(std::move(r));
        if (options.on_item) options.on_item(results.back());
        if (!item->error) {
            pending.push_back(results.size() - 1);
            batch.insert(batch.end(), item->image.begin(), item->image.end());
            if (int(pending.size()) == options.batch) {
                flush();
                emit();
            }
        } else if (pending.empty() && results.size() - emitted >= std::size_t(options.batch)) {
            emit();
        }
    }
    flush();
    emit();
    return results;
}

std::vector<ItemResult> score_to_folder(Engine& engine, const std::vector<std::string>& inputs, ScoreOptions options,
                                        RunOutput& output) {
    if (options.batch < 1) throw InputError("--batch must be >= 1, got " + std::to_string(options.batch));
    output.open();
    options.on_batch = [&output](std::vector<ItemResult>& done) { output.write(done); };
    auto results = score_inputs(engine, inputs, options);
    output.close();
    return results;
}

}  // namespace iqe
