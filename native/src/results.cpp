#include "iqe/results.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "iqe/errors.hpp"

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
        if (data.size() >= 0xFFFFFFFFu) throw Error("maps.npz: member " + name + " exceeds 4 GiB");
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
    for (const auto& kv : std::get<std::shared_ptr<Json::Object>>(r.extra.value)->items) row.set(kv.first, kv.second);
    if (r.error) {
        row.set("error", *r.error);
    } else {
        for (const auto& [k, v] : r.scores) row.set(k, std::isfinite(v) ? Json(v) : Json(nullptr));
    }
    return row;
}

std::string write_results(const std::string& out_dir, const std::vector<ItemResult>& results, bool save_maps) {
    std::error_code ec;
    fs::create_directories(out_dir, ec);
    if (ec) throw InputError(out_dir + ": cannot create the output folder (" + ec.message() + ")");
    std::string lines;
    for (const auto& r : results) lines += result_json(r).dump() + "\n";
    const std::string jsonl = (fs::path(out_dir) / "results.jsonl").string();
    atomic_write(jsonl, lines);
    if (save_maps) {
        std::vector<std::string> paths, failed;
        std::vector<float> maps, smooth;
        std::vector<long> item_shape;
        for (const auto& r : results) {
            if (r.error) {
                failed.push_back(r.path);
            } else if (!r.map.empty()) {
                paths.push_back(r.path);
                maps.insert(maps.end(), r.map.begin(), r.map.end());
                smooth.insert(smooth.end(), r.map_smooth.begin(), r.map_smooth.end());
                item_shape = r.map_shape;
            }
        }
        if (paths.empty()) item_shape = {0, 0};  // the runtime's empty arrays: (0, 0, 0)
        std::vector<long> shape{long(paths.size())};
        shape.insert(shape.end(), item_shape.begin(), item_shape.end());
        std::string npz = zip_stored({{"paths.npy", npy_unicode(paths)},
                                      {"map.npy", npy_float32(maps, shape)},
                                      {"map_smooth.npy", npy_float32(smooth, shape)},
                                      {"failed.npy", npy_unicode(failed)}});
        atomic_write((fs::path(out_dir) / "maps.npz").string(), npz);
    }
    return jsonl;
}

}  // namespace iqe
