// Intensities -> 8-bit display values: the window rules of the Python runtime
// (iqe/runtime/transforms.py ScaleToUint8, sources.py _file_voi), in one place.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iqe {

struct Window {
    double center = 0.0;
    double width = 0.0;
};

// The window function a window is applied with.
//   Range:        [center - width/2, center + width/2] -> 0..255, linear, clipped (the
//                 runtime's ScaleToUint8: overrides, modality defaults, percentile and
//                 min-max ranges, colour bit depths).
//   DicomLinear:  DICOM PS3.3 C.11.2.1.2 "LINEAR": x <= c - 0.5 - (w-1)/2 -> 0,
//                 x > c - 0.5 + (w-1)/2 -> 255, else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.
//   DicomLinearExact / DicomSigmoid: C.11.2.1.3.2 / C.11.2.1.3.1.
enum class WindowFunction { Range, DicomLinear, DicomLinearExact, DicomSigmoid };

// The function that --window overrides and the modality defaults (CT 40/400) use. The
// Python runtime on this branch maps them as a plain range; the runtime rework (issue 8)
// moves them to the DICOM LINEAR formula. Change it here (one line) to follow.
constexpr WindowFunction kOverrideWindowFunction = WindowFunction::Range;

// Values -> uint8 through `w` with `fn`, rounding half to even (np.rint), NaN -> 0. A
// width <= 0 gives black. Exactly the floating-point steps of the Python runtime.
void window_to_uint8(const double* values, std::size_t n, Window w, WindowFunction fn, std::uint8_t* out);

// The file's own window (DICOM VOI, pydicom's apply_windowing): values in the units of the
// input -> [y_min, y_max]; then mapped onto 0..255 as the runtime does. `function` is the
// (0028,1056) value. Returns false when pydicom would refuse the window (width < 1 for
// LINEAR, <= 0 otherwise, unknown function): the caller falls back to the default.
bool file_window_to_uint8(const double* values, std::size_t n, Window w, const std::string& function,
                          double y_min, double y_max, std::uint8_t* out);

// NumPy's np.percentile(values[finite], (lo, hi)) (method "linear") as a window
// ((lo + hi) / 2, hi - lo); (0, 0) when nothing is finite.
Window percentile_window(const double* values, std::size_t n, double lo_pct, double hi_pct);

}  // namespace iqe
