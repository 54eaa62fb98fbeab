// Text the way the Python runtime writes it, so results.jsonl lines and error messages
// compare equal: repr() of str and float, and json.dumps (default separators, ASCII only).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace iqe {

// repr(s) of a Python str: single quotes unless the text has ' and no ".
std::string py_repr(const std::string& s);

// repr(x) of a Python float: shortest round-trip digits, exponent form outside 1e-4..1e16.
std::string py_float(double x);

// A JSON value with ordered object keys (json.dumps keeps dict insertion order).
struct Json {
    struct Object;
    using Array = std::vector<Json>;
    using Value = std::variant<std::nullptr_t, bool, std::int64_t, double, std::string, std::shared_ptr<Object>,
                               std::shared_ptr<Array>>;
    Value value;

    Json() : value(nullptr) {}
    Json(std::nullptr_t) : value(nullptr) {}
    Json(bool b) : value(b) {}
    Json(int i) : value(std::int64_t(i)) {}
    Json(std::int64_t i) : value(i) {}
    Json(double d) : value(d) {}
    Json(const char* s) : value(std::string(s)) {}
    Json(std::string s) : value(std::move(s)) {}
    static Json object() {
        Json j;
        j.value = std::make_shared<Object>();
        return j;
    }
    static Json array(Array items) {
        Json j;
        j.value = std::make_shared<Array>(std::move(items));
        return j;
    }
    // Appends (or replaces) a key of an object.
    Json& set(const std::string& key, Json v);
    bool has(const std::string& key) const;
    const Json* get(const std::string& key) const;

    // json.dumps(value): ", " and ": " separators, ensure_ascii, NaN/inf as NaN/Infinity.
    std::string dump() const;
};

struct Json::Object {
    std::vector<std::pair<std::string, Json>> items;
};

}  // namespace iqe
