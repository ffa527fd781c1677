"""The report of `nectar bench`: a table on the terminal, bench.json and bench.png."""
from __future__ import annotations

from pathlib import Path

from ..plots import n_ticks, pyplot
from ..files import write_json

OTHERS = ("no_document", "no_document_nectar_kernel", "full_cache", "full_cache_stock")


def table(report: dict) -> str:
    """Attention-only timings, decode speeds with nectar's ratios over each other method, and memory."""
    lines = []
    add = lines.append
    add(f"{'n':>6} {'SDPA ms':>9} {'module ms':>10} {'speedup':>8}   (medians; min in bench.json)")
    for r in report["attention"]:
        add(f"{r['n']:>6} {r['sdpa_ms']:>9.3f} {r['module_ms']:>10.3f} {r['speedup']:>8.1f}")
    add("\nx: nectar's speed over that method, median of ratios within a round. no doc*: no document "
          "through nectar's kernel; full*: transformers' own DynamicCache + SDPA path (batch 1)")
    add(f"{'method':>26} {'n':>6} {'batch':>6} {'tok/s med':>10} {'tok/s best':>11} "
          f"{'x no doc':>9} {'x no doc*':>10} {'x full':>7} {'x full*':>8}")
    for r in report["decode"]:
        ratios = " ".join(f"{r[f'vs_{o}']:>{w}.2f}" if f"vs_{o}" in r else " " * w
                          for o, w in zip(OTHERS, (9, 10, 7, 8))) if r["method"] == "nectar" else ""
        add(f"{r['method']:>26} {r['n']:>6} {r['batch']:>6} {r['tok_s_median']:>10.1f} {r['tok_s_best']:>11.1f} {ratios}")
    add(f"\n{'n':>6} {'full cache MB':>14} {'nectar file MB':>15} {'ratio':>8} {'in memory MB':>13} {'ratio':>8}")
    for r in report["memory"]:
        add(f"{r['n']:>6} {r['full_cache_bytes'] / 1e6:>14.2f} {r['nectar_bytes'] / 1e6:>15.2f} {r['ratio']:>8.4f}"
            f" {r['resident_bytes'] / 1e6:>13.2f} {r['resident_ratio']:>8.4f}")
    gpu = f", peak GPU memory {report['peak_gpu_mb']:.0f} MB on {report['device']}" if "peak_gpu_mb" in report else ""
    add(f"\npeak RSS {report['peak_rss_mb']:.0f} MB{gpu}")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> list[Path]:
    paths = [out / "bench.json", out / "bench.png"]
    write_json(paths[0], report)
    plot(report, paths[1])
    return paths


def plot(report: dict, path: Path) -> None:
    """One decode panel per batch size (their speeds differ tenfold), then attention time against n."""
    plt = pyplot()
    rows = report["decode"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.6 * (len(batches) + 1), 4))
    methods = (("full_cache", "o-", "tab:blue"), ("full_cache_stock", "x--", "tab:orange"),
               ("nectar", "s-", "tab:green"))
    for ax, batch in zip(axes, batches):
        for method, style, color in methods:
            pts = [r for r in rows if r["method"] == method and r["batch"] == batch]
            if pts:
                ax.plot([r["n"] for r in pts], [r["tok_s_median"] for r in pts], style, color=color, label=method)
        for method, style in (("no_document", ":"), ("no_document_nectar_kernel", "-.")):
            base = next(r for r in rows if r["method"] == method and r["batch"] == batch)
            ax.axhline(base["tok_s_median"], ls=style, color="gray", lw=1, label=method)
        ax.set(xscale="log", ylim=(0, None), xlabel="document tokens n", ylabel="decode tokens/s (median)",
               title=f"Greedy decode, batch {batch}")
        ax.legend(fontsize=7, loc="lower left")
        n_ticks(ax, [r["n"] for r in rows if r["batch"] == batch and r["n"]])
    att, ax = report["attention"], axes[-1]
    ax.plot([r["n"] for r in att], [r["sdpa_ms"] for r in att], "o-", color="tab:blue", label="SDPA over n keys")
    ax.plot([r["n"] for r in att], [r["module_ms"] for r in att], "s-", color="tab:green", label="nectar module")
    ax.set(xscale="log", yscale="log", xlabel="document tokens n", ylabel="ms per decode token (one layer)",
           title="Attention over the document")
    ax.legend(fontsize=7)
    n_ticks(ax, [r["n"] for r in att])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
