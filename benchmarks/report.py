"""Turns a pytest-benchmark JSON of this suite into a Markdown report and a PNG chart.

    python benchmarks/report.py bench.json [--out DIR] [--title TITLE]

Writes DIR/report.md (median times, ours/PyTorch and NHWC/NCHW ratios, achieved
rates against the machine's measured ceilings) and DIR/ratios.png (ours/PyTorch per
row). DIR defaults to the JSON's folder.
"""

import argparse
import json
import os
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        info["median"] = bench["stats"]["median"]
        info["rounds"] = bench["stats"]["rounds"]
        rows.append(info)
    return data, rows


def ms(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:.3g}"


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}"


def op_table(rows, machine):
    """One line per (op case, direction, batch): medians for both implementations in both
    layouts, and the ratios users decide by."""
    groups = defaultdict(dict)
    order = []
    for r in rows:
        if r.get("kind") != "op":
            continue
        key = (r["case"], r["direction"], r["batch"])
        if key not in groups:
            order.append(key)
        groups[key][(r["impl"], r["layout"])] = r
    if not order:
        return [], []
    gpu = any(impl == "torch-tf32" for g in groups.values() for impl, _ in g)
    # Ours at lower CPU levels ("cae@<level>"), beside the level in use.
    levels = sorted({impl.split("@")[1] for g in groups.values() for impl, _ in g if "@" in impl})
    ceiling = machine.get("ceiling", {})
    head = ["op", "pass", "batch"]
    for layout in ("nchw", "nhwc"):
        head += [f"ours {layout} ms", f"PyTorch {layout} ms", f"ours/PyTorch {layout}"]
        head += [f"{level}/PyTorch {layout}" for level in levels]
        if gpu:
            head += [f"ours/PyTorch-TF32 {layout}"]
    head += ["ours NHWC/NCHW", "ours GFLOP/s (best)", "% of peak FLOP/s", "% of peak bandwidth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for key in order:
        g = groups[key]
        get = lambda impl, layout: g.get((impl, layout), {}).get("median")  # noqa: E731
        cells = [key[0], key[1], str(key[2])]
        for layout in ("nchw", "nhwc"):
            r = ratio(get("cae", layout), get("torch", layout))
            cells += [ms(get("cae", layout)), ms(get("torch", layout)), fmt_ratio(r)]
            cells += [fmt_ratio(ratio(get(f"cae@{level}", layout), get("torch", layout))) for level in levels]
            if gpu:
                cells += [fmt_ratio(ratio(get("cae", layout), get("torch-tf32", layout)))]
            summary.append((f"{key[0]} {key[1]} {layout}", r))
        cells.append(fmt_ratio(ratio(get("cae", "nhwc"), get("cae", "nchw"))))
        best = min((t for t in (get("cae", "nchw"), get("cae", "nhwc")) if t), default=None)
        any_row = next(iter(g.values()))
        if best:
            gflops = any_row["flops"] / best / 1e9
            gbs = any_row["min_bytes"] / best / 1e9
            cells += [f"{gflops:.1f}",
                      f"{100 * gflops / ceiling['gflops']:.1f}" if ceiling else "—",
                      f"{100 * gbs / ceiling['gbytes_per_s']:.1f}" if ceiling else "—"]
        else:
            cells += ["—"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return lines, summary


def train_table(rows):
    groups = defaultdict(dict)
    order = []
    for r in rows:
        if r.get("kind") != "train":
            continue
        key = (r["model"], r["batch"])
        if key not in groups:
            order.append(key)
        groups[key][(r["impl"], r["layout"])] = r
    if not order:
        return [], []
    lines = ["| model | batch | implementation | layout | median ms | vs PyTorch eager, best layout | peak memory MiB |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for key in order:
        g = groups[key]
        torch_best = min((r["median"] for (impl, _), r in g.items() if impl == "torch"), default=None)
        for (impl, layout), r in sorted(g.items()):
            rel = ratio(r["median"], torch_best)
            mem = r.get("peak_memory_bytes")
            lines.append(f"| {key[0]} | {key[1]} | {impl} | {layout} | {ms(r['median'])} | {fmt_ratio(rel)} | "
                         f"{'—' if mem is None else f'{mem / 2**20:.1f}'} |")
            if impl == "cae":
                summary.append((f"train {key[0]} {layout}", rel))
    return lines, summary


def epoch_table(rows):
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not epochs:
        return []
    torch_best = min((r["median"] for r in epochs if r["impl"] == "torch"), default=None)
    lines = ["| model | images | implementation | layout | median s | images/s | vs PyTorch, best layout |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(epochs, key=lambda r: (r["impl"], r["layout"])):
        lines.append(f"| {r['model']} | {r['images']} | {r['impl']} | {r['layout']} | {r['median']:.3g} | "
                     f"{r['images'] / r['median']:.0f} | {fmt_ratio(ratio(r['median'], torch_best))} |")
    return lines


def chart(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(name, r) for name, r in summary if r]
    if not items:
        return False
    fig, ax = plt.subplots(figsize=(9, max(3, 0.22 * len(items))))
    names = [n for n, _ in items]
    values = [r for _, r in items]
    colors = ["tab:green" if v <= 1 else "tab:red" for v in values]
    ax.barh(range(len(items)), values, color=colors)
    ax.set_yticks(range(len(items)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("ours / PyTorch median time (below 1: ours faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", help="output folder (default: the JSON's folder)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    data, rows = load(args.json)
    machine = data.get("machine_info", {})
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out, exist_ok=True)
    device = machine.get("gpu") or machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "")
    title = args.title or f"cae_kernels vs PyTorch on {device}"
    ops, op_summary = op_table(rows, machine)
    train, train_summary = train_table(rows)
    ceiling = machine.get("ceiling", {})
    text = [f"# {title}", "",
            f"- machine: {device}; {machine.get('platform', '')}; torch threads {machine.get('torch_threads')}",
            f"- CPU: {machine.get('cpu_model', '?')}; our CPU kernels' level: {machine.get('cpu_capability', '?')} "
            f"(this CPU runs: {', '.join(machine.get('cpu_capabilities', []))}); "
            "columns <level>/PyTorch: ours forced to that lower level, same run",
            f"- versions: torch {machine.get('torch')}, cae_kernels {machine.get('cae_kernels')}"
            + (f", CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}" if machine.get("cuda") else ""),
            f"- command: `{machine.get('command', '')}`, then `python benchmarks/report.py {os.path.basename(args.json)}`",
            f"- date: {data.get('datetime', '')}",
            (f"- ceilings: {ceiling['gflops']:.0f} GFLOP/s, {ceiling['gbytes_per_s']:.1f} GB/s ({ceiling['how']})"
             if ceiling else "- ceilings: not measured"),
            "- times are medians; ratios below 1 mean ours is faster", ""]
    if ops:
        text += ["## Ops (float32)", ""] + ops + [""]
    if train:
        text += ["## Training step (forward, loss, backward, Adam)", ""] + train + [""]
    epochs = epoch_table(rows)
    if epochs:
        text += ["## One training epoch over the bundled sample", ""] + epochs + [""]
    if chart(op_summary + train_summary, os.path.join(out, "ratios.png"), title):
        text += ["![ours/PyTorch per row](ratios.png)", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
