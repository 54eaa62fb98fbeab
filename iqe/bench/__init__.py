"""`iqe bench`: latency, throughput and end-to-end timings per backend x precision x batch.

    core.py            arguments, the sweep, `run_bench(args)`
    reference_loop.py  the reference's test loop on the same weights (the baseline every ratio divides by)
    ort.py             ONNX Runtime session variants, the component-graph runner, op profiles
    data.py            synthetic DICOM series / PNG inputs written into a temporary folder
    e2e.py             file -> decode -> preprocess -> infer -> results, timed per stage
    stats.py           clocks (perf_counter, CUDA events) and latency summaries
    machine.py         what the numbers were measured on
    report.py          report.json, report.md, report.csv, PNG plots

Nothing here asserts a timing; the report records what was measured.
"""

from iqe.bench.core import add_bench_arguments, run_bench

__all__ = ["add_bench_arguments", "run_bench"]
