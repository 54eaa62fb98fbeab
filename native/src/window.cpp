#include "iqe/window.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace iqe {

void voi_to_uint8(const double* values, std::size_t n, Window w, const std::string& function_in, std::uint8_t* out) {
    const double c = w.center, width = w.width;
    if (!(std::isfinite(c) && std::isfinite(width)) || width <= 0) {
        std::fill(out, out + n, std::uint8_t(0));
        return;
    }
    std::string function = function_in;
    if (function != "LINEAR" && function != "LINEAR_EXACT" && function != "SIGMOID") function = "LINEAR";
    if (function == "LINEAR" && width <= 1) function = "LINEAR_EXACT";
    const double output_scale = 255.0 - 0.0;
    const double scale_factor = function == "LINEAR" ? output_scale / (width - 1) : output_scale / width;
    const double window_min = c - width / 2.0;
    const bool sigmoid = function == "SIGMOID";
    for (std::size_t i = 0; i < n; ++i) {
        double x = values[i];
        if (std::isnan(x)) x = c - width;  // np.nan_to_num(nan=c - w, posinf=c + w, neginf=c - w)
        else if (std::isinf(x)) x = x > 0 ? c + width : c - width;
        double y;
        if (sigmoid) {
            const double exp_term = std::exp(-4.0 * (x - c) / width);  // inf far below: the limit 0 is right
            y = (255.0 - 0.0) / (1.0 + exp_term) + 0.0;
        } else {
            y = (x - window_min) * scale_factor + 0.0;
        }
        y = std::clamp(y, 0.0, 255.0);
        out[i] = std::uint8_t(std::nearbyint(y));
    }
}

Window range_window(double lo, double hi) { return Window{(lo + hi) / 2, hi - lo}; }

Window percentile_window(const double* values, std::size_t n, double lo_pct, double hi_pct) {
    std::vector<double> finite;
    finite.reserve(n);
    for (std::size_t i = 0; i < n; ++i)
        if (std::isfinite(values[i])) finite.push_back(values[i]);
    if (finite.empty()) return Window{0.0, 0.0};
    std::sort(finite.begin(), finite.end());
    // NumPy "linear": virtual index (n - 1) * q, then lerp with its two-sided formula.
    auto at = [&finite](double pct) {
        const double q = pct / 100.0;
        const double virtual_index = double(finite.size() - 1) * q;
        double prev = std::floor(virtual_index);
        std::size_t i0 = std::size_t(std::clamp(prev, 0.0, double(finite.size() - 1)));
        std::size_t i1 = std::min(i0 + 1, finite.size() - 1);
        double gamma = virtual_index - prev;
        double a = finite[i0], b = finite[i1];
        double diff = b - a;
        return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
    };
    return range_window(at(lo_pct), at(hi_pct));
}

}  // namespace iqe
