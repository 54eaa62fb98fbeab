#include "iqe/pyformat.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace iqe {

std::string py_repr(const std::string& s) {
    bool has_single = s.find('\'') != std::string::npos;
    bool has_double = s.find('"') != std::string::npos;
    char quote = (has_single && !has_double) ? '"' : '\'';
    std::string out(1, quote);
    for (unsigned char c : s) {
        if (c == '\\') out += "\\\\";
        else if (c == static_cast<unsigned char>(quote)) out += std::string("\\") + char(c);
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else out += char(c);
    }
    out += quote;
    return out;
}

std::string py_float(double x) {
    if (std::isnan(x)) return "nan";
    if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
    if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
    char buf[64];
    // Shortest round-trip digits in scientific form: [-]d[.ddd]e[+-]XX
    auto res = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
    std::string sci(buf, res.ptr);
    std::string sign;
    if (sci[0] == '-') {
        sign = "-";
        sci.erase(0, 1);
    }
    std::size_t e = sci.find('e');
    std::string mant = sci.substr(0, e);
    int exp10 = std::atoi(sci.c_str() + e + 1);
    std::string digits;
    for (char c : mant)
        if (c != '.') digits += c;
    if (exp10 >= -5 + 1 && exp10 < 16) {  // Python's repr: fixed when -4 <= exponent < 16
        std::string out;
        if (exp10 < 0) {
            out = "0." + std::string(std::size_t(-exp10 - 1), '0') + digits;
        } else if (std::size_t(exp10 + 1) >= digits.size()) {
            out = digits + std::string(std::size_t(exp10 + 1) - digits.size(), '0') + ".0";
        } else {
            out = digits.substr(0, std::size_t(exp10 + 1)) + "." + digits.substr(std::size_t(exp10 + 1));
        }
        return sign + out;
    }
    std::string out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char ebuf[16];
    std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    return sign + out + ebuf;
}

Json& Json::set(const std::string& key, Json v) {
    auto& obj = std::get<std::shared_ptr<Object>>(value);
    for (auto& kv : obj->items) {
        if (kv.first == key) {
            kv.second = std::move(v);
            return *this;
        }
    }
    obj->items.emplace_back(key, std::move(v));
    return *this;
}

bool Json::has(const std::string& key) const { return get(key) != nullptr; }

const Json* Json::get(const std::string& key) const {
    if (!std::holds_alternative<std::shared_ptr<Object>>(value)) return nullptr;
    for (const auto& kv : std::get<std::shared_ptr<Object>>(value)->items)
        if (kv.first == key) return &kv.second;
    return nullptr;
}

namespace {

void dump_string(const std::string& s, std::string& out) {
    out += '"';
    for (std::size_t i = 0; i < s.size(); ++i) {
        unsigned char c = s[i];
        switch (c) {
            case '"': out += "\\\""; continue;
            case '\\': out += "\\\\"; continue;
            case '\n': out += "\\n"; continue;
            case '\r': out += "\\r"; continue;
            case '\t': out += "\\t"; continue;
            case '\b': out += "\\b"; continue;
            case '\f': out += "\\f"; continue;
            default: break;
        }
        char buf[16];
        if (c < 0x20 || c == 0x7f) {
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else if (c < 0x80) {
            out += char(c);
        } else {  // UTF-8 -> \uXXXX (surrogate pairs above the BMP), like ensure_ascii
            unsigned cp = 0;
            int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
            cp = c & (0x3F >> extra);
            for (int k = 0; k < extra && i + 1 < s.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[++i]) & 0x3F);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                std::snprintf(buf, sizeof buf, "\\u%04x", cp);
            }
            out += buf;
        }
    }
    out += '"';
}

void dump(const Json& j, std::string& out) {
    std::visit(
        [&out](const auto& v) {
            using T = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<T, std::nullptr_t>) out += "null";
            else if constexpr (std::is_same_v<T, bool>) out += v ? "true" : "false";
            else if constexpr (std::is_same_v<T, std::int64_t>) out += std::to_string(v);
            else if constexpr (std::is_same_v<T, double>) {
                if (std::isnan(v)) out += "NaN";
                else if (std::isinf(v)) out += v > 0 ? "Infinity" : "-Infinity";
                else out += py_float(v);
            } else if constexpr (std::is_same_v<T, std::string>) dump_string(v, out);
            else if constexpr (std::is_same_v<T, std::shared_ptr<Json::Array>>) {
                out += '[';
                for (std::size_t i = 0; i < v->size(); ++i) {
                    if (i) out += ", ";
                    dump((*v)[i], out);
                }
                out += ']';
            } else {
                out += '{';
                bool first = true;
                for (const auto& kv : v->items) {
                    if (!first) out += ", ";
                    first = false;
                    dump_string(kv.first, out);
                    out += ": ";
                    dump(kv.second, out);
                }
                out += '}';
            }
        },
        j.value);
}

}  // namespace

std::string Json::dump() const {
    std::string out;
    iqe::dump(*this, out);
    return out;
}

}  // namespace iqe
