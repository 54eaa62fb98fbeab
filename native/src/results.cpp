#include "iqe/results.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "iqe/errors.hpp"
#include "iqe/sources.hpp"

namespace fs = std::filesystem;

namespace iqe {
namespace {

std::string shape_text(const std::vector<long>& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() == 1) s += ",";
    return s + ")";
}

std::string npy(const std::string& descr, const std::vector<long>& shape, const std::string& payload) {
    std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape_text(shape) + ", }";
    // NumPy pads the header with spaces so the data starts on a 64-byte boundary.
    const std::size_t prefix = 10;
    std::size_t total = prefix + header.size() + 1;
    header += std::string((64 - total % 64) % 64, ' ') + "\n";
    std::string out("\x93NUMPY\x01\x00", 8);
    const std::uint16_t len = std::uint16_t(header.size());
    out += char(len & 0xFF);
    out += char(len >> 8);
    return out + header + payload;
}

// UTF-8 -> code points (NumPy's '<U' arrays hold UCS-4).
std::vector<std::uint32_t> code_points(const std::string& s) {
    std::vector<std::uint32_t> out;
    for (std::size_t i = 0; i < s.size();) {
        unsigned char c = s[i];
        int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
        std::uint32_t cp = extra ? (c & (0x3F >> extra)) : c;
        for (int k = 1; k <= extra && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
        out.push_back(cp);
        i += std::size_t(extra) + 1;
    }
    return out;
}

void put_u16(std::string& b, std::uint16_t v) {
    b += char(v & 0xFF);
    b += char(v >> 8);
}

void put_u32(std::string& b, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) b += char((v >> (8 * i)) & 0xFF);
}

// An uncompressed ZIP archive (what np.savez writes; np.load reads it).
std::string zip_stored(const std::vector<std::pair<std::string, std::string>>& members) {
    std::string out, central;
    for (const auto& [name, data] : members) {
        if (data.size() >= 0xFFFFFFFFu) throw Error("npz: member " + name + " exceeds 4 GiB");
        const std::uint32_t crc = std::uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(data.data()), uInt(data.size())));
        const std::uint32_t offset = std::uint32_t(out.size());
        const std::uint16_t time = 0, date = (1980 - 1980) << 9 | 1 << 5 | 1;
        put_u32(out, 0x04034b50);
        put_u16(out, 20), put_u16(out, 0), put_u16(out, 0), put_u16(out, time), put_u16(out, date);
        put_u32(out, crc), put_u32(out, std::uint32_t(data.size())), put_u32(out, std::uint32_t(data.size()));
        put_u16(out, std::uint16_t(name.size())), put_u16(out, 0);
        out += name;
        out += data;
        put_u32(central, 0x02014b50);
        put_u16(central, 20), put_u16(central, 20), put_u16(central, 0), put_u16(central, 0);
        put_u16(central, time), put_u16(central, date);
        put_u32(central, crc), put_u32(central, std::uint32_t(data.size())), put_u32(central, std::uint32_t(data.size()));
        put_u16(central, std::uint16_t(name.size())), put_u16(central, 0), put_u16(central, 0);
        put_u16(central, 0), put_u16(central, 0), put_u32(central, 0x81A4u << 16), put_u32(central, offset);
        central += name;
    }
    const std::uint32_t cd_offset = std::uint32_t(out.size());
    out += central;
    put_u32(out, 0x06054b50);
    put_u16(out, 0), put_u16(out, 0), put_u16(out, std::uint16_t(members.size())), put_u16(out, std::uint16_t(members.size()));
    put_u32(out, std::uint32_t(central.size())), put_u32(out, cd_offset), put_u16(out, 0);
    return out;
}

}  // namespace

std::string npy_float32(const std::vector<float>& data, const std::vector<long>& shape) {
    return npy("<f4", shape, std::string(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float)));
}

std::string npy_uint8(const std::vector<std::uint8_t>& data, const std::vector<long>& shape) {
    return npy("|u1", shape, std::string(reinterpret_cast<const char*>(data.data()), data.size()));
}

std::string npy_unicode(const std::vector<std::string>& values) {
    std::vector<std::vector<std::uint32_t>> cps;
    std::size_t width = 1;  // np.array([], dtype=str) is '<U1'
    for (const auto& v : values) {
        cps.push_back(code_points(v));
        width = std::max(width, cps.back().size());
    }
    std::string payload;
    for (const auto& c : cps)
        for (std::size_t i = 0; i < width; ++i) put_u32(payload, i < c.size() ? c[i] : 0);
    return npy("<U" + std::to_string(width), {long(values.size())}, payload);
}

void atomic_write(const std::string& path, const std::string& bytes) {
    fs::path p(path);
    const std::string tmp = (p.parent_path() / ("." + p.filename().string() + ".tmp")).string();
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
    std::size_t done = 0;
    while (done < bytes.size()) {
        ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0) {
            ::close(fd);
            ::unlink(tmp.c_str());
            throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
        }
        done += std::size_t(n);
    }
    ::fsync(fd);
    ::close(fd);
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        ::unlink(tmp.c_str());
        throw InputError(path + ": cannot rename into place (" + std::strerror(errno) + ")");
    }
    const std::string dir = p.parent_path().empty() ? "." : p.parent_path().string();
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

Json result_json(const ItemResult& r) {
    Json row = Json::object();
    row.set("path", r.path);
    if (!r.file.empty()) row.set("file", r.file);
    if (r.number) row.set("item", std::int64_t(*r.number));
    for (const auto& kv : std::get<std::shared_ptr<Json::Object>>(r.extra.value)->items) row.set(kv.first, kv.second);
    if (!r.flags.empty()) {
        Json::Array flags(r.flags.begin(), r.flags.end());
        row.set("flags", Json::array(std::move(flags)));
    }
    if (r.error) {
        row.set("error", *r.error);
    } else {
        for (const auto& [k, v] : r.scores) row.set(k, std::isfinite(v) ? Json(v) : Json(nullptr));
        if (!r.maps_file.empty()) row.set("maps", r.maps_file);
    }
    return row;
}

namespace {

constexpr const char* kResults = "results.jsonl";
constexpr const char* kRunRecord = ".iqe-run.jsonl";
constexpr int kRecordVersion = 1;
constexpr const char* kOutputDirs[] = {"maps", "overlays", "volumes"};

std::string json_line(const std::string& key, const std::string& value) {
    Json j = Json::object();
    j.set(key, value);
    return j.dump() + "\n";
}

void flush_and_sync(std::FILE* fh) {
    std::fflush(fh);
    ::fsync(::fileno(fh));
}

void fsync_dir(const std::string& dir) {
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

// The files a previous run's record lists (a torn or foreign line is skipped).
std::vector<std::string> recorded_files(const std::string& record) {
    std::vector<std::string> files;
    std::ifstream in(record);
    std::string line;
    while (std::getline(in, line)) {
        try {
            auto j = nlohmann::json::parse(line);
            if (j.is_object() && j.contains("file") && j["file"].is_string()) files.push_back(j["file"]);
        } catch (const nlohmann::json::exception&) {
        }
    }
    return files;
}

// `out/name` when `name` is a plain relative path inside `out` (a record is data, never trusted blindly).
std::optional<fs::path> safe_relative(const std::string& out, const std::string& name) {
    fs::path p(name);
    if (name.empty() || p.is_absolute()) return std::nullopt;
    for (const auto& part : p)
        if (part == "..") return std::nullopt;
    return fs::path(out) / p;
}

}  // namespace

// Keep in step with iqe/runtime/results.py check_out_dir: same checks, same messages.
RunOutput::RunOutput(const std::string& out_dir, const Json& options, bool save_maps)
    : out_(normalize_path(out_dir)), options_(options), save_maps_(save_maps) {
    const std::string prefix = "--out " + out_ + ": ";
    std::error_code ec;
    if (fs::exists(out_, ec) && !fs::is_directory(out_, ec)) throw InputError(prefix + "is a file, not a folder");
    fs::create_directories(out_, ec);
    if (ec) throw InputError(prefix + "cannot create the folder (" + std::strerror(ec.value()) + ")");
    if (::access(out_.c_str(), W_OK | X_OK) != 0) throw InputError(prefix + "folder is not writable");
    const std::string probe = (fs::path(out_) / (".iqe-write-test-" + std::to_string(::getpid()))).string();
    int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw InputError(prefix + "cannot write into the folder (" + std::strerror(errno) + ")");
    ::close(fd);
    ::unlink(probe.c_str());
    if (!fs::is_regular_file(fs::path(out_) / kRunRecord)) {
        std::vector<std::string> others;
        for (const auto& entry : fs::directory_iterator(out_)) others.push_back(entry.path().filename().string());
        std::sort(others.begin(), others.end());
        if (!others.empty()) {
            std::string shown;
            for (std::size_t i = 0; i < others.size() && i < 3; ++i) shown += (i ? ", " : "") + others[i];
            if (others.size() > 3) shown += " and " + std::to_string(others.size() - 3) + " more";
            throw InputError(prefix + "folder is not empty (" + shown + ") and was not written by `iqe score` (no " +
                             kRunRecord + "); choose a new or empty folder so no file of yours is mixed with or "
                             "replaced by results");
        }
    }
}

RunOutput::~RunOutput() { close(); }

std::string RunOutput::results_path() const { return (fs::path(out_) / kResults).string(); }

void RunOutput::open() {
    const std::string record = (fs::path(out_) / kRunRecord).string();
    if (fs::is_regular_file(record)) {
        std::set<std::string> seen;
        for (const auto& name : recorded_files(record)) {
            if (!seen.insert(name).second) continue;
            auto path = safe_relative(out_, name);
            std::error_code ec;
            if (path && fs::is_regular_file(*path, ec)) fs::remove(*path, ec);
        }
        for (const char* sub : kOutputDirs) {
            const fs::path folder = fs::path(out_) / sub;
            std::error_code ec;
            if (fs::is_directory(folder, ec) && fs::is_empty(folder, ec)) fs::remove(folder, ec);
        }
    }
    Json header = Json::object();
    header.set("iqe_run", kRecordVersion);
    header.set("options", options_);
    atomic_write(record, header.dump() + "\n" + json_line("file", kResults));
    record_ = std::fopen(record.c_str(), "a");
    atomic_write(results_path(), "");
    results_ = std::fopen(results_path().c_str(), "a");
    if (record_ == nullptr || results_ == nullptr)
        throw InputError("--out " + out_ + ": cannot write into the folder (" + std::strerror(errno) + ")");
    fsync_dir(out_);
}

std::string RunOutput::claim(const std::string& name) {
    const std::string line = json_line("file", name);
    std::fwrite(line.data(), 1, line.size(), record_);
    std::fflush(record_);
    const fs::path path = fs::path(out_) / name;
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    return path.string();
}

void RunOutput::write(std::vector<ItemResult>& batch) {
    std::string lines;
    for (auto& r : batch) {
        if (!r.error && save_maps_ && !r.maps.empty()) {
            char name[32];
            std::snprintf(name, sizeof name, "maps/%06ld.npz", r.number.value_or(0));
            std::vector<std::pair<std::string, std::string>> members;
            for (const auto& [key, values] : r.maps) members.emplace_back(key + ".npy", npy_float32(values, r.map_shape));
            atomic_write(claim(name), zip_stored(members));
            r.maps_file = name;
        }
        r.maps.clear();
        r.maps.shrink_to_fit();
        lines += result_json(r).dump() + "\n";
    }
    if (lines.empty()) return;
    std::fwrite(lines.data(), 1, lines.size(), results_);
    flush_and_sync(results_);
}

void RunOutput::close() {
    for (std::FILE** fh : {&results_, &record_}) {
        if (*fh == nullptr) continue;
        flush_and_sync(*fh);
        std::fclose(*fh);
        *fh = nullptr;
    }
}

}  // namespace iqe
