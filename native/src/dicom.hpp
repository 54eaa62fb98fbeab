// DICOM through DCMTK (internal to libiqe): headers for discovery, frames for items.
#pragma once

#include <array>
#include <functional>
#include <optional>
#include <string>

#include "iqe/sources.hpp"

namespace iqe::detail {

struct DicomHeader {
    std::string series_uid;
    std::string sop_uid;
    std::optional<std::array<double, 3>> position;  // ImagePositionPatient
    std::optional<std::array<double, 3>> normal;    // cross(row direction, column direction)
    std::optional<long> instance_number;
};

// True when the file is DICOM (DICM marker) or a raw data set (group 0002/0008 at byte 0).
bool looks_like_dicom(const std::string& path);

// Header of a file; throws InputError with the runtime's message when it is not DICOM or
// cannot be parsed.
DicomHeader read_dicom_header(const std::string& path);

// Items of one DICOM file; `first_index` set for a series member (key SeriesUID#index).
void read_dicom_items(const Source& source, const std::string& path, std::optional<int> first_index, int size,
                      const WindowOverrides& windows, bool keep_display, const std::function<void(Item&&)>& emit);

}  // namespace iqe::detail
