// The output contract of `iqe score` (iqe/runtime/results.py): results.jsonl, one JSON
// object per input in input order, and with --save-maps maps.npz (paths, map, map_smooth
// [N, S, S] float32, failed). Both written under a temporary name, fsynced and renamed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "iqe/pyformat.hpp"

namespace iqe {

constexpr const char* kScoreKeys[] = {"score", "score_query", "score_text", "score_few", "map_max"};

struct ItemResult {
    std::string path;
    Json extra = Json::object();  // series, slice, then the reader's context fields
    std::optional<std::string> error;
    std::vector<std::pair<std::string, double>> scores;  // in kScoreKeys order
    std::vector<float> map, map_smooth;                  // one item's maps when kept
    std::vector<long> map_shape;                         // their shape (the graph's, less the batch axis)
};

// The JSON object of one result line (ItemResult.to_json): path, extra, then error or scores.
Json result_json(const ItemResult& r);

// Writes DIR/results.jsonl (and DIR/maps.npz when save_maps); returns the jsonl path.
std::string write_results(const std::string& out_dir, const std::vector<ItemResult>& results, bool save_maps);

// One array as .npy bytes (format 1.0): float32 or uint8 with a shape, or a unicode string array.
std::string npy_float32(const std::vector<float>& data, const std::vector<long>& shape);
std::string npy_uint8(const std::vector<std::uint8_t>& data, const std::vector<long>& shape);
std::string npy_unicode(const std::vector<std::string>& values);

// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename, fsync dir).
void atomic_write(const std::string& path, const std::string& bytes);

}  // namespace iqe
