#!/usr/bin/env bash
# CPU benchmarks of IQE-CLIP: the full ViT-L/14 @240 with random weights (no real weights
# needed: speed does not depend on the values), against the reference test loop on the
# same weights. Each run writes report.{json,md,csv} + PNG plots and prints its tables.
#
#   benchmarks/run_cpu.sh [main|ort-options|fp16|tiny]...     (default: main)
#
# main         torch eager + ONNX Runtime fp32 vs the reference loop, batch 1 and 8, model
#              only + end to end (PNG, DICOM file, 32-slice DICOM series), op profiles.
# ort-options  ONNX Runtime session options at batch 8 (one configuration at a time: every
#              ViT-L session holds ~2-3 GB; ratios against the default session of the same run).
# fp16         fp16 graphs on CPU at batch 1 (ONNX Runtime and torch run them on slow kernels).
# tiny         the tiny preset, seconds: checks the whole sweep works here.
#
# Environment: OUT (report root, default benchmarks/results), IQE_CACHE (engine cache,
# default /tmp/iqe-cache: the ViT-L export, ~2 GB and a few minutes, is done once).
set -euo pipefail
cd "$(dirname "$0")/.."
export IQE_CACHE="${IQE_CACHE:-/tmp/iqe-cache}"
OUT="${OUT:-benchmarks/results}"
BENCH=(python -m iqe.bench)   # same as `iqe bench`
VITL=(--preset vit-l-14-336 --seed 0)

run() {  # run NAME ARGS...: one benchmark into $OUT/NAME, then print its tables
    local name=$1; shift
    "${BENCH[@]}" "$@" --out "$OUT/$name" || echo "($name: some configurations failed, see the report)" >&2
    cat "$OUT/$name/report.md"
}

for what in "${@:-main}"; do
    case "$what" in
        main)
            run cpu-vit-l-main "${VITL[@]}" --backends torch,onnxruntime --precisions fp32 --batches 1,8 \
                --warmup 1 --iters 5 --series-slices 32 --e2e-repeats 2 --profile ;;
        ort-options)
            run cpu-vit-l-ort-options "${VITL[@]}" --backends onnxruntime --precisions fp32 --batches 8 \
                --warmup 1 --iters 3 --e2e none --no-interleave \
                --ort-variants default,threads-ort,no-spin,opt-basic,sigmoid-maps,fusion,fusion+sigmoid-maps,components ;;
        fp16)
            run cpu-vit-l-fp16 "${VITL[@]}" --backends torch,onnxruntime --precisions fp32,fp16 --batches 1 \
                --warmup 1 --iters 3 --e2e single --e2e-repeats 1 ;;
        tiny)
            run cpu-tiny --preset tiny --backends torch,onnxruntime --precisions fp32,fp16 --batches 1,8,32 \
                --warmup 2 --iters 10 --min-time 2 --ort-variants default,threads1,sigmoid-maps,components --profile ;;
        *)
            echo "unknown benchmark '$what'; choose from: main ort-options fp16 tiny" >&2; exit 2 ;;
    esac
done
