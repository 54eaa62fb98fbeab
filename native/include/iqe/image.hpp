// 8-bit images: PNG/JPEG decoding and the exact PIL preprocessing of the Python runtime.
//
// The model input of every source is produced like iqe.model.preprocess.pil_to_tensor_array:
// convert('RGB') -> resize((S, S), BICUBIC) -> float32 / 255, channels first. resize_bicubic
// reproduces Pillow's separable 8-bit convolution (libImaging/Resample.c): filter support
// scaled by the downscale factor, coefficients normalised then quantised to 22-bit fixed
// point, horizontal pass first into an 8-bit intermediate holding only the rows the
// vertical pass reads, each pass rounded and clipped to 0..255.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iqe {

// Interleaved 8-bit pixels, 1 (grey) or 3 (RGB) channels, row-major.
struct Image8 {
    int width = 0;
    int height = 0;
    int channels = 0;
    std::vector<std::uint8_t> pixels;

    Image8() = default;
    Image8(int w, int h, int c) : width(w), height(h), channels(c), pixels(std::size_t(w) * h * c) {}
};

// Decodes an 8-bit PNG or JPEG file (format by content, like PIL) to grey or RGB the way
// PIL's convert('RGB') sees it: palette expanded, alpha and tRNS dropped, 1/2/4-bit grey
// scaled to 0..255, 16-bit colour truncated to its high byte. 16-bit grey PNG is returned
// through `grey16` (min-max scaled by the caller, like the Python high-bit path).
// Throws iqe::InputError with the Python runtime's message on undecodable files.
Image8 decode_image_file(const std::string& path, std::vector<std::uint16_t>* grey16 = nullptr,
                         int* grey16_width = nullptr, int* grey16_height = nullptr);

// Pillow's Image.resize(size, BICUBIC) for 8-bit images (same bytes).
Image8 resize_bicubic(const Image8& in, int out_width, int out_height);

// The model input: RGB, bicubic to size x size, float32 [3, size, size] = uint8 / 255.0f.
// Grey images are resized once and replicated (identical to resizing the RGB copy, since
// Pillow resamples every channel with the same integer coefficients).
std::vector<float> to_model_input(const Image8& image, int size);

}  // namespace iqe
