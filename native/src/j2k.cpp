#include "j2k.hpp"

#include <openjpeg.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace iqe::detail {
namespace {

struct Buffer {
    const std::uint8_t* data;
    std::size_t length;
    std::size_t pos = 0;
};

OPJ_SIZE_T read_cb(void* dst, OPJ_SIZE_T n, void* user) {
    auto* b = static_cast<Buffer*>(user);
    if (b->pos >= b->length) return OPJ_SIZE_T(-1);
    const std::size_t take = std::min<std::size_t>(n, b->length - b->pos);
    std::memcpy(dst, b->data + b->pos, take);
    b->pos += take;
    return take;
}

OPJ_OFF_T skip_cb(OPJ_OFF_T n, void* user) {
    auto* b = static_cast<Buffer*>(user);
    const OPJ_OFF_T target = std::clamp<OPJ_OFF_T>(OPJ_OFF_T(b->pos) + n, 0, OPJ_OFF_T(b->length));
    const OPJ_OFF_T moved = target - OPJ_OFF_T(b->pos);
    b->pos = std::size_t(target);
    return moved;
}

OPJ_BOOL seek_cb(OPJ_OFF_T n, void* user) {
    auto* b = static_cast<Buffer*>(user);
    if (n < 0 || std::size_t(n) > b->length) return OPJ_FALSE;
    b->pos = std::size_t(n);
    return OPJ_TRUE;
}

void quiet(const char*, void*) {}

struct CodecFree {
    void operator()(opj_codec_t* c) const { opj_destroy_codec(c); }
};
struct StreamFree {
    void operator()(opj_stream_t* s) const { opj_stream_destroy(s); }
};
struct ImageFree {
    void operator()(opj_image_t* i) const { opj_image_destroy(i); }
};

}  // namespace

bool is_j2k_syntax(const std::string& uid) {
    return uid == "1.2.840.10008.1.2.4.90" || uid == "1.2.840.10008.1.2.4.91";
}

std::string decode_j2k(const std::uint8_t* data, std::size_t length, J2kImage* out) {
    static const std::uint8_t jp2_sig[] = {0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20};
    const bool jp2 = length >= sizeof jp2_sig && std::memcmp(data, jp2_sig, sizeof jp2_sig) == 0;
    std::unique_ptr<opj_codec_t, CodecFree> codec(opj_create_decompress(jp2 ? OPJ_CODEC_JP2 : OPJ_CODEC_J2K));
    opj_set_info_handler(codec.get(), quiet, nullptr);
    opj_set_warning_handler(codec.get(), quiet, nullptr);
    opj_set_error_handler(codec.get(), quiet, nullptr);
    opj_dparameters_t params;
    opj_set_default_decoder_parameters(&params);
    if (!opj_setup_decoder(codec.get(), &params)) return "OpenJPEG: cannot set up the decoder";
    Buffer buffer{data, length};
    std::unique_ptr<opj_stream_t, StreamFree> stream(opj_stream_create(OPJ_J2K_STREAM_CHUNK_SIZE, OPJ_TRUE));
    opj_stream_set_user_data(stream.get(), &buffer, nullptr);
    opj_stream_set_user_data_length(stream.get(), length);
    opj_stream_set_read_function(stream.get(), read_cb);
    opj_stream_set_skip_function(stream.get(), skip_cb);
    opj_stream_set_seek_function(stream.get(), seek_cb);
    opj_image_t* raw = nullptr;
    if (!opj_read_header(stream.get(), codec.get(), &raw)) return "OpenJPEG: cannot read the codestream header";
    std::unique_ptr<opj_image_t, ImageFree> image(raw);
    if (!opj_decode(codec.get(), stream.get(), image.get()) || !opj_end_decompress(codec.get(), stream.get()))
        return "OpenJPEG: cannot decode the codestream";
    const int comps = int(image->numcomps);
    if (comps < 1) return "OpenJPEG: no components";
    const int w = int(image->comps[0].w), h = int(image->comps[0].h);
    for (int c = 0; c < comps; ++c)
        if (int(image->comps[c].w) != w || int(image->comps[c].h) != h || image->comps[c].data == nullptr)
            return "OpenJPEG: subsampled components are not supported";
    out->width = w;
    out->height = h;
    out->components = comps;
    out->samples.resize(std::size_t(w) * h * comps);
    for (int c = 0; c < comps; ++c)
        for (std::size_t i = 0; i < std::size_t(w) * h; ++i) out->samples[i * comps + c] = image->comps[c].data[i];
    return "";
}

}  // namespace iqe::detail
