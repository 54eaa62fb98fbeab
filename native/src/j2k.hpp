// JPEG 2000 (DICOM 1.2.840.10008.1.2.4.90 / .91) through OpenJPEG: DCMTK has no decoder.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iqe::detail {

struct J2kImage {
    int width = 0, height = 0, components = 0;
    std::vector<std::int32_t> samples;  // interleaved per pixel (RGB after OpenJPEG's inverse MCT)
};

// Decodes a codestream (or JP2 file) held in memory; returns "" or the reason it failed.
std::string decode_j2k(const std::uint8_t* data, std::size_t length, J2kImage* out);

// True for the JPEG 2000 transfer syntaxes this build decodes.
bool is_j2k_syntax(const std::string& uid);

}  // namespace iqe::detail
