// Inputs -> a flat stream of 2-D model inputs, as the Python runtime's
// iqe.runtime.scoring.iter_input_items (discover + iter_slices) produces them: same order,
// same keys, same per-item context fields, same error texts where the reason is the same.
//
//   discover_in_order(args)   every argument in the order given; folders scanned
//                             recursively in sorted order (hidden entries skipped); DICOM
//                             files grouped by SeriesInstanceUID, a series ordered along its
//                             slice normal (ImagePositionPatient), else by InstanceNumber
//   read_items(source, ...)   one Item per 2-D image (frame, slice) or one error Item
//
// Formats: 8-bit and 16-bit-grey PNG, JPEG (PIL's decoding), DICOM through DCMTK
// (uncompressed, RLE, JPEG, JPEG-LS; MONOCHROME1/2 and RGB). NIfTI, TIFF and BMP are
// reported as per-item errors ("not supported by iqe-native").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "iqe/image.hpp"
#include "iqe/pyformat.hpp"
#include "iqe/window.hpp"

namespace iqe {

enum class SourceKind { Dicom, DicomSeries, Error, Image, Nifti };  // alphabetical: the runtime sorts by name

struct Source {
    SourceKind kind = SourceKind::Error;
    std::string path;                // the file; for a series the folder its files share
    std::vector<std::string> files;  // for a series in volume order
    std::string series_uid;
    std::string ordered_by;  // "ImagePositionPatient" | "InstanceNumber" (series)
    std::string error;

    // How results refer to this source (Source.name in Python).
    std::string name() const;
};

// One 2-D model input or the reason there is none.
struct Item {
    std::string key;
    std::string source;
    std::optional<int> index;
    std::string file;          // the file it was read from (a series slice names its own file)
    std::vector<float> image;  // [3, S, S]; empty when `error` is set
    Image8 display;            // the 8-bit display image before resizing (kept on request)
    std::optional<std::string> error;
    Json extra = Json::object();  // reader facts: modality, SOPInstanceUID, InstanceNumber, slice_position, frame, window
};

// {MODALITY or "*": window}, validated (width > 0).
using WindowOverrides = std::map<std::string, Window>;

// Sources of every argument in the order given; a repeated argument is read once.
std::vector<Source> discover_in_order(const std::vector<std::string>& inputs);

// Reads one source; calls `emit` per item, in order. Never throws for bad files.
void read_items(const Source& source, int size, const WindowOverrides& windows, bool keep_display,
                const std::function<void(Item&&)>& emit);

// Python's str(Path(p)): duplicate and trailing slashes and "." parts removed.
std::string normalize_path(const std::string& p);

}  // namespace iqe
