// PNG/JPEG decoding (libpng, libjpeg-turbo) and Pillow's 8-bit bicubic resampling.
#include "iqe/image.hpp"

#include <cstdio>
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#include "iqe/errors.hpp"
#include "iqe/pyformat.hpp"

namespace iqe {
namespace {

struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// PIL's message when no plugin recognises the file (Image.open raises UnidentifiedImageError).
InputError unidentified(const std::string& path) {
    return InputError(path + ": cannot decode image (UnidentifiedImageError: cannot identify image file " +
                      py_repr(path) + ")");
}

InputError truncated(const std::string& path) {
    return InputError(path + ": cannot decode image (OSError: image file is truncated)");
}

// ------------------------------------------------------------------------------------ PNG

struct PngFailure {
    std::jmp_buf jump;
    bool in_header = true;
};

void png_fail(png_structp png, png_const_charp) {
    auto* failure = static_cast<PngFailure*>(png_get_error_ptr(png));
    std::longjmp(failure->jump, 1);
}

void png_quiet(png_structp, png_const_charp) {}

struct PngDecoded {
    int width = 0, height = 0, channels = 0, depth = 8;
    std::vector<std::uint8_t> bytes;  // rows as libpng delivers them after the transforms below
    std::vector<png_color> palette;
    bool is_palette = false;
};

// Everything between setjmp and a possible longjmp lives in `out` (heap) or is POD, so the
// jump skips no destructor that matters.
bool read_png(std::FILE* fp, PngDecoded* out, bool* failed_in_header) {
    PngFailure failure;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_fail, png_quiet);
    if (png == nullptr) return false;
    png_infop info = png_create_info_struct(png);
    if (info == nullptr) {
        png_destroy_read_struct(&png, nullptr, nullptr);
        return false;
    }
    std::vector<png_bytep>* rows = new std::vector<png_bytep>();
    if (setjmp(failure.jump)) {
        *failed_in_header = failure.in_header;
        png_destroy_read_struct(&png, &info, nullptr);
        delete rows;
        return false;
    }
    png_init_io(png, fp);
    png_set_crc_action(png, PNG_CRC_DEFAULT, PNG_CRC_DEFAULT);
    png_read_info(png, info);
    failure.in_header = false;
    png_uint_32 width = 0, height = 0;
    int depth = 0, color = 0, interlace = 0;
    png_get_IHDR(png, info, &width, &height, &depth, &color, &interlace, nullptr, nullptr);
    out->width = int(width);
    out->height = int(height);
    if (color == PNG_COLOR_TYPE_PALETTE) {
        // Indices, mapped through PLTE below (PIL: mode P, convert('RGB') ignores tRNS).
        png_set_packing(png);
        png_colorp plte = nullptr;
        int n = 0;
        if (png_get_PLTE(png, info, &plte, &n) != 0) out->palette.assign(plte, plte + n);
        out->is_palette = true;
        out->channels = 1;
    } else if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) {
        if (depth < 8) png_set_expand_gray_1_2_4_to_8(png);  // 1/2/4-bit -> x255/x85/x17, like PIL
        if (color == PNG_COLOR_TYPE_GRAY_ALPHA) {
            png_set_strip_alpha(png);
            if (depth == 16) png_set_strip_16(png);  // PIL "LA;16B": the high byte
        }
        out->channels = 1;
        out->depth = (depth == 16 && color == PNG_COLOR_TYPE_GRAY) ? 16 : 8;
    } else {
        if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
        if (depth == 16) png_set_strip_16(png);  // PIL "RGB;16B"/"RGBA;16B": the high byte
        out->channels = 3;
    }
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    std::size_t rowbytes = png_get_rowbytes(png, info);
    out->bytes.resize(rowbytes * height);
    rows->resize(height);
    for (png_uint_32 y = 0; y < height; ++y) (*rows)[y] = out->bytes.data() + y * rowbytes;
    png_read_image(png, rows->data());
    png_destroy_read_struct(&png, &info, nullptr);
    delete rows;
    return true;
}

Image8 decode_png(const std::string& path, std::FILE* fp, std::vector<std::uint16_t>* grey16, int* w16, int* h16) {
    PngDecoded d;
    bool in_header = true;
    if (!read_png(fp, &d, &in_header)) {
        if (in_header) throw unidentified(path);
        throw truncated(path);
    }
    if (d.depth == 16) {
        if (grey16 == nullptr) throw InputError(path + ": 16-bit PNG needs the high-bit path");
        grey16->resize(std::size_t(d.width) * d.height);
        for (std::size_t i = 0; i < grey16->size(); ++i)
            (*grey16)[i] = std::uint16_t((d.bytes[2 * i] << 8) | d.bytes[2 * i + 1]);  // PNG is big-endian
        *w16 = d.width;
        *h16 = d.height;
        return Image8();
    }
    if (d.is_palette) {
        Image8 rgb(d.width, d.height, 3);
        for (std::size_t i = 0; i < d.bytes.size(); ++i) {
            std::size_t k = d.bytes[i];
            png_color c = k < d.palette.size() ? d.palette[k] : png_color{0, 0, 0};
            rgb.pixels[3 * i] = c.red;
            rgb.pixels[3 * i + 1] = c.green;
            rgb.pixels[3 * i + 2] = c.blue;
        }
        return rgb;
    }
    Image8 img(d.width, d.height, d.channels);
    img.pixels = std::move(d.bytes);
    return img;
}

// ----------------------------------------------------------------------------------- JPEG

struct JpegFailure {
    jpeg_error_mgr mgr;
    std::jmp_buf jump;
    bool truncated = false;
};

void jpeg_fail(j_common_ptr cinfo) {
    std::longjmp(reinterpret_cast<JpegFailure*>(cinfo->err)->jump, 1);
}

void jpeg_note(j_common_ptr cinfo, int level) {
    // libjpeg substitutes grey for missing data after a premature end; PIL refuses the file.
    auto* failure = reinterpret_cast<JpegFailure*>(cinfo->err);
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) failure->truncated = true;
}

enum class JpegResult { ok, header, data, truncated, cmyk };

JpegResult read_jpeg(std::FILE* fp, Image8* out) {
    jpeg_decompress_struct cinfo;
    JpegFailure failure;
    cinfo.err = jpeg_std_error(&failure.mgr);
    failure.mgr.error_exit = jpeg_fail;
    failure.mgr.emit_message = jpeg_note;
    volatile bool header_done = false;
    if (setjmp(failure.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return header_done ? JpegResult::data : JpegResult::header;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, fp);
    jpeg_read_header(&cinfo, TRUE);
    header_done = true;
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return JpegResult::cmyk;
    }
    // PIL's defaults: integer slow DCT, fancy upsampling, libjpeg's YCbCr -> RGB.
    cinfo.out_color_space = cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(&cinfo);
    out->width = int(cinfo.output_width);
    out->height = int(cinfo.output_height);
    out->channels = int(cinfo.output_components);
    out->pixels.resize(std::size_t(out->width) * out->height * out->channels);
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = out->pixels.data() + std::size_t(cinfo.output_scanline) * out->width * out->channels;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    bool cut = failure.truncated;
    jpeg_destroy_decompress(&cinfo);
    return cut ? JpegResult::truncated : JpegResult::ok;
}

}  // namespace

Image8 decode_image_file(const std::string& path, std::vector<std::uint16_t>* grey16, int* w16, int* h16) {
    File fp(std::fopen(path.c_str(), "rb"));
    if (!fp) throw InputError(path + ": cannot decode image (FileNotFoundError: [Errno 2] No such file or directory: " +
                              py_repr(path) + ")");
    unsigned char magic[8] = {0};
    std::size_t got = std::fread(magic, 1, sizeof magic, fp.get());
    std::rewind(fp.get());
    static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (got == 8 && std::memcmp(magic, png_sig, 8) == 0) return decode_png(path, fp.get(), grey16, w16, h16);
    if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
        Image8 img;
        switch (read_jpeg(fp.get(), &img)) {
            case JpegResult::ok: return img;
            case JpegResult::header: throw unidentified(path);
            case JpegResult::cmyk: throw InputError(path + ": cannot decode image (iqe-native: CMYK JPEG is not supported)");
            default: throw truncated(path);
        }
    }
    bool other_format = (got >= 2 && magic[0] == 'B' && magic[1] == 'M') ||
                        (got >= 4 && (std::memcmp(magic, "II*\0", 4) == 0 || std::memcmp(magic, "MM\0*", 4) == 0)) ||
                        (got >= 4 && std::memcmp(magic, "GIF8", 4) == 0);
    if (other_format) throw InputError(path + ": cannot decode image (iqe-native reads PNG and JPEG only)");
    throw unidentified(path);
}

// ------------------------------------------------------------------------ Pillow resampling

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images
constexpr double kBicubicSupport = 2.0;

double bicubic(double x) {  // Keys cubic, a = -0.5, exactly as Pillow evaluates it
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// Per output position: first input index, count, and ksize fixed-point weights.
struct Coeffs {
    int ksize = 0;
    std::vector<int> bounds;  // [2 * out]: xmin, count
    std::vector<std::int32_t> weights;
};

Coeffs precompute(int in_size, int out_size) {
    Coeffs c;
    const float in0 = 0.0f, in1 = float(in_size);  // Pillow's default box, float like its API
    double scale = double(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = kBicubicSupport * filterscale;
    c.ksize = int(std::ceil(support)) * 2 + 1;
    c.bounds.resize(std::size_t(out_size) * 2);
    c.weights.assign(std::size_t(out_size) * c.ksize, 0);
    std::vector<double> k(c.ksize);
    for (int xx = 0; xx < out_size; ++xx) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        int xmin = int(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = int(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        std::fill(k.begin(), k.end(), 0.0);
        for (int x = 0; x < xmax; ++x) {
            double w = bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; ++x)
            if (ww != 0.0) k[x] /= ww;
        for (int x = 0; x < c.ksize; ++x) {
            double v = k[x] * (1 << kPrecisionBits);
            c.weights[std::size_t(xx) * c.ksize + x] = k[x] < 0 ? int(-0.5 + v) : int(0.5 + v);
        }
        c.bounds[2 * xx] = xmin;
        c.bounds[2 * xx + 1] = xmax;
    }
    return c;
}

inline std::uint8_t clip8(int acc) {
    int v = acc >> kPrecisionBits;  // arithmetic shift, like Pillow's lookup index
    return std::uint8_t(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

namespace {

// One horizontal pass over rows [offset, offset + out.height) of `in`.
void horizontal_pass(const Image8& in, Image8& out, int offset, const Coeffs& c) {
    const int ch = in.channels;
    for (int yy = 0; yy < out.height; ++yy) {
        const std::uint8_t* row = in.pixels.data() + std::size_t(yy + offset) * in.width * ch;
        std::uint8_t* dst = out.pixels.data() + std::size_t(yy) * out.width * ch;
        for (int xx = 0; xx < out.width; ++xx) {
            const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
            const std::int32_t* k = c.weights.data() + std::size_t(xx) * c.ksize;
            for (int ch_i = 0; ch_i < ch; ++ch_i) {
                int ss = 1 << (kPrecisionBits - 1);
                for (int x = 0; x < xmax; ++x) ss += int(row[(x + xmin) * ch + ch_i]) * k[x];
                dst[xx * ch + ch_i] = clip8(ss);
            }
        }
    }
}

void vertical_pass(const Image8& in, Image8& out, const Coeffs& c) {
    const std::size_t stride = std::size_t(in.width) * in.channels;
    for (int yy = 0; yy < out.height; ++yy) {
        const int ymin = c.bounds[2 * yy], ymax = c.bounds[2 * yy + 1];
        const std::int32_t* k = c.weights.data() + std::size_t(yy) * c.ksize;
        std::uint8_t* dst = out.pixels.data() + std::size_t(yy) * stride;
        for (std::size_t xc = 0; xc < stride; ++xc) {
            int ss = 1 << (kPrecisionBits - 1);
            for (int y = 0; y < ymax; ++y) ss += int(in.pixels[std::size_t(y + ymin) * stride + xc]) * k[y];
            dst[xc] = clip8(ss);
        }
    }
}

}  // namespace

Image8 resize_bicubic(const Image8& in, int out_w, int out_h) {
    if (out_w == in.width && out_h == in.height) return in;  // Pillow copies
    const int ch = in.channels;
    const bool need_h = out_w != in.width;
    const bool need_v = out_h != in.height;
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice
    // as many pixels as the width (ImagingResampleInner); the order changes the rounding
    // of the 8-bit intermediate, so it is reproduced.
    const bool horizontal_first = !((in.height - out_h) > 0 && (in.height - out_h) > (in.width - out_w) * 2);
    if (horizontal_first) {
        Coeffs vert = precompute(in.height, out_h);
        const int y_first = vert.bounds[0];
        const int y_last = vert.bounds[2 * out_h - 2] + vert.bounds[2 * out_h - 1];
        if (!need_h) {
            Image8 out(in.width, out_h, ch);
            vertical_pass(in, out, vert);
            return out;
        }
        for (int i = 0; i < out_h; ++i) vert.bounds[2 * i] -= y_first;
        // Only the source rows the vertical pass reads.
        Image8 temp(out_w, need_v ? y_last - y_first : in.height, ch);
        horizontal_pass(in, temp, need_v ? y_first : 0, precompute(in.width, out_w));
        if (!need_v) return temp;
        Image8 out(out_w, out_h, ch);
        vertical_pass(temp, out, vert);
        return out;
    }
    Image8 temp(in.width, out_h, ch);
    vertical_pass(in, temp, precompute(in.height, out_h));
    if (!need_h) return temp;
    Image8 out(out_w, out_h, ch);
    horizontal_pass(temp, out, 0, precompute(in.width, out_w));
    return out;
}

std::vector<float> to_model_input(const Image8& image, int size) {
    Image8 resized = resize_bicubic(image, size, size);
    const std::size_t plane = std::size_t(size) * size;
    std::vector<float> out(3 * plane);
    for (std::size_t i = 0; i < plane; ++i) {
        for (int c = 0; c < 3; ++c) {
            std::uint8_t v = resized.channels == 1 ? resized.pixels[i] : resized.pixels[3 * i + c];
            out[c * plane + i] = float(v) / 255.0f;  // float32 division, like NumPy's uint8 -> f32 / f32(255)
        }
    }
    return out;
}

}  // namespace iqe
