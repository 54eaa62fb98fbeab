// Batch scoring (iqe/runtime/scoring.py score_inputs): inputs -> items -> batches -> engine
// -> one ItemResult per item in input order. A reader thread decodes the next items while
// the engine runs the current batch (bounded queue); a bad file costs only its own item.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "iqe/engine.hpp"
#include "iqe/results.hpp"
#include "iqe/sources.hpp"

namespace iqe {

struct ScoreOptions {
    int batch = 8;
    bool keep_maps = false;
    WindowOverrides windows;
    std::function<void(const ItemResult&)> on_item;  // called as items are read (progress)
    // Called with finished results in input order as soon as they exist (e.g. RunOutput::write);
    // their maps are dropped after it, so memory stays bounded by a batch.
    std::function<void(std::vector<ItemResult>&)> on_batch;
};

// Every item's result in input order (scores, errors, flags; maps only until on_batch took them).
std::vector<ItemResult> score_inputs(Engine& engine, const std::vector<std::string>& inputs, const ScoreOptions& options);

// `iqe score` into a folder (run.py score_to_folder): opens `output` (constructed, i.e.
// checked, before the engine was loaded) and streams the results into it per batch.
std::vector<ItemResult> score_to_folder(Engine& engine, const std::vector<std::string>& inputs, ScoreOptions options,
                                        RunOutput& output);

// Parses MODALITY=CENTER,WIDTH (or CENTER,WIDTH for every modality) like the `iqe` CLI.
// Throws InputError with the CLI's message.
std::pair<std::string, Window> parse_window(const std::string& text);

}  // namespace iqe
