"""The benchmark report: report.json (everything), report.md (tables), report.csv, PNG plots.

Plots need matplotlib (`pip install 'iqe-engine[plots]'`); without it the report says
so and the other files are still written.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from iqe.atomic import atomic_open, atomic_write_text

PLOTS = {"throughput": "throughput_vs_batch.png", "latency": "latency_distribution.png"}


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, durable=False)


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_all(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Write every report file into `out`; returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    files.update(write_plots(report, out))
    report["files"] = files  # the markdown links the plots
    md = out / "report.md"
    _atomic_text(md, markdown(report))
    files["markdown"] = str(md)
    csv_path = out / "report.csv"
    write_csv(report, csv_path)
    files["csv"] = str(csv_path)
    js = out / "report.json"
    files["json"] = str(js)
    _atomic_text(js, json.dumps(_json_safe(report), indent=2) + "\n")
    return files


# ------------------------------------------------------------------------------ markdown
def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e6):
            return f"{x:.1e}"
        return f"{x:.{digits}f}"
    return str(x)


def _ratio(r: dict[str, Any]) -> str:
    v = r.get("ratio_vs_baseline")
    return "1 (baseline)" if r["backend"] == "reference-loop" and r["status"] == "ok" else (f"{v:.2f}×" if v else "–")


def _parity(r: dict[str, Any]) -> str:
    p = r.get("parity")
    if not p:
        return "–" if r["backend"] != "reference-loop" else "(reference)"
    maps = p.get("maps_max_abs")
    text = f"{_f(p['scores_max_abs'])}" + (f" / {_f(maps)}" if maps is not None else "")
    return text + ("" if p["ok"] else f" **> {p['tolerance']:g}**")


def machine_line(m: dict[str, Any]) -> str:
    gpu = m.get("gpu")
    gpu_text = "none" if not gpu else f"{gpu['name']} (driver {gpu.get('driver', '?')}, CUDA {gpu.get('cuda', '?')})"
    flags = ", ".join(m.get("cpu_flags") or []) or "?"
    return (f"{m.get('cpu_model', '?')}, {m.get('usable_cpus')} usable CPUs ({m.get('physical_cores') or '?'} physical "
            f"cores; {flags}), {m.get('memory_gib')} GiB RAM; GPU: {gpu_text}. Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} threads), onnxruntime {m.get('onnxruntime')}, numpy {m['numpy']}, onnx {m.get('onnx')}. "
            f"Measured float32 GEMM (torch, 2320x1024 @ 1024x4096): {m.get('sgemm_gflops')} GFLOP/s. "
            f"Load average (1 min): {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end.")


def markdown(report: dict[str, Any]) -> str:
    m, model, s = report["machine"], report["model"], report["settings"]
    g = model["gflops_per_image"]
    lines = [
        f"# iqe bench: {model['name']}",
        "",
        f"- **Machine**: {machine_line(m)}",
        (f"- **Model**: {model['source']}; {model['vision']} at {model['image_size']} px; {model['parameters_m']} M "
         f"parameters; ~{g['engine_total']} GFLOP/image as the engine computes it, ~{g['reference_total']} as the "
         f"reference loop does (vision {g['vision']}, text full {g['text_full']} vs prefixed {g['text_prefixed']}, "
         f"IQM {g['iqm']})."),
        f"- **Method**: {s['warmup']} warm-up call(s), then >= {s['iters']} timed calls per batch size"
        + (f" (and >= {s['min_time']} s)" if s.get("min_time") else "")
        + "; percentiles over the timed calls (linear interpolation); images/s = batch x calls / total timed time. "
        "Model-only = `runner.infer` on preprocessed float32 images in memory (outputs back as NumPy, incl. the "
        "smoothed map). Ratios divide by the reference loop measured in this run. Parity = max abs difference of "
        "the scores / maps against the reference loop on the same inputs.",
        f"- **Run**: {report.get('wall_s')} s wall, finished {report.get('finished_at')}; command: `{report.get('command')}`",
        "",
        "## Model only",
        "",
        "| configuration | batch | images/s | ms/image | p50 ms | p95 ms | p99 ms | n | x ref loop | max abs diff scores / maps | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        if r["kind"] != "model":
            continue
        lat = r.get("latency_ms") or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
        lines.append(f"| {r['label']} | {r['batch']} | {_f(r.get('images_per_s'), 3)} | {_f(r.get('ms_per_image'), 1)} | "
                     f"{_f(lat.get('p50'), 1)} | {_f(lat.get('p95'), 1)} | {_f(lat.get('p99'), 1)} | {lat.get('n', '–')} | "
                     f"{_ratio(r)} | {_parity(r)} | {status} |")

    singles = [r for r in report["results"] if r["kind"] == "e2e_single"]
    if singles:
        lines += ["", "## End to end, single image (batch 1)", "",
                  "File -> decode -> preprocess -> infer -> results.jsonl"
                  + (" + maps.npz" if s.get("save_maps") else "") + "; latency of one whole pass, after one warm-up pass.", "",
                  "| configuration | format | p50 ms | p95 ms | images/s | decode ms | infer ms | post ms | write ms | x ref loop | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in singles:
            lat, st = r.get("latency_ms") or {}, r.get("stages_ms") or {}
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
            lines.append(f"| {r['label']} | {r['format']} | {_f(lat.get('p50'), 1)} | {_f(lat.get('p95'), 1)} | "
                         f"{_f(r.get('images_per_s'), 3)} | {_f(st.get('decode'), 1)} | {_f(st.get('infer'), 1)} | "
                         f"{_f(st.get('post'), 1)} | {_f(st.get('write'), 1)} | {_ratio(r)} | {status} |")
    series = [r for r in report["results"] if r["kind"] == "e2e_series"]
    if series:
        first = series[0]
        lines += ["", f"## End to end, DICOM series ({first.get('slices')} slices of {first.get('slice_size')} px)", "",
                  "Discovery + decode + Modality LUT/window + resize, batched inference, results.jsonl"
                  + (" + maps.npz" if s.get("save_maps") else "") + "; one pass.", "",
                  "| configuration | batch | wall s | images/s | ms/image | decode s | infer s | post s | write s | x ref loop | max abs diff score | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in series:
            st = r.get("stages_s") or {}
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
            par = r.get("parity")
            lines.append(f"| {r['label']} | {r['batch']} | {_f(r.get('wall_s'), 1)} | {_f(r.get('images_per_s'), 3)} | "
                         f"{_f(r.get('ms_per_image'), 1)} | {_f(st.get('decode'))} | {_f(st.get('infer'))} | "
                         f"{_f(st.get('post'))} | {_f(st.get('write'))} | {_ratio(r)} | "
                         f"{(_f(par['scores_max_abs']) + ('' if par['ok'] else ' **!**')) if par else '–'} | {status} |")

    if report.get("targets"):
        lines += ["", "## Targets", ""]
        for t in report["targets"]:
            if t["measured_ratio"] is None:
                lines.append(f"- {t['name']}: not measured")
            else:
                verdict = "met" if t["met"] else f"not met (needs {t['shortfall'] * 100:.0f}% more throughput)"
                lines.append(f"- {t['name']}: measured {t['measured_ratio']:.2f}x -> {verdict}")

    profiles = report.get("profiles") or {}
    if profiles:
        lines += ["", "## Op profiles (one warm call)", ""]
        for label, p in profiles.items():
            if p.get("status") != "ok":
                lines.append(f"- {label}: {p.get('status')} {p.get('error', '')}")
                continue
            head = f"### {label}, batch {p['batch']}: {p.get('total_ms')} ms in ops"
            lines += [head + (f" ({p['run_ms']} ms run)" if p.get("run_ms") else ""), "",
                      "| op | ms | % |", "|---|---:|---:|"]
            lines += [f"| {o['op']} | {o['ms']:.1f} | {o['pct']:.1f} |" for o in p["ops"]]
            if p.get("slowest_nodes"):
                lines += ["", "Slowest nodes:", "", "| node | op | ms | % |", "|---|---|---:|---:|"]
                lines += [f"| `{o['node']}` | {o['op']} | {o['ms']:.1f} | {o['pct']:.1f} |" for o in p["slowest_nodes"][:8]]
            lines.append("")

    files = report.get("files") or {}
    plots = [(k, files[k]) for k in PLOTS if k in files]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots]
    if files.get("plots_skipped"):
        lines += ["", f"Plots: {files['plots_skipped']}"]
    cfg_errors = [c for c in report.get("configs", []) if c["status"] != "ok"]
    if cfg_errors:
        lines += ["", "## Failed configurations", ""] + [f"- {c['label']}: {c['error']}" for c in cfg_errors]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ csv
CSV_FIELDS = ("kind", "label", "backend", "precision", "variant", "batch", "format", "status", "images_per_s",
              "ms_per_image", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms", "n", "ratio_vs_baseline",
              "parity_scores_max_abs", "parity_maps_max_abs", "error")


def write_csv(report: dict[str, Any], path: Path) -> None:
    with atomic_open(path, "w", durable=False) as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        for r in report["results"]:
            lat = r.get("latency_ms") or {}
            par = r.get("parity") or {}
            w.writerow({**{k: r.get(k) for k in CSV_FIELDS if k in r},
                        **{f"{p}_ms": lat.get(p) for p in ("p50", "p90", "p95", "p99", "mean", "std")},
                        "n": lat.get("n"), "parity_scores_max_abs": par.get("scores_max_abs"),
                        "parity_maps_max_abs": par.get("maps_max_abs")})


# ------------------------------------------------------------------------------ plots
def write_plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Throughput vs batch and latency distributions (model only); {} plus a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"plots_skipped": "matplotlib not installed (pip install 'iqe-engine[plots]')"}
    rows = [r for r in report["results"] if r["kind"] == "model" and r["status"] == "ok"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    title = f"{report['model']['name']} on {report['machine'].get('cpu_model') or '?'}" + (
        f" + {report['machine']['gpu']['name']}" if report["machine"].get("gpu") else "")
    files: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["label"] == label)
        baseline = label.startswith("reference-loop")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                color="black" if baseline else None, linestyle="--" if baseline else "-")
    ax.set_xscale("log", base=2)
    all_batches = sorted({r["batch"] for r in rows})
    if all_batches:
        ax.set_xticks(all_batches, [str(b) for b in all_batches])
        ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (model only)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if labels:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / PLOTS["throughput"]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["throughput"] = str(path)

    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(max(5, 4.5 * len(batches)), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        data = [r["samples_ms"] for r in sel]
        if data:
            try:
                ax.boxplot(data, orientation="horizontal", whis=(1, 99))
            except TypeError:  # matplotlib < 3.10 has no `orientation`
                ax.boxplot(data, vert=False, whis=(1, 99))
            for i, d in enumerate(data, start=1):
                ax.plot(d, [i] * len(d), "o", alpha=0.4, markersize=3, color="tab:blue")
            ax.set_yticks(range(1, len(sel) + 1), [r["label"] for r in sel], fontsize=8)
        ax.set_xlabel(f"ms per call, batch {b}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"latency distribution (whiskers p1-p99), {title}", fontsize=9)
    fig.tight_layout()
    path = out / PLOTS["latency"]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["latency"] = str(path)
    return files


def console_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: images/s and ratio per configuration and batch."""
    lines = []
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"  {r['kind']:<10} {r['label']:<34} b{r['batch']:<3} {r['status']}: {r.get('error')}")
            continue
        ratio = r.get("ratio_vs_baseline")
        lat = (r.get("latency_ms") or {}).get("p50")
        lines.append(f"  {r['kind']:<10} {r['label']:<34} b{r['batch']:<3} {r['images_per_s']:9.3f} img/s"
                     + (f"  p50 {lat:9.1f} ms" if lat is not None else f"  wall {r.get('wall_s', 0):7.1f} s  ")
                     + (f"  {ratio:5.2f}x ref" if ratio else ""))
    for t in report.get("targets", []):
        lines.append(f"  target: {t['name']}: {t['measured_ratio']}x -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def rerender(report_json: str | Path) -> dict[str, str]:
    """Re-write report.md, report.csv and the plots from a report.json (e.g. after a change to this module).

    `python -c "from iqe.bench.report import rerender; rerender('OUT/report.json')"`
    """
    path = Path(report_json)
    report = json.loads(path.read_text())
    return write_all(report, path.parent)

