#!/usr/bin/env bash
# Puts what the native build needs from ONNX Runtime under native/.deps/onnxruntime
# (a prefix with include/ and lib/) when the system has no ONNX Runtime development files:
#
#   lib/      the PyPI `onnxruntime` wheel's libonnxruntime.so.1.<x> (installed with pip if
#             missing), linked as libonnxruntime.so.1 and libonnxruntime.so, which the wheel
#             does not ship; the build sets an rpath to this folder.
#   include/  the C/C++ headers of Debian trixie's libonnxruntime-dev (bookworm has no ONNX
#             Runtime package). The C API is versioned and forward compatible (OrtGetApi(N)
#             on a newer library returns the version-N table), so 1.21 headers drive the
#             1.3x library of the wheel. Fetched with `apt-get download` through a private
#             apt configuration under native/.deps/apt: the system's sources stay untouched.
#
# Skipped when CMake would find ONNX Runtime on its own (find_package or pkg-config) or when
# the prefix is complete already. Usage: bash native/fetch_deps.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python}"
prefix="$here/.deps/onnxruntime"

if pkg-config --exists libonnxruntime 2>/dev/null || [ -f /usr/lib/x86_64-linux-gnu/cmake/onnxruntime/onnxruntimeConfig.cmake ]; then
  echo "fetch_deps: system ONNX Runtime development files found; nothing to fetch"
  exit 0
fi

# --- library: the wheel's
capi="$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null || true)"
if [ -z "$capi" ]; then
  "$python" -m pip install -q onnxruntime
  capi="$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
fi
lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | sort -V | tail -n 1)"
[ -n "$lib" ] || { echo "fetch_deps: no libonnxruntime.so.1.* in $capi" >&2; exit 1; }
mkdir -p "$prefix/lib"
ln -sfn "$lib" "$prefix/lib/libonnxruntime.so.1"
ln -sfn libonnxruntime.so.1 "$prefix/lib/libonnxruntime.so"

# --- headers: trixie's libonnxruntime-dev
if [ ! -f "$prefix/include/onnxruntime_cxx_api.h" ]; then
  apt_dir="$here/.deps/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
            -o APT::Sandbox::User=root -o Debug::NoLocking=1)
  apt-get -qq "${apt_opts[@]}" update
  (cd "$apt_dir/debs" && apt-get -qq "${apt_opts[@]}" download libonnxruntime-dev)
  rm -rf "$apt_dir/x" && dpkg-deb -x "$apt_dir"/debs/libonnxruntime-dev_*.deb "$apt_dir/x"
  rm -rf "$prefix/include" && cp -r "$apt_dir/x/usr/include/onnxruntime" "$prefix/include"
  rm -rf "$apt_dir/lists" "$apt_dir/cache" "$apt_dir/x"
fi
echo "fetch_deps: ONNX Runtime prefix $prefix (library $(basename "$lib"))"
