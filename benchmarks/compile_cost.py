"""What a compile costs, stage by stage, and how each stage grows with the document's length.

    python benchmarks/compile_cost.py --out runs/cost [--model smollm2-135m] [--sizes 1024,2048,4096,8192]
        [--document pydoc] [--set FIELD=VALUE ...] [--effort quick|default|best]

Compiles the first n tokens of the document (pydoc, or a text file, cut to n tokens) once per size, in this
process, one after another, and records every stage's wall and CPU seconds (all threads) and the peak RSS
while it ran (sampled every 20 ms). Writes OUT/cost.json and OUT/cost.png (stacked bars of wall seconds by
stage, one bar per size), and prints a table with each stage's growth exponent in n (the slope of log
seconds against log n from the smallest to the largest size: 1 is linear).

Run with PYTHONPATH pointing at another checkout (a `git worktree` of an older commit) to time that code
on the same machine: where it records no per-stage CPU and RSS, the manifest's stage seconds are used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import threading
import time
from pathlib import Path

import torch

import nectar
from nectar import timing

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class RssSampler:
    """The process's resident memory, sampled in a thread: (perf_counter time, MB) pairs."""

    def __init__(self, every: float = 0.02):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.samples.append((time.perf_counter(), int(f.read().split()[1]) * page))
                time.sleep(self.every)

    def peak(self, start: float, end: float) -> float:
        inside = [mb for t, mb in self.samples if start <= t <= end]
        return round(max(inside, default=0.0), 1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def document(source: str, tokenizer, n: int) -> torch.Tensor:
    """The first n token ids of pydoc or of a text file."""
    if source == "pydoc":
        try:
            from nectar.model.documents import pydoc_text
        except ImportError:  # an older checkout's layout
            from nectar.documents import pydoc_text
        text = pydoc_text()
    else:
        text = Path(source).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"{source} has only {len(ids)} tokens, fewer than {n}")
    return torch.tensor(ids[:n])


def config_of(args):
    """The default config, or an effort level's, with `--set`'s changes (an older checkout knows neither)."""
    from nectar.config import CompileConfig
    if not (args.set or args.effort):
        return CompileConfig()
    from nectar.config import at_effort, parse_settings, with_changes
    return with_changes(at_effort(args.effort or "default"), parse_settings(args.set))


def one_compile(model, tokenizer, ids, config, sampler) -> dict:
    first = len(getattr(timing, "RUNS", []))
    start = time.perf_counter()
    artifact = nectar.compile(model, tokenizer, ids, config)
    wall = time.perf_counter() - start
    runs = getattr(timing, "RUNS", [])[first:]
    stages: dict[str, dict] = {}
    if runs:
        for run in runs:
            row = stages.setdefault(run.name, {"wall": 0.0, "cpu": 0.0, "peak_rss_mb": 0.0})
            row["wall"] = round(row["wall"] + run.end - run.start, 2)
            row["cpu"] = round(row["cpu"] + run.cpu, 2)
            row["peak_rss_mb"] = max(row["peak_rss_mb"], sampler.peak(run.start, run.end))
    else:
        stages = {name: {"wall": s} for name, s in artifact.manifest["timings"].items() if name != "total"}
    q = artifact.manifest["metrics"].get("questions") or {}
    return {"n": len(ids), "wall": round(wall, 1), "stages": stages, "peak_rss_mb": sampler.peak(start, time.perf_counter()),
            "memory_ratio": artifact.manifest.get("memory_ratio"),
            "agreement": q.get("agreement"), "kl": q.get("kl")}


def growth(rows: list[dict], name: str) -> float | None:
    """The slope of log seconds against log n between the smallest and largest sizes where the stage ran."""
    points = [(r["n"], r["stages"][name]["wall"]) for r in rows if r["stages"].get(name, {}).get("wall", 0) > 0.5]
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    (n0, t0), (n1, t1) = points[0], points[-1]
    return round(math.log(t1 / t0) / math.log(n1 / n0), 2)


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(name for r in rows for name in r["stages"]))
    head = f"{'stage':<22}" + "".join(f"{r['n']:>9}" for r in rows) + "   growth"
    lines = [head, "-" * len(head)]
    for name in names:
        cells = "".join(f"{r['stages'].get(name, {}).get('wall', 0):>9.1f}" for r in rows)
        g = growth(rows, name)
        lines.append(f"{name:<22}{cells}   {'' if g is None else f'n^{g}'}")
    g = growth([{**r, "stages": {"total": {"wall": r["wall"]}}} for r in rows], "total")
    lines.append(f"{'total (wall)':<22}" + "".join(f"{r['wall']:>9.1f}" for r in rows) + f"   n^{g}")
    if all("cpu" in next(iter(r["stages"].values()), {}) for r in rows):
        lines.append(f"{'total (CPU)':<22}" + "".join(f"{sum(s['cpu'] for s in r['stages'].values()):>9.1f}" for r in rows))
        lines.append(f"{'peak RSS (MB)':<22}" + "".join(f"{r['peak_rss_mb']:>9.0f}" for r in rows))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    from nectar.plots import pyplot
    plt = pyplot()
    names = list(dict.fromkeys(name for r in rows for name in r["stages"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['n'] / 1024:g}k" for r in rows]
    bottom = [0.0] * len(rows)
    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        heights = [r["stages"].get(name, {}).get("wall", 0.0) / 60 for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=name, color=colours[i % len(colours)])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("document tokens")
    ax.set_ylabel("wall minutes")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", default="1024,2048,4096,7680")  # SmolLM2 holds 7680 document tokens before a question
    p.add_argument("--document", default="pydoc")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--effort", default=None)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = nectar.load_model(args.model, dtype=args.dtype)
    config = config_of(args)
    rows = []
    with RssSampler() as sampler:
        for n in (int(s) for s in args.sizes.split(",")):
            try:
                rows.append(one_compile(model, tokenizer, document(args.document, tokenizer, n), config, sampler))
            except nectar.NectarError as e:  # e.g. a size past the model's window: say so, time the rest
                print(f"n={n} skipped: {e}", flush=True)
                continue
            report = {"machine": machine(), "model": args.model, "dtype": str(model.dtype), "effort": args.effort,
                      "set": args.set, "rows": rows,
                      "growth": {name: growth(rows, name) for r in rows for name in r["stages"]}}
            (out / "cost.json").write_text(json.dumps(report, indent=1))
            print(table(rows), flush=True)
    if not rows:
        raise SystemExit("no size compiled (each was skipped, with its reason above)")
    plot(rows, out / "cost.png", f"{args.model}, {report['machine']['cpu_capability']}, "
                                 f"{os.cpu_count()} cores: compile wall time by stage")
    print(f"wrote {out / 'cost.json'}, {out / 'cost.png'}; max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
