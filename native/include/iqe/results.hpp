// The output contract of `iqe score` (iqe/runtime/results.py), written as the run goes:
//   OUT/results.jsonl     one JSON object per item in input order, appended and fsynced per batch
//   OUT/maps/NNNNNN.npz   per scored item (save_maps): `map`, `map_smooth` [S, S] float32, named by
//                         the row's "maps" key (NNNNNN = the item's running number)
//   OUT/.iqe-run.jsonl    the run record: options, then every file the run writes (named before it is written)
// A folder is written only when new, empty, or holding a run record; the recorded files of the
// previous run are removed first (files of the user beside them stay).
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "iqe/pyformat.hpp"

namespace iqe {

constexpr const char* kScoreKeys[] = {"score", "score_query", "score_text", "score_few", "map_max", "score_zero"};
constexpr const char* kBranchMapKeys[] = {"map_zero", "map_few"};  // MVFA's raw per-branch maps, saved beside map

struct ItemResult {
    std::string path;                                    // the item's key
    std::string file;                                    // the file it was read from
    std::optional<long> number;                          // running number in input order
    Json extra = Json::object();                         // series, slice, then the reader's context fields
    std::vector<std::string> flags;                      // e.g. "empty" (a (near-)constant input)
    std::optional<std::string> error;
    std::vector<std::pair<std::string, double>> scores;  // in kScoreKeys order
    std::vector<std::pair<std::string, std::vector<float>>> maps;  // map, map_smooth (+ branch maps) when kept
    std::vector<long> map_shape;                         // their shape (the graph's, less the batch axis)
    std::string maps_file;                               // "maps/NNNNNN.npz" once written
};

// The results.jsonl row (results.py ItemResult.to_json): path, file, item, extra, flags,
// then error, or the scores and "maps".
Json result_json(const ItemResult& r);

// One `iqe score`-style output folder (results.py RunOutput, without --resume).
class RunOutput {
public:
    // Checks the folder like check_out_dir (InputError with its messages); writes nothing yet.
    RunOutput(const std::string& out_dir, const Json& options, bool save_maps);
    ~RunOutput();
    RunOutput(const RunOutput&) = delete;
    RunOutput& operator=(const RunOutput&) = delete;

    // Removes exactly the previous run's recorded files, starts the record and an empty results.jsonl.
    void open();
    // Each scored item's maps file, then all rows appended, flushed and fsynced. Drops the maps.
    void write(std::vector<ItemResult>& batch);
    void close();
    std::string results_path() const;

private:
    std::string claim(const std::string& name);  // records `name`, returns its full path
    std::string out_;
    Json options_;
    bool save_maps_;
    std::FILE* record_ = nullptr;
    std::FILE* results_ = nullptr;
};

// One array as .npy bytes (format 1.0): float32 or uint8 with a shape, or a unicode string array.
std::string npy_float32(const std::vector<float>& data, const std::vector<long>& shape);
std::string npy_uint8(const std::vector<std::uint8_t>& data, const std::vector<long>& shape);
std::string npy_unicode(const std::vector<std::string>& values);

// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename, fsync dir).
void atomic_write(const std::string& path, const std::string& bytes);

}  // namespace iqe
