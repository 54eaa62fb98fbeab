#include "iqe/sources.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <tuple>
#include <unordered_map>

#include "dicom.hpp"
#include "iqe/errors.hpp"

namespace fs = std::filesystem;

namespace iqe {
namespace {

const char* const kImageSuffixes[] = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"};

std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    return s;
}

std::string suffix_of(const std::string& path) {
    std::string name = fs::path(path).filename().string();
    auto dot = name.rfind('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == name.size()) return "";
    return lower(name.substr(dot));
}

bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string resolved(const std::string& p) {
    std::error_code ec;
    fs::path r = fs::weakly_canonical(fs::absolute(p), ec);
    return ec ? fs::absolute(p).lexically_normal().string() : r.string();
}

Source error_source(const std::string& path, const std::string& message) {
    Source s;
    s.kind = SourceKind::Error;
    s.path = path;
    s.error = message;
    return s;
}

std::vector<std::string> split_parts(const std::string& p) {
    std::vector<std::string> parts;
    std::size_t start = 0;
    while (start <= p.size()) {
        std::size_t slash = p.find('/', start);
        if (slash == std::string::npos) slash = p.size();
        if (slash > start) parts.push_back(p.substr(start, slash - start));
        start = slash + 1;
    }
    return parts;
}

// Files under `folder`, recursively, hidden entries skipped, in pathlib's sorted order
// (part by part, not by string).
std::vector<std::string> scan_folder(const std::string& folder) {
    std::vector<std::vector<std::string>> found;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(folder, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        const fs::path rel = it->path().lexically_relative(folder);
        bool hidden = false;
        for (const auto& part : rel)
            if (!part.empty() && part.string()[0] == '.') hidden = true;
        if (it->is_directory() && it->is_symlink()) it.disable_recursion_pending();  // rglob does not follow
        std::error_code fe;
        if (hidden || !fs::is_regular_file(it->path(), fe)) continue;
        found.push_back(split_parts(rel.string()));
    }
    std::sort(found.begin(), found.end());
    std::vector<std::string> out;
    out.reserve(found.size());
    for (const auto& parts : found) {
        std::string p = folder == "." ? "" : folder + (ends_with(folder, "/") ? "" : "/");
        for (std::size_t i = 0; i < parts.size(); ++i) p += (i ? "/" : "") + parts[i];
        out.push_back(p);
    }
    return out;
}

std::string common_folder(const std::vector<std::string>& files) {
    std::vector<std::vector<std::string>> parents;
    bool absolute = !files.empty() && files[0][0] == '/';
    bool mixed = false;
    for (const auto& f : files) {
        if ((f[0] == '/') != absolute) mixed = true;
    }
    for (const auto& f : files) {
        std::string parent = fs::path(f).parent_path().string();
        if (mixed) parent = fs::absolute(fs::path(f)).parent_path().string();
        parents.push_back(split_parts(parent));
    }
    std::vector<std::string> common = parents[0];
    for (const auto& p : parents) {
        std::size_t n = 0;
        while (n < common.size() && n < p.size() && common[n] == p[n]) ++n;
        common.resize(n);
    }
    std::string out = (absolute || mixed) ? "/" : "";
    for (std::size_t i = 0; i < common.size(); ++i) out += (i ? "/" : "") + common[i];
    return out.empty() ? "." : out;
}

// Volume order: position along the first file's slice normal, else InstanceNumber; ties
// by InstanceNumber, then path (sources.py _order_slices).
void order_series(std::vector<std::pair<std::string, detail::DicomHeader>>& members, std::string* ordered_by) {
    bool placed = std::all_of(members.begin(), members.end(),
                              [](const auto& m) { return m.second.position && m.second.normal; });
    const double inf = std::numeric_limits<double>::infinity();
    using Key = std::tuple<double, double, std::string>;
    std::vector<std::pair<Key, std::size_t>> keys;
    if (placed) {
        const auto n = *members[0].second.normal;
        for (std::size_t i = 0; i < members.size(); ++i) {
            const auto& h = members[i].second;
            const auto& p = *h.position;
            double along = p[0] * n[0] + p[1] * n[1] + p[2] * n[2];
            keys.push_back({{along, h.instance_number ? double(*h.instance_number) : inf, members[i].first}, i});
        }
        *ordered_by = "ImagePositionPatient";
    } else {
        for (std::size_t i = 0; i < members.size(); ++i) {
            const auto& h = members[i].second;
            keys.push_back({{h.instance_number ? double(*h.instance_number) : inf, 0.0, members[i].first}, i});
        }
        *ordered_by = "InstanceNumber";
    }
    std::stable_sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<std::pair<std::string, detail::DicomHeader>> sorted;
    for (const auto& k : keys) sorted.push_back(members[k.second]);
    members = std::move(sorted);
}

// sources.py discover() for one argument.
std::vector<Source> discover(const std::string& raw) {
    std::vector<Source> sources;
    std::vector<std::string> candidates;
    const std::string p = normalize_path(raw);
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
        candidates = scan_folder(p);
        if (candidates.empty()) sources.push_back(error_source(p, p + ": empty folder (no files to read)"));
    } else if (fs::is_regular_file(p, ec)) {
        candidates.push_back(p);
    } else {
        sources.push_back(error_source(p, p + ": no such file or folder"));
    }
    std::set<std::string> seen;
    std::vector<std::string> series_order;
    std::unordered_map<std::string, std::vector<std::pair<std::string, detail::DicomHeader>>> series;
    for (const auto& f : candidates) {
        if (!seen.insert(resolved(f)).second) continue;
        const std::string low = lower(fs::path(f).filename().string());
        const std::string suffix = suffix_of(f);
        Source s;
        s.path = f;
        s.files = {f};
        if (ends_with(low, ".nii") || ends_with(low, ".nii.gz")) {
            s.kind = SourceKind::Nifti;
            sources.push_back(s);
        } else if (std::find(std::begin(kImageSuffixes), std::end(kImageSuffixes), suffix) != std::end(kImageSuffixes)) {
            s.kind = SourceKind::Image;
            sources.push_back(s);
        } else {
            detail::DicomHeader header;
            try {
                header = detail::read_dicom_header(f);
            } catch (const InputError& e) {
                sources.push_back(error_source(f, e.what()));
                continue;
            }
            if (!header.series_uid.empty()) {
                if (!series.count(header.series_uid)) series_order.push_back(header.series_uid);
                series[header.series_uid].emplace_back(f, header);
            } else {
                s.kind = SourceKind::Dicom;
                sources.push_back(s);
            }
        }
    }
    for (const auto& uid : series_order) {
        auto members = series[uid];
        std::sort(members.begin(), members.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
        std::vector<std::pair<std::string, detail::DicomHeader>> unique;
        std::map<std::string, std::string> first_of;
        for (const auto& m : members) {
            const std::string& sop = m.second.sop_uid;
            if (!sop.empty() && first_of.count(sop)) {
                sources.push_back(error_source(m.first, m.first + " (series " + uid + "): skipped, same SOPInstanceUID as " +
                                                            first_of[sop]));
                continue;
            }
            first_of[sop] = m.first;
            unique.push_back(m);
        }
        Source s;
        s.series_uid = uid;
        if (unique.size() == 1) {
            s.kind = SourceKind::Dicom;
            s.path = unique[0].first;
            s.files = {unique[0].first};
        } else {
            order_series(unique, &s.ordered_by);
            s.kind = SourceKind::DicomSeries;
            for (const auto& m : unique) s.files.push_back(m.first);
            s.path = common_folder(s.files);
        }
        sources.push_back(s);
    }
    auto sort_key = [](const Source& s) {
        std::string first = s.files.empty() ? s.path : *std::min_element(s.files.begin(), s.files.end());
        return std::make_pair(first, int(s.kind));
    };
    std::stable_sort(sources.begin(), sources.end(),
                     [&](const Source& a, const Source& b) { return sort_key(a) < sort_key(b); });
    return sources;
}

// The runtime's _window_for: an override for the modality, else "*".
std::optional<std::pair<Window, std::string>> override_for(const std::string& modality, const WindowOverrides& windows) {
    auto it = windows.find(modality);
    if (!modality.empty() && it != windows.end()) return std::make_pair(it->second, "override " + modality);
    it = windows.find("*");
    if (it != windows.end()) return std::make_pair(it->second, std::string("override *"));
    return std::nullopt;
}

// items.py window_meta: the record of a window applied.
Json window_record(Window w, const std::string& source, const std::string& function) {
    Json r = Json::object();
    r.set("center", w.center).set("width", w.width).set("function", function).set("source", source);
    return r;
}

void read_image(const Source& source, int size, const WindowOverrides& windows, bool keep_display,
                const std::function<void(Item&&)>& emit) {
    Item item;
    item.key = source.path;
    item.source = source.name();
    item.file = source.path;
    const std::string suffix = suffix_of(source.path);
    try {
        std::vector<std::uint16_t> grey16;
        int w16 = 0, h16 = 0;
        Image8 img = decode_image_file(source.path, &grey16, &w16, &h16);
        if (!grey16.empty() || (w16 > 0 && h16 > 0)) {
            // 16-bit grey: min..max of the image as a plain range (LINEAR_EXACT), or the "*"
            // override as a DICOM LINEAR window, like the runtime's high-bit path; then the
            // 8-bit PIL path.
            std::vector<double> values(grey16.begin(), grey16.end());
            auto over = override_for("", windows);
            Window w = over ? over->first : percentile_window(values.data(), values.size(), 0.0, 100.0);
            const std::string function = over ? "LINEAR" : "LINEAR_EXACT";
            img = Image8(w16, h16, 1);
            voi_to_uint8(values.data(), values.size(), w, function, img.pixels.data());
            item.extra.set("window", window_record(w, over ? over->second : "min-max", function));
        }
        item.image = to_model_input(img, size);
        if (keep_display) item.display = std::move(img);
    } catch (const InputError& e) {
        item.error = e.what();
        item.extra = Json::object();
    }
    emit(std::move(item));
}

}  // namespace

std::string Source::name() const {
    return kind == SourceKind::DicomSeries ? path + " (series " + series_uid + ")" : path;
}

std::string normalize_path(const std::string& p) {
    if (p.empty()) return ".";
    bool absolute = p[0] == '/';
    std::string out = absolute ? "/" : "";
    bool first = true;
    for (const auto& part : split_parts(p)) {
        if (part == ".") continue;
        out += (first ? "" : "/") + part;
        first = false;
    }
    return out.empty() ? "." : out;
}

std::vector<Source> discover_in_order(const std::vector<std::string>& inputs) {
    std::set<std::string> seen;
    std::vector<Source> out;
    for (const auto& raw : inputs) {
        if (!seen.insert(resolved(normalize_path(raw))).second) continue;
        for (auto& s : discover(raw)) out.push_back(std::move(s));
    }
    return out;
}

void read_items(const Source& source, int size, const WindowOverrides& windows, bool keep_display,
                const std::function<void(Item&&)>& emit) {
    switch (source.kind) {
        case SourceKind::Error: {
            Item item;
            item.key = source.path;
            item.source = source.name();
            item.file = source.path;
            item.error = source.error;
            emit(std::move(item));
            return;
        }
        case SourceKind::Image:
            read_image(source, size, windows, keep_display, emit);
            return;
        case SourceKind::Nifti: {
            Item item;
            item.key = source.path;
            item.source = source.name();
            item.file = source.path;
            item.error = source.path + ": NIfTI is not supported by iqe-native (use `iqe score`)";
            emit(std::move(item));
            return;
        }
        case SourceKind::Dicom:
            detail::read_dicom_items(source, source.files[0], std::nullopt, size, windows, keep_display,
                                     [&](Item&& item) {
                                         item.file = source.files[0];
                                         emit(std::move(item));
                                     });
            return;
        case SourceKind::DicomSeries: {
            int index = 0;
            for (const auto& f : source.files) {
                detail::read_dicom_items(source, f, index, size, windows, keep_display, [&](Item&& item) {
                    ++index;
                    item.file = f;
                    emit(std::move(item));
                });
            }
            return;
        }
    }
}

}  // namespace iqe
