// DICOM files -> items, following iqe/runtime/sources.py (_read_dicom, _iter_dicom_file,
// _dicom_display_input, _file_voi, _dicom_meta) with DCMTK in place of pydicom.
#include "dicom.hpp"

#include <dcmtk/dcmdata/dcpixseq.h>
#include <dcmtk/dcmdata/dcpxitem.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <functional>
#include <memory>
#include <mutex>

#include "iqe/errors.hpp"
#include "j2k.hpp"

namespace iqe::detail {
namespace {

const double kCtWindow[2] = {40.0, 400.0};  // sources.py DEFAULT_WINDOWS["CT"]

void register_codecs() {
    static std::once_flag once;
    std::call_once(once, [] {
        OFLog::configure(OFLogger::FATAL_LOG_LEVEL);  // DCMTK's warnings would go to stderr
        DcmRLEDecoderRegistration::registerCodecs();
        DJDecoderRegistration::registerCodecs();
        DJLSDecoderRegistration::registerCodecs();
    });
}

std::string trim(std::string s) {
    auto notspace = [](unsigned char c) { return !std::isspace(c) && c != '\0'; };
    s.erase(s.begin(), std::find_if(s.begin(), s.end(), notspace));
    s.erase(std::find_if(s.rbegin(), s.rend(), notspace).base(), s.end());
    return s;
}

std::string upper(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::toupper(c)); });
    return s;
}

// The whole value of an element ("" when absent or empty), backslashes between values.
std::string get_string(DcmItem* ds, const DcmTagKey& tag) {
    OFString value;
    if (ds->findAndGetOFStringArray(tag, value).bad()) return "";
    return trim(value.c_str());
}

bool has_value(DcmItem* ds, const DcmTagKey& tag) {
    DcmElement* el = nullptr;
    return ds->findAndGetElement(tag, el).good() && el != nullptr && el->getLength() > 0;
}

std::vector<std::string> split_values(const std::string& s) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (true) {
        std::size_t bs = s.find('\\', start);
        out.push_back(trim(s.substr(start, bs == std::string::npos ? std::string::npos : bs - start)));
        if (bs == std::string::npos) break;
        start = bs + 1;
    }
    return out;
}

// Python float() of a DS value (strtod: the same correctly rounded double).
std::optional<double> parse_double(const std::string& s) {
    if (s.empty()) return std::nullopt;
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (end == s.c_str() || *end != '\0') return std::nullopt;
    return v;
}

std::optional<long> parse_long(const std::string& s) {
    if (s.empty()) return std::nullopt;
    char* end = nullptr;
    long v = std::strtol(s.c_str(), &end, 10);
    if (end == s.c_str() || *end != '\0') return std::nullopt;
    return v;
}

template <std::size_t N>
std::optional<std::array<double, N>> get_doubles(DcmItem* ds, const DcmTagKey& tag) {
    std::string raw = get_string(ds, tag);
    if (raw.empty()) return std::nullopt;
    auto parts = split_values(raw);
    if (parts.size() != N) return std::nullopt;
    std::array<double, N> out{};
    for (std::size_t i = 0; i < N; ++i) {
        auto v = parse_double(parts[i]);
        if (!v) return std::nullopt;
        out[i] = *v;
    }
    return out;
}

// (ImagePositionPatient, slice normal), as sources.py _geometry (np.cross's products).
void read_geometry(DcmItem* ds, DicomHeader* h) {
    auto ipp = get_doubles<3>(ds, DCM_ImagePositionPatient);
    auto iop = get_doubles<6>(ds, DCM_ImageOrientationPatient);
    if (!ipp || !iop) return;
    const auto& a = *iop;
    h->position = ipp;
    h->normal = std::array<double, 3>{a[1] * a[5] - a[2] * a[4], a[2] * a[3] - a[0] * a[5], a[0] * a[4] - a[1] * a[3]};
}

DicomHeader header_of(DcmItem* ds) {
    DicomHeader h;
    h.series_uid = get_string(ds, DCM_SeriesInstanceUID);
    h.sop_uid = get_string(ds, DCM_SOPInstanceUID);
    h.instance_number = parse_long(get_string(ds, DCM_InstanceNumber));
    read_geometry(ds, &h);
    return h;
}

std::string not_dicom_message(const std::string& path) {
    return path + ": not DICOM (no DICM marker, no data set at byte 0) and not an image or NIfTI file "
                  "(.png, .jpg, .jpeg, .bmp, .tif, .tiff, .nii, .nii.gz)";
}

// pydicom's UID names are DCMTK's keyword-style names with spaces ("CTImageStorage" ->
// "CT Image Storage"): a space before a capital that starts a word.
std::string sop_class_name(const std::string& uid) {
    if (uid.empty()) return "unknown";
    const char* name = dcmFindNameOfUID(uid.c_str(), nullptr);
    if (name == nullptr) return uid;
    std::string s(name), out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        bool cap = std::isupper(static_cast<unsigned char>(s[i]));
        bool prev_lower = i > 0 && (std::islower(static_cast<unsigned char>(s[i - 1])) ||
                                    std::isdigit(static_cast<unsigned char>(s[i - 1])));
        bool acronym_end = i > 0 && std::isupper(static_cast<unsigned char>(s[i - 1])) && i + 1 < s.size() &&
                           std::islower(static_cast<unsigned char>(s[i + 1]));
        if (cap && (prev_lower || acronym_end)) out += ' ';
        out += s[i];
    }
    return out;
}

bool file_contains_pixel_data_tag(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    static const char tag[4] = {char(0xE0), char(0x7F), char(0x10), char(0x00)};
    return bytes.find(std::string(tag, 4)) != std::string::npos;
}

struct Loaded {
    DcmFileFormat file;
    bool complete = true;
};

// Reads a file the way sources.py _read_dicom accepts it. Throws InputError.
void load(const std::string& path, Loaded* out, bool header_only) {
    register_codecs();
    if (!looks_like_dicom(path)) throw InputError(not_dicom_message(path));
    OFCondition st = header_only ? out->file.loadFileUntilTag(path.c_str(), EXS_Unknown, EGL_noChange, 4096,
                                                              ERM_autoDetect, DCM_PixelData)
                                 : out->file.loadFile(path.c_str());
    if (st.bad()) {
        // Like pydicom, keep what could be parsed of a truncated file (the caller reports
        // the missing pixel data); a file with nothing readable is an error.
        out->complete = false;
        if (out->file.getDataset() == nullptr || out->file.getDataset()->card() == 0)
            throw InputError(path + ": cannot read DICOM header (" + std::string(st.text()) + ")");
    }
}

// Key, index and label of a frame (sources.py _iter_dicom_file name_of).
struct FrameName {
    std::string key;
    std::optional<int> index;
    std::string label;
};

// `frame`: the stored frame number; `position`: its place in volume order (dicom.py name_of).
FrameName name_of(const Source& source, const std::string& path, std::optional<int> first_index, int frame,
                  int position, int frames) {
    if (!first_index) {
        if (frames == 1) return {path, std::nullopt, path};
        return {path + "#" + std::to_string(frame), position, path + " (frame " + std::to_string(frame) + ")"};
    }
    int i = *first_index + position;
    return {source.series_uid + "#" + std::to_string(i), i,
            path + " (series " + source.series_uid + ", slice " + std::to_string(i) + ")"};
}

// results.jsonl context the runtime keeps from _dicom_meta (never patient identity).
Json meta_of(DcmItem* ds) {
    Json m = Json::object();
    std::string modality = get_string(ds, DCM_Modality);
    m.set("modality", modality.empty() ? Json(nullptr) : Json(modality));
    std::string sop = get_string(ds, DCM_SOPInstanceUID);
    if (!sop.empty()) m.set("SOPInstanceUID", sop);
    std::string number = get_string(ds, DCM_InstanceNumber);
    if (!number.empty()) {
        auto n = parse_long(number);
        m.set("InstanceNumber", n ? Json(std::int64_t(*n)) : Json(number));
    }
    DicomHeader h;
    read_geometry(ds, &h);
    if (h.position) {
        const auto& p = *h.position;
        const auto& n = *h.normal;
        m.set("slice_position", p[0] * n[0] + p[1] * n[1] + p[2] * n[2]);
    }
    return m;
}

// items.py window_meta: the record of a window applied.
Json window_record(std::optional<double> center, std::optional<double> width, const std::string& function,
                   const std::string& source) {
    Json r = Json::object();
    r.set("center", center ? Json(*center) : Json(nullptr));
    r.set("width", width ? Json(*width) : Json(nullptr));
    r.set("function", function);
    r.set("source", source);
    return r;
}

unsigned short get_us(DcmItem* ds, const DcmTagKey& tag, unsigned short fallback) {
    Uint16 v = 0;
    return ds->findAndGetUint16(tag, v).good() ? v : fallback;
}

// Why this data set gives no image here (sources.py _not_decodable), or "".
std::string not_decodable(DcmDataset* ds, DcmMetaInfo* meta, const Loaded& loaded, const std::string& path) {
    if (!ds->tagExists(DCM_PixelData) && !ds->tagExists(DCM_FloatPixelData) && !ds->tagExists(DCM_DoubleFloatPixelData)) {
        std::string sop = get_string(ds, DCM_SOPClassUID);
        if (sop.empty() && meta != nullptr) sop = get_string(meta, DCM_MediaStorageSOPClassUID);
        std::string name = sop_class_name(sop);
        if (!loaded.complete && file_contains_pixel_data_tag(path))
            return "cannot decode pixel data (ValueError: The number of bytes of pixel data is less than expected)";
        std::string hint = name.find("Image Storage") != std::string::npos ? "; file truncated?" : "";
        return "not an image (SOP Class " + name + "): no Pixel Data" + hint;
    }
    if (!ds->tagExists(DCM_PixelData)) return "float pixel data is not supported by iqe-native";
    DcmXfer xfer(ds->getOriginalXfer());
    if (xfer.getXfer() == EXS_Unknown) return "unknown transfer syntax";
    if (!xfer.isEncapsulated() || is_j2k_syntax(xfer.getXferID())) return "";  // J2K: OpenJPEG, per frame
    OFCondition st = ds->chooseRepresentation(EXS_LittleEndianExplicit, nullptr);
    if (st.bad() || !ds->canWriteXfer(EXS_LittleEndianExplicit))
        return std::string("unsupported transfer syntax ") + xfer.getXferName() + " (" + xfer.getXferID() +
               "): iqe-native has no decoder for it";
    return "";
}

// One frame's samples as doubles (native pixel data, little endian after decoding).
bool frame_values(const Uint8* bytes, unsigned long length, int frame, std::size_t per_frame, int bits_alloc,
                  int bits_stored, bool is_signed, std::vector<double>* out) {
    const std::size_t bpp = std::size_t(bits_alloc / 8);
    const std::size_t offset = std::size_t(frame) * per_frame * bpp;
    if (offset + per_frame * bpp > length) return false;
    out->resize(per_frame);
    const Uint8* p = bytes + offset;
    const int shift = 32 - bits_stored;
    for (std::size_t i = 0; i < per_frame; ++i) {
        std::uint32_t raw = 0;
        for (std::size_t b = 0; b < bpp; ++b) raw |= std::uint32_t(p[i * bpp + b]) << (8 * b);
        double v;
        if (is_signed) {
            // Sign from the stored bits, like pydicom's sign correction.
            std::int32_t s = std::int32_t(raw << shift) >> shift;
            v = double(s);
        } else {
            v = double(raw);
        }
        (*out)[i] = v;
    }
    return true;
}

// dicom.py _FRAME_GROUPS: functional group sequences (PS3.3 C.7.6.16.2) -> what they carry per frame.
const std::pair<DcmTagKey, std::vector<DcmTagKey>> kFrameGroups[] = {
    {DCM_PixelValueTransformationSequence, {DCM_RescaleIntercept, DCM_RescaleSlope, DCM_RescaleType}},
    {DCM_FrameVOILUTSequence, {DCM_WindowCenter, DCM_WindowWidth, DCM_VOILUTFunction, DCM_WindowCenterWidthExplanation}},
    {DCM_PlanePositionSequence, {DCM_ImagePositionPatient}},
    {DCM_PlaneOrientationSequence, {DCM_ImageOrientationPatient}},
    {DCM_PixelMeasuresSequence, {DCM_PixelSpacing, DCM_SliceThickness}},
};

bool is_enhanced(DcmItem* ds) {
    return ds->tagExists(DCM_PerFrameFunctionalGroupsSequence) || ds->tagExists(DCM_SharedFunctionalGroupsSequence);
}

// dicom.py frame_header: for an enhanced multi-frame object, the top-level header (less pixel
// data and the group sequences) with the frame's functional group attributes lifted over it
// (per-frame item first, else the shared one); nullptr for a classic object.
std::unique_ptr<DcmItem> frame_header(DcmItem* ds, int frame) {
    if (!is_enhanced(ds)) return nullptr;
    auto flat = std::make_unique<DcmItem>();
    for (unsigned long i = 0; i < ds->card(); ++i) {
        DcmElement* e = ds->getElement(i);
        const DcmTagKey tag = e->getTag();
        if (tag == DCM_PerFrameFunctionalGroupsSequence || tag == DCM_SharedFunctionalGroupsSequence ||
            tag == DCM_PixelData || tag == DCM_FloatPixelData || tag == DCM_DoubleFloatPixelData)
            continue;
        flat->insert(static_cast<DcmElement*>(e->clone()), true);
    }
    std::vector<DcmItem*> groups;
    DcmItem* item = nullptr;
    if (ds->findAndGetSequenceItem(DCM_PerFrameFunctionalGroupsSequence, item, frame).good() && item) groups.push_back(item);
    if (ds->findAndGetSequenceItem(DCM_SharedFunctionalGroupsSequence, item, 0).good() && item) groups.push_back(item);
    for (const auto& [sequence, tags] : kFrameGroups) {
        DcmItem* found = nullptr;
        for (DcmItem* g : groups)
            if (g->findAndGetSequenceItem(sequence, found, 0).good() && found) break;
            else found = nullptr;
        if (!found) continue;
        for (const auto& tag : tags) {
            DcmElement* e = nullptr;
            if (found->findAndGetElement(tag, e).good() && e) flat->insert(static_cast<DcmElement*>(e->clone()), true);
        }
    }
    return flat;
}

// dicom.py _frame_order: frames of an enhanced object along the first frame's normal (ties:
// stored order) when every frame is placed; else as stored.
std::vector<int> frame_order(DcmItem* ds, int frames) {
    std::vector<int> order(frames);
    for (int f = 0; f < frames; ++f) order[f] = f;
    if (frames == 1 || !is_enhanced(ds)) return order;
    std::vector<DicomHeader> placed(frames);
    for (int f = 0; f < frames; ++f) {
        read_geometry(frame_header(ds, f).get(), &placed[f]);
        if (!placed[f].position) return order;
    }
    const auto normal = *placed[0].normal;
    std::vector<double> along(frames);
    for (int f = 0; f < frames; ++f) {
        const auto& p = *placed[f].position;
        along[f] = p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2];
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return along[a] < along[b]; });
    return order;
}

}  // namespace

bool looks_like_dicom(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    char head[132] = {0};
    in.read(head, sizeof head);
    std::streamsize got = in.gcount();
    if (got >= 132 && std::memcmp(head + 128, "DICM", 4) == 0) return true;
    if (got < 2) return false;
    unsigned little = static_cast<unsigned char>(head[0]) | (static_cast<unsigned char>(head[1]) << 8);
    unsigned big = (static_cast<unsigned char>(head[0]) << 8) | static_cast<unsigned char>(head[1]);
    return little == 0x0002 || little == 0x0008 || big == 0x0002 || big == 0x0008;
}

DicomHeader read_dicom_header(const std::string& path) {
    Loaded loaded;
    load(path, &loaded, true);
    return header_of(loaded.file.getDataset());
}

void read_dicom_items(const Source& source, const std::string& path, std::optional<int> first_index, int size,
                      const WindowOverrides& windows, bool keep_display, const std::function<void(Item&&)>& emit) {
    FrameName first = name_of(source, path, first_index, 0, 0, 1);
    auto error_item = [&](const FrameName& n, const std::string& message, const Json& extra) {
        Item item;
        item.key = n.key;
        item.source = source.name();
        item.index = n.index;
        item.error = message;
        item.extra = extra;
        emit(std::move(item));
    };
    Loaded loaded;
    try {
        load(path, &loaded, false);
    } catch (const InputError& e) {
        std::string msg = e.what();
        // A file readable for discovery but not in full: the runtime's wording.
        const std::string header_prefix = path + ": cannot read DICOM header (";
        if (msg.rfind(header_prefix, 0) == 0)
            msg = first.label + ": cannot read DICOM file (" + msg.substr(header_prefix.size());
        error_item(first, msg, Json::object());
        return;
    }
    DcmDataset* ds = loaded.file.getDataset();
    Json meta = meta_of(ds);
    std::string reason = not_decodable(ds, loaded.file.getMetaInfo(), loaded, path);
    if (!reason.empty()) {
        error_item(first, first.label + ": " + reason, meta);
        return;
    }
    const int rows = get_us(ds, DCM_Rows, 0), cols = get_us(ds, DCM_Columns, 0);
    const int samples = get_us(ds, DCM_SamplesPerPixel, 1);
    const int bits_alloc = get_us(ds, DCM_BitsAllocated, 0);
    const int bits_stored = get_us(ds, DCM_BitsStored, std::uint16_t(bits_alloc));
    const bool is_signed = get_us(ds, DCM_PixelRepresentation, 0) == 1;
    const int planar = get_us(ds, DCM_PlanarConfiguration, 0);
    auto frames_value = parse_long(get_string(ds, DCM_NumberOfFrames));
    const int frames = std::max(1, frames_value ? int(*frames_value) : 1);
    const std::string photometric = [&] {
        std::string p = upper(get_string(ds, DCM_PhotometricInterpretation));
        return p.empty() ? std::string("MONOCHROME2") : p;
    }();
    const std::size_t per_frame = std::size_t(rows) * cols * samples;
    const std::string xfer_uid = DcmXfer(ds->getOriginalXfer()).getXferID();
    // Frame f's samples as doubles, or the reason they cannot be read.
    std::function<std::string(int, std::vector<double>*)> frame_samples;
    DcmElement* pixel_element = nullptr;
    const Uint8* bytes = nullptr;
    std::vector<std::pair<const Uint8*, Uint32>> fragments;  // JPEG 2000: one codestream per frame
    if (rows == 0 || cols == 0 || (bits_alloc != 8 && bits_alloc != 16 && bits_alloc != 32) ||
        ds->findAndGetElement(DCM_PixelData, pixel_element).bad()) {
        error_item(first, first.label + ": cannot decode pixel data (iqe-native: Rows " + std::to_string(rows) +
                              ", Columns " + std::to_string(cols) + ", BitsAllocated " + std::to_string(bits_alloc) +
                              " not readable)", meta);
        return;
    }
    if (is_j2k_syntax(xfer_uid)) {
        DcmPixelSequence* sequence = nullptr;
        auto* pixel_data = static_cast<DcmPixelData*>(pixel_element);
        if (pixel_data->getEncapsulatedRepresentation(ds->getOriginalXfer(), nullptr, sequence).bad() || !sequence) {
            error_item(first, first.label + ": cannot decode pixel data (no encapsulated JPEG 2000 fragments)", meta);
            return;
        }
        for (unsigned long i = 1; i < sequence->card(); ++i) {  // item 0: the basic offset table
            DcmPixelItem* item = nullptr;
            Uint8* data = nullptr;
            if (sequence->getItem(item, i).good() && item->getUint8Array(data).good() && data)
                fragments.emplace_back(data, item->getLength());
        }
        // One fragment per frame, or a single frame split over several fragments.
        std::vector<std::uint8_t> joined;
        if (frames == 1 && fragments.size() > 1) {
            for (const auto& [data, length] : fragments) joined.insert(joined.end(), data, data + length);
        }
        auto joined_ptr = std::make_shared<std::vector<std::uint8_t>>(std::move(joined));
        frame_samples = [=](int frame, std::vector<double>* values) -> std::string {
            const std::uint8_t* data;
            std::size_t length;
            if (!joined_ptr->empty()) {
                data = joined_ptr->data();
                length = joined_ptr->size();
            } else if (std::size_t(frame) < fragments.size() && int(fragments.size()) == frames) {
                data = fragments[frame].first;
                length = fragments[frame].second;
            } else {
                return "cannot decode pixel data (iqe-native: " + std::to_string(fragments.size()) +
                       " JPEG 2000 fragments for " + std::to_string(frames) + " frames)";
            }
            J2kImage image;
            std::string reason = decode_j2k(data, length, &image);
            if (!reason.empty()) return "cannot decode pixel data (" + reason + ")";
            if (image.width != cols || image.height != rows || image.components != samples)
                return "cannot decode pixel data (JPEG 2000 image does not match Rows, Columns, SamplesPerPixel)";
            values->assign(image.samples.begin(), image.samples.end());
            return "";
        };
    } else {
        if (pixel_element->getUint8Array(const_cast<Uint8*&>(bytes)).bad() || bytes == nullptr) {
            error_item(first, first.label + ": cannot decode pixel data (iqe-native: no native pixel data)", meta);
            return;
        }
        const unsigned long length = pixel_element->getLength();
        if (per_frame * (bits_alloc / 8) * frames > length) {
            error_item(first, first.label + ": cannot decode pixel data (ValueError: The number of bytes of pixel "
                                  "data is less than expected)", meta);
            return;
        }
        frame_samples = [=](int frame, std::vector<double>* values) -> std::string {
            frame_values(bytes, length, frame, per_frame, bits_alloc, bits_stored, is_signed, values);
            return "";
        };
    }
    const std::string modality = upper(get_string(ds, DCM_Modality));

    const std::vector<int> order = frame_order(ds, frames);
    for (int position = 0; position < frames; ++position) {
        const int frame = order[position];
        FrameName n = name_of(source, path, first_index, frame, position, frames);
        // An enhanced object's frame: its functional groups over the top level; else the top level.
        std::unique_ptr<DcmItem> flat = frame_header(ds, frame);
        DcmItem* hdr = flat ? flat.get() : static_cast<DcmItem*>(ds);
        Json frame_meta = meta_of(hdr);  // a fresh object per frame (Json objects share storage)
        frame_meta.set("frame", frame);
        std::vector<double> values;
        if (std::string reason = frame_samples(frame, &values); !reason.empty()) {
            error_item(n, n.label + ": " + reason, frame_meta);
            continue;
        }
        Image8 display;
        Json record;
        if (photometric.rfind("MONOCHROME", 0) != 0) {
            // RGB; YBR_RCT / YBR_ICT come out of OpenJPEG as RGB (inverse MCT), and DCMTK's
            // JPEG decoders convert YBR_FULL(_422) to RGB.
            const bool rgb = photometric == "RGB" || photometric == "YBR_RCT" || photometric == "YBR_ICT";
            if (!rgb || samples != 3) {
                error_item(n, n.label + ": cannot apply the header's LUTs (iqe-native: photometric interpretation " +
                                  photometric + " is not supported)", frame_meta);
                continue;
            }
            if (planar == 1) {  // RRR..GGG..BBB -> RGBRGB
                std::vector<double> interleaved(values.size());
                const std::size_t plane = std::size_t(rows) * cols;
                for (std::size_t i = 0; i < plane; ++i)
                    for (int c = 0; c < 3; ++c) interleaved[3 * i + c] = values[c * plane + i];
                values.swap(interleaved);
            }
            const Window w = range_window(0.0, std::pow(2.0, bits_stored) - 1);
            display = Image8(cols, rows, 3);
            voi_to_uint8(values.data(), values.size(), w, "LINEAR_EXACT", display.pixels.data());
            record = window_record(w.center, w.width, "LINEAR_EXACT", std::to_string(bits_stored) + "-bit colour");
        } else {
            // Modality LUT (pydicom apply_modality_lut): LUT sequence, else rescale when both given.
            DcmItem* mlut = nullptr;
            std::string slope_s = get_string(hdr, DCM_RescaleSlope), intercept_s = get_string(hdr, DCM_RescaleIntercept);
            auto slope = parse_double(split_values(slope_s)[0]), intercept = parse_double(split_values(intercept_s)[0]);
            std::function<void(std::vector<double>&)> modality_lut = [](std::vector<double>&) {};
            if (ds->findAndGetSequenceItem(DCM_ModalityLUTSequence, mlut, 0).good() && mlut != nullptr) {
                Uint16 entries = 0;
                Sint16 first_map = 0;
                const Uint16* data = nullptr;
                unsigned long count = 0;
                mlut->findAndGetUint16(DCM_LUTDescriptor, entries, 0);
                mlut->findAndGetSint16(DCM_LUTDescriptor, first_map, 1);
                mlut->findAndGetUint16Array(DCM_LUTData, data, &count);
                const long n_entries = entries ? entries : 65536;
                modality_lut = [=](std::vector<double>& vs) {
                    for (double& v : vs) {
                        long idx = v >= first_map ? long(v) - first_map : 0;
                        idx = std::clamp(idx, 0L, std::min<long>(n_entries, long(count)) - 1);
                        v = data ? double(data[idx]) : 0.0;
                    }
                };
            } else if (slope && intercept) {
                const double a = *slope, b = *intercept;
                modality_lut = [=](std::vector<double>& vs) {
                    for (double& v : vs) {
                        v = v * a;
                        v += b;
                    }
                };
            }
            modality_lut(values);
            display = Image8(cols, rows, 1);
            // The runtime's intensity path (dicom.py _display), every window through voi_to_uint8.
            auto apply = [&](Window w, const std::string& function, const std::string& source) {
                voi_to_uint8(values.data(), values.size(), w, function, display.pixels.data());
                record = window_record(w.center, w.width, function, source);
            };
            bool done = false;
            auto over = [&]() -> std::optional<std::pair<Window, std::string>> {
                auto it = windows.find(modality);
                if (!modality.empty() && it != windows.end()) return std::make_pair(it->second, "override " + modality);
                it = windows.find("*");
                if (it != windows.end()) return std::make_pair(it->second, std::string("override *"));
                return std::nullopt;
            }();
            if (over) {
                apply(over->first, "LINEAR", over->second);
                done = true;
            }
            if (!done && has_value(hdr, DCM_WindowCenter) && has_value(hdr, DCM_WindowWidth)) {
                auto c = parse_double(split_values(get_string(hdr, DCM_WindowCenter))[0]);
                auto w = parse_double(split_values(get_string(hdr, DCM_WindowWidth))[0]);
                std::string function = upper(get_string(hdr, DCM_VOILUTFunction));
                if (function.empty()) function = "LINEAR";
                if (c && w && std::isfinite(*c) && std::isfinite(*w) && *w > 0) {
                    apply(Window{*c, *w}, function, "file window (" + function + ")");
                    done = true;
                }
            }
            // Greyscale of at most 8 stored bits: the full stored range after the Modality
            // LUT (dicom.py _eight_bit_range), so it maps like its PNG twin.
            const int stored_bits = get_us(ds, DCM_BitsStored, 16);
            if (!done && stored_bits >= 1 && stored_bits <= 8) {
                std::vector<double> ends = is_signed ? std::vector<double>{-std::pow(2.0, stored_bits - 1),
                                                                           std::pow(2.0, stored_bits - 1) - 1}
                                                     : std::vector<double>{0.0, std::pow(2.0, stored_bits) - 1};
                modality_lut(ends);
                apply(range_window(std::min(ends[0], ends[1]), std::max(ends[0], ends[1])), "LINEAR_EXACT",
                      "8-bit full range");
                done = true;
            }
            if (!done) {
                if (modality == "CT")
                    apply(Window{kCtWindow[0], kCtWindow[1]}, "LINEAR", "CT default");
                else
                    apply(percentile_window(values.data(), values.size(), 0.5, 99.5), "LINEAR_EXACT",
                          "percentile 0.5-99.5");
            }
            if (photometric == "MONOCHROME1")  // inverted after the VOI window (PS3.3 C.7.6.3.1.2)
                for (auto& v : display.pixels) v = std::uint8_t(255 - v);
        }
        Item item;
        item.key = n.key;
        item.source = source.name();
        item.index = n.index;
        item.image = to_model_input(display, size);
        if (keep_display) item.display = std::move(display);
        frame_meta.set("window", record);
        item.extra = frame_meta;
        emit(std::move(item));
    }
}

}  // namespace iqe::detail
