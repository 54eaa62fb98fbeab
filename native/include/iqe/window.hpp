// Intensities -> 8-bit display values: the one intensity formula of the Python runtime
// (iqe/runtime/transforms.py voi_to_uint8: highdicom's apply_voi_window, the DICOM
// PS3.3 C.11.2.1.2 VOI window onto 0..255) and the window choices that feed it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iqe {

struct Window {
    double center = 0.0;
    double width = 0.0;
};

// A DICOM VOI window onto 0..255, rounded half to even (np.rint), float64 steps in the
// order of highdicom's apply_voi_window:
//   LINEAR        (x - (c - w/2)) * (255 / (w - 1)), clipped (needs w > 1; narrower: LINEAR_EXACT)
//   LINEAR_EXACT  (x - (c - w/2)) * (255 / w), clipped
//   SIGMOID       255 / (1 + exp(-4 (x - c) / w))
// Any other `function` is LINEAR. NaN -> c - w, +-inf -> c +- w (then clipped). A width
// <= 0 or a non-finite window gives black.
void voi_to_uint8(const double* values, std::size_t n, Window w, const std::string& function, std::uint8_t* out);

// The LINEAR_EXACT window mapping lo to 0 and hi to 255 (transforms.py range_window).
Window range_window(double lo, double hi);

// NumPy's np.percentile(values[finite], (lo, hi)) (method "linear") as a range window;
// (0, 0) when nothing is finite.
Window percentile_window(const double* values, std::size_t n, double lo_pct, double hi_pct);

}  // namespace iqe
