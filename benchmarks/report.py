"""Benchmark results: rows appended to `<results>/<device>/<suite>.csv`, speedup plots drawn from those files,
and the README's benchmark section regenerated from them (between `<!-- bench:begin -->` and `<!-- bench:end -->`)."""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"

COLUMNS = [
    "suite", "op", "model", "in_chs", "out_chs", "ratio", "dw", "H", "W", "relu", "has_attention",
    "dtype", "layout", "batch", "direction", "provider",
    "t_p20_ms", "t_p50_ms", "t_p80_ms", "reps",
    "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_conv1x1",
    "bytes", "gbps", "copy_gbps", "bw_share", "images_per_s", "peak_mem_mb", "rel_err_vs_eager",
    "threads", "device", "git_sha", "torch", "triton", "cuda", "python", "date", "run_id", "note",
]


def csv_path(out_dir: str, device: str, suite: str) -> str:
    return os.path.join(out_dir, device, f"{suite}.csv")


def append_rows(path: str, rows: Iterable[dict], env: dict, columns: List[str] = COLUMNS) -> None:
    """Append rows (plus the environment columns) to `path`, writing the header if the file is new. A file with
    another header is not appended to: mixing columns would corrupt it. The memory suite has its own `columns`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise RuntimeError(f"{path} has other columns than this version writes; move it away first")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**{c: "" for c in columns}, **env, **row})


def read_rows(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: List[dict]) -> List[dict]:
    """The rows of the most recent run in a file (files accumulate runs)."""
    if not rows:
        return []
    last = max(r["run_id"] for r in rows)
    return [r for r in rows if r["run_id"] == last]


def _float(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline_ops_config(rows: List[dict]) -> Dict[str, str]:
    """The configuration the ops plot and table show: the largest batch, contiguous, float16 on a GPU (how GPUs
    run these models) and float32 on a CPU (where float16 convolutions are not what anyone deploys)."""
    timed = [r for r in rows if _float(r["t_p50_ms"]) is not None]
    dtypes = {r["dtype"] for r in timed}
    on_cpu = bool(timed) and timed[0].get("device", "").startswith("cpu")
    preferred = ("float32", "float16") if on_cpu else ("float16", "float32")
    dtype = next((d for d in preferred if d in dtypes), sorted(dtypes)[0])
    layouts = {r["layout"] for r in timed if r["dtype"] == dtype}
    layout = "contiguous" if "contiguous" in layouts else sorted(layouts)[0]
    batch = max(int(r["batch"]) for r in timed if r["dtype"] == dtype and r["layout"] == layout)
    return {"dtype": dtype, "layout": layout, "batch": str(batch)}


def plot_ops(csv_file: str, png_file: str) -> Optional[str]:
    """Speedup over eager per shape and provider (latest run, headline configuration), one panel per op and
    direction. Returns the PNG path, or None (with a printed note) when matplotlib is missing or nothing ran."""
    rows = [r for r in latest_run(read_rows(csv_file)) if _float(r["speedup_vs_eager"]) is not None]
    if not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    config = headline_ops_config(rows)
    rows = [r for r in rows if all(r[k] == v for k, v in config.items())]
    panels = sorted({(r["op"], r["direction"]) for r in rows}, key=lambda k: (k[0], k[1]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for ax, (op, direction) in zip(axes[:, 0], panels):
        panel = [r for r in rows if r["op"] == op and r["direction"] == direction]
        shapes = list(dict.fromkeys(_shape_label(r) for r in panel))
        providers = [p for p in dict.fromkeys(r["provider"] for r in panel) if p != "eager"]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            by_shape = {_shape_label(r): _float(r["speedup_vs_eager"]) for r in panel if r["provider"] == provider}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
            # Bars start at 1 on a log axis: a speedup rises, a slowdown of the same factor falls as far.
            speedups = [by_shape.get(s) or 1.0 for s in shapes]
            ax.bar(xs, [v - 1.0 for v in speedups], width, bottom=1.0, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{op}, {direction}: batch {config['batch']}, {config['dtype']}, {config['layout']}")
        ax.legend(fontsize=7, ncol=len(providers))
    device = rows[0]["device"]
    fig.suptitle(f"ghostfast ops on {device} ({rows[0]['git_sha']}, {rows[0]['date']})")
    fig.tight_layout()
    fig.savefig(png_file, dpi=110)
    plt.close(fig)
    return png_file


def plot_models(csv_file: str, png_file: str) -> Optional[str]:
    """Speedup over eager per model and provider (latest run), one panel per workload, batch and dtype."""
    rows = [r for r in latest_run(read_rows(csv_file)) if _float(r["speedup_vs_eager"]) is not None]
    if not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    panels = sorted({(r["op"], r["batch"], r["dtype"], r["layout"]) for r in rows},
                    key=lambda k: (k[0], int(k[1]), k[2], k[3]))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 4.5 * len(panels)), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        panel = [r for r in rows if (r["op"], r["batch"], r["dtype"], r["layout"]) == key]
        models = list(dict.fromkeys(r["model"] for r in panel))
        providers = [p for p in dict.fromkeys(r["provider"] for r in panel) if p != "eager"]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            by_model = {r["model"]: _float(r["speedup_vs_eager"]) for r in panel if r["provider"] == provider}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(models))]
            speedups = [by_model.get(m) or 1.0 for m in models]
            ax.bar(xs, [v - 1.0 for v in speedups], width, bottom=1.0, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, fontsize=8)
        ax.set_title(f"{key[0]}: batch {key[1]}, {key[2]}, {key[3]}", fontsize=9)
        ax.set_ylabel("speedup vs eager")
        ax.legend(fontsize=7)
    fig.suptitle(f"GhostNet models on {rows[0]['device']} ({rows[0]['git_sha']}, {rows[0]['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_file, dpi=110)
    plt.close(fig)
    return png_file


def plot_device(device_dir: str) -> List[str]:
    """Draw every plot for one device's folder; returns the PNGs written."""
    written = []
    for suite, plot in (("ops", plot_ops), ("models", plot_models)):
        csv_file = os.path.join(device_dir, f"{suite}.csv")
        if os.path.exists(csv_file):
            png = plot(csv_file, os.path.join(device_dir, f"{suite}_speedup.png"))
            if png:
                written.append(png)
    return written


_warned_no_matplotlib = False


def _pyplot():
    global _warned_no_matplotlib
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            print("note: matplotlib is not installed, plots skipped (CSV files are complete; "
                  "`GHOSTFAST_BENCH=1 bash scripts/setup_venv.sh` installs it, then `python -m ghostfast bench "
                  "--plot-only --out DIR` draws them)")
            _warned_no_matplotlib = True
        return None
    return plt


def _shape_label(row: dict) -> str:
    act = "" if row["relu"] == "1" else " lin"
    return f"{row['in_chs']}->{row['out_chs']} {row['H']}x{row['W']}{act}"


# ------------------------------------------------------------------------------------------------------------
# README section
# ------------------------------------------------------------------------------------------------------------


def _models_table(rows: List[dict]) -> List[str]:
    lines = ["| model | workload | batch | dtype | provider | median ms | p20-p80 ms | speedup vs eager | "
             "vs compile |", "| --- | --- | ---: | --- | --- | ---: | --- | ---: | ---: |"]
    for r in rows:
        if _float(r["t_p50_ms"]) is None:
            continue
        lines.append(f"| {r['model']} | {r['op']} | {r['batch']} | {r['dtype']} | {r['provider']} | "
                     f"{float(r['t_p50_ms']):.3f} | {float(r['t_p20_ms']):.3f}-{float(r['t_p80_ms']):.3f} | "
                     f"{r['speedup_vs_eager'] or '-'} | {r['speedup_vs_compile'] or '-'} |")
    return lines


def _ops_table(rows: List[dict]) -> List[str]:
    """Geometric-mean speedups over the shapes, per op, direction and provider, at the headline configuration."""
    timed = [r for r in rows if _float(r["speedup_vs_eager"]) is not None]
    if not timed:
        return []
    config = headline_ops_config(timed)
    timed = [r for r in timed if all(r[k] == v for k, v in config.items())]
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in timed:
        groups[(r["op"], r["direction"], r["provider"])].append(r)
    lines = [f"Ops at batch {config['batch']}, {config['dtype']}, {config['layout']}: geometric mean over the "
             "shapes.", "",
             "| op | direction | provider | shapes | speedup vs eager | vs compile | vs conv1x1 | median bw share |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (op, direction, provider), group in sorted(groups.items()):
        cells = []
        for column in ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_conv1x1"):
            values = [_float(r[column]) for r in group if _float(r[column])]
            cells.append(f"{_geomean(values):.2f}" if values else "-")
        shares = sorted(_float(r["bw_share"]) for r in group if _float(r["bw_share"]) is not None)
        share = f"{shares[len(shares) // 2]:.1%}" if shares else "-"
        lines.append(f"| {op} | {direction} | {provider} | {len(group)} | {' | '.join(cells)} | {share} |")
    return lines


def _memory_table(rows: List[dict]) -> List[str]:
    """Per op (and per model), dtype and batch: the converted/eager ratio of the activation bytes saved for the
    backward, and of the peak memory of forward+backward (GPU)."""
    converted = [r for r in rows if r.get("provider") == "converted" and _float(r.get("activation_ratio_vs_eager"))]
    if not converted:
        return []
    has_peak = any(_float(r.get("peak_ratio_vs_eager")) for r in converted)
    lines = ["Memory: activations saved for the backward (mode eval: frozen BatchNorm, trainable parameters; train: "
             "batch statistics; the parameters' own storages not counted), converted / eager"
             + (", and peak memory of one forward+backward" if has_peak else "") + ": min-max over the cases.", "",
             "| what | mode | dtype | batch | cases | saved activations | peak memory |",
             "| --- | --- | --- | ---: | ---: | --- | --- |"]
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in converted:
        what = r["model"] if r["op"] == "model_forward_backward" else r["op"]
        groups[(r["op"] == "model_forward_backward", what, r.get("mode") or "eval", r["dtype"],
                int(r["batch"]))].append(r)

    def span(values):
        if not values:
            return "-"
        return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}"

    for (_, what, mode, dtype, batch), group in sorted(groups.items()):
        saved = [_float(r["activation_ratio_vs_eager"]) for r in group]
        peaks = [_float(r["peak_ratio_vs_eager"]) for r in group if _float(r.get("peak_ratio_vs_eager"))]
        lines.append(f"| {what} | {mode} | {dtype} | {batch} | {len(group)} | {span(saved)} | {span(peaks)} |")
    return lines


def readme_section(results_dir: str = RESULTS_DIR, readme_dir: Optional[str] = None) -> str:
    """Markdown for every device folder under `results_dir`: the latest run's model table, op summary, plots."""
    readme_dir = readme_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    devices = sorted(d for d in os.listdir(results_dir) if os.path.isdir(os.path.join(results_dir, d))) \
        if os.path.isdir(results_dir) else []
    lines = []
    for device in devices:
        device_dir = os.path.join(results_dir, device)
        models = latest_run(read_rows(os.path.join(device_dir, "models.csv")))
        ops = latest_run(read_rows(os.path.join(device_dir, "ops.csv")))
        memory = latest_run(read_rows(os.path.join(device_dir, "memory.csv")))
        if not models and not ops and not memory:
            continue
        first = (models or ops or memory)[0]
        lines += [f"### {device}", "",
                  f"git {first['git_sha']}, torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, "
                  f"{first['threads']} CPU threads, {first['date']}.", ""]
        if models:
            lines += _models_table(models) + [""]
        if ops:
            lines += _ops_table(ops) + [""]
        if memory:
            lines += _memory_table(memory) + [""]
        for png in ("models_speedup.png", "ops_speedup.png"):
            path = os.path.join(device_dir, png)
            if os.path.exists(path):
                lines += [f"![{device} {png[:-4]}]({os.path.relpath(path, readme_dir)})", ""]
    if not lines:
        lines = ["No results recorded yet: `python -m ghostfast bench` writes them under `benchmarks/results/`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme_path: str, results_dir: str = RESULTS_DIR) -> None:
    """Replace the text between the README's bench markers with `readme_section(results_dir)`."""
    with open(readme_path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise RuntimeError(f"{readme_path} has no {README_BEGIN} ... {README_END} markers")
    section = readme_section(results_dir, os.path.dirname(os.path.abspath(readme_path)))
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    text = pattern.sub(lambda _: f"{README_BEGIN}\n{section}{README_END}", text, count=1)
    with open(readme_path, "w") as f:
        f.write(text)
