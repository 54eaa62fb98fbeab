#include "iqe/window.hpp"

#include <algorithm>
#include <cmath>

namespace iqe {
namespace {

inline std::uint8_t rint_u8(double v) {  // after clipping to 0..255
    return std::uint8_t(std::nearbyint(v));
}

// MONAI ScaleIntensityRange(a_min=lo, a_max=lo + width, b_min=0, b_max=255, clip=True) on
// nan_to_num(values, nan=lo), then np.rint: the runtime's ScaleToUint8 step by step.
void range_to_uint8(const double* values, std::size_t n, Window w, std::uint8_t* out) {
    const double lo = w.center - w.width / 2;
    const double a_max = lo + w.width;
    const double span = a_max - lo;
    for (std::size_t i = 0; i < n; ++i) {
        double x = values[i];
        if (std::isnan(x)) x = lo;
        else if (std::isinf(x)) x = x > 0 ? 1.7976931348623157e308 : -1.7976931348623157e308;
        double y = (x - lo) / span;
        y = y * (255.0 - 0.0) + 0.0;
        y = std::clamp(y, 0.0, 255.0);
        out[i] = rint_u8(y);
    }
}

// pydicom apply_windowing for one value: output in [y_min, y_max].
double pydicom_window(double x, double center, double width, WindowFunction fn, double y_min, double y_max) {
    const double y_range = y_max - y_min;
    if (fn == WindowFunction::DicomSigmoid) return y_range / (1 + std::exp(-4 * (x - center) / width)) + y_min;
    if (fn == WindowFunction::DicomLinear) {
        center -= 0.5;
        width -= 1;
    }
    if (x <= center - width / 2) return y_min;
    if (x > center + width / 2) return y_max;
    return ((x - center) / width + 0.5) * y_range + y_min;
}

}  // namespace

void window_to_uint8(const double* values, std::size_t n, Window w, WindowFunction fn, std::uint8_t* out) {
    if (!(w.width > 0)) {
        std::fill(out, out + n, std::uint8_t(0));
        return;
    }
    if (fn == WindowFunction::Range) {
        range_to_uint8(values, n, w, out);
        return;
    }
    // A DICOM function straight onto 0..255 (the formula of the standard with y in 0..255).
    for (std::size_t i = 0; i < n; ++i) {
        double x = std::isnan(values[i]) ? w.center - w.width : values[i];
        double y = pydicom_window(x, w.center, w.width, fn, 0.0, 255.0);
        out[i] = rint_u8(std::clamp(y, 0.0, 255.0));
    }
}

bool file_window_to_uint8(const double* values, std::size_t n, Window w, const std::string& function,
                          double y_min, double y_max, std::uint8_t* out) {
    WindowFunction fn;
    if (function == "LINEAR") {
        if (w.width < 1) return false;
        fn = WindowFunction::DicomLinear;
    } else if (function == "LINEAR_EXACT") {
        if (w.width <= 0) return false;
        fn = WindowFunction::DicomLinearExact;
    } else if (function == "SIGMOID") {
        if (w.width <= 0) return false;
        fn = WindowFunction::DicomSigmoid;
    } else {
        return false;
    }
    // The runtime maps the output range, found by windowing two values far outside the
    // window, onto 0..255 (sources.py _file_voi), through ScaleToUint8.
    const double probe_lo = w.center - 10 * std::fabs(w.width) - 1, probe_hi = w.center + 10 * std::fabs(w.width) + 1;
    double l0 = pydicom_window(probe_lo, w.center, w.width, fn, y_min, y_max);
    double l1 = pydicom_window(probe_hi, w.center, w.width, fn, y_min, y_max);
    if (std::isnan(l0)) l0 = 0;  // not reached for finite windows
    double lo = std::min(l0, l1), hi = std::max(l0, l1);
    std::vector<double> display(n);
    for (std::size_t i = 0; i < n; ++i) display[i] = pydicom_window(values[i], w.center, w.width, fn, y_min, y_max);
    window_to_uint8(display.data(), n, Window{(lo + hi) / 2, hi - lo}, WindowFunction::Range, out);
    return true;
}

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
    double lo = at(lo_pct), hi = at(hi_pct);
    return Window{(lo + hi) / 2, hi - lo};
}

}  // namespace iqe
