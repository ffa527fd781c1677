"""The report of `nectar eval`: the table, eval.json and two plots (fidelity against bytes, error against gap)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import write_json
from ..measure.fidelity import DECIDED_LOGITS
from ..measure.metrics import bootstrap_interval
from ..plots import log_if_positive, pyplot


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no tie correction: the values here are continuous)."""
    if len(x) < 3:
        return float("nan")
    rx = torch.tensor(x).argsort().argsort().float()
    ry = torch.tensor(y).argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def correlations(rows: list[dict], main_budget: float) -> dict:
    """Approximation error against next-token gap: per layer (main nectar) and across methods x budgets."""
    out = {}
    main = next((r for r in rows if r["method"] == "nectar" and r["budget"] == main_budget and "layer_gap" in r), None)
    if main:
        out["per_layer"] = spearman(main["layers"]["merged_rel"], main["layer_gap"])
    points = [(r["errors"]["merged_rel"], r["questions"]["answer"]["kl"]) for r in rows]
    out["across_methods"] = spearman(*zip(*points)) if len(points) >= 3 else float("nan")
    return out


def table(report: dict) -> str:
    """One line per method and budget: bytes, fidelity on question and answer tokens, errors, generation."""
    head = (f"{'method':<28} {'budget':>6} {'bytes':>7} {'agree A':>8} {'KL A':>7} {'agree Q':>8} {'KL Q':>7} "
            f"{'merged':>7} {'o_ctx':>6} {'|lse|':>6} {'EM':>5} {'cos':>5} {'own s':>6}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        q, e, g = r["questions"], r["errors"], r.get("generation", {})
        lse = "-" if e["lse_abs"] is None else f"{e['lse_abs']:.3f}"
        gen = f"{g['exact_match']:>5.2f} {g['cosine']:>5.3f}" if g else f"{'-':>5} {'-':>5}"
        lines.append(f"{r['method']:<28} {r['budget']:>6g} {r['bytes_ratio']:>7.4f} "
                     f"{q['answer']['agreement']:>8.3f} {q['answer']['kl']:>7.3f} "
                     f"{q['question']['agreement']:>8.3f} {q['question']['kl']:>7.3f} "
                     f"{e['merged_rel']:>7.3f} {e['o_rel']:>6.3f} {lse:>6} {gen} {_seconds(r):>6}")
    c = report["correlation"]
    per_layer = f"{c['per_layer']:.2f}" if "per_layer" in c else "off (--gap-prompts 0)"
    across = c["across_methods"]
    across = "needs 3 or more rows" if across is None or across != across else f"{across:.2f}"
    lines.append(f"error vs gap, Spearman: per layer {per_layer}, across methods and budgets {across}")
    lines.append(f"every method and the full cache answered in {report.get('judge_dtype', 'the compile dtype')}")
    if report.get("ceiling"):
        c = report["ceiling"]
        lines.append(f"the full cache itself in {c['dtype']}: EM {c['exact_match']:.2f}, cos {c['cosine']:.3f} against "
                     "those answers (the most that greedy-answer similarity reads for an all-but-exact method)")
        if c.get("questions"):
            a = c["questions"]["answer"]
            lines.append(f"  teacher-forced, the same rounding reads answer agreement {a['agreement']:.3f}, KL {a['kl']:.4f}")
    lines += decided_lines(report)
    lines += cosine_intervals(report)
    return "\n".join(lines)


def decided_lines(report: dict) -> list[str]:
    """Answer agreement where the full cache had decided: a method's flips elsewhere are near-ties."""
    rows = [r for r in report["rows"] if r["questions"]["answer"].get("decided_agreement") is not None]
    if not rows:
        return []
    lines = [f"answer agreement where the full cache's top two lie >= {DECIDED_LOGITS} logit apart (greedy answers "
             "part elsewhere, at near-ties):"]
    for r in rows:
        a = r["questions"]["answer"]
        lines.append(f"  {r['method']} at {r['budget']:g}: {a['decided_agreement']:.3f} over {a['decided_tokens']} "
                     f"of {a['tokens']} tokens")
    return lines


# A question whose greedy answer reads this far below the ceiling's went elsewhere altogether (on a small model,
# often one side's answer looping on a phrase): a gap carried by a few such questions is a few branch points, one
# spread over many is drift.
FAR_BELOW = 0.3


def cosine_intervals(report: dict) -> list[str]:
    """The greedy answers' cosine with its 95% bootstrap interval over questions, and each method's gap to
    the full cache in the compile's dtype, paired question by question: which differences are more than luck."""
    rows = [r for r in report["rows"] if r.get("generation", {}).get("cosines")]
    if not rows:
        return []
    ceiling = (report.get("ceiling") or {}).get("cosines")
    lines = [f"greedy answers' cosine, 95% bootstrap interval over {len(rows[0]['generation']['cosines'])} questions"
             + (f" (and the gap to the full cache in {report['ceiling']['dtype']}, paired)" if ceiling else "") + ":"]
    for r in rows:
        g = r["generation"]
        lo, hi = g["cosine_interval"]
        line = f"  {r['method']} at {r['budget']:g}: {g['cosine']:.3f} [{lo:.3f}, {hi:.3f}]"
        if ceiling and len(ceiling) == len(g["cosines"]):
            gaps = [m - c for m, c in zip(g["cosines"], ceiling)]
            lo, hi = bootstrap_interval(gaps)
            line += f"; against it {sum(gaps) / len(gaps):+.3f} [{lo:+.3f}, {hi:+.3f}]"
            far = [gap for gap in gaps if gap < -FAR_BELOW]
            if far:
                line += (f"; {len(far)} of {len(gaps)} questions, each more than {FAR_BELOW} below it, "
                         f"carry {sum(far) / len(gaps):+.3f}")
        lines.append(line)
    return lines


def _seconds(row: dict) -> str:
    """A nectar row's own compile time (fit, exact-token choice, on-policy refit...), beyond shared stages."""
    return "-" if row.get("fit_seconds") is None else f"{row['fit_seconds']:.0f}"


def plot_fidelity(report: dict, path: Path) -> None:
    """Answer-token agreement and KL against bytes kept (log x), one curve per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = dict.fromkeys(r["method"] for r in report["rows"])
    for name in sorted(methods, key=lambda m: not m.startswith("nectar")):  # nectar first: the same colour always
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["bytes_ratio"])
        for ax, metric in zip(axes, ("agreement", "kl")):
            y = [r["questions"]["answer"][metric] for r in rows]
            if name == "no_document":
                ax.axhline(sum(y) / len(y), color="grey", linestyle="--", label="no document")
                continue
            style = {"linewidth": 2.5, "marker": "o"} if name.startswith("nectar") else {"marker": "."}
            ax.plot([r["bytes_ratio"] for r in rows], y, label=name, **style)
    rounding = (report.get("ceiling") or {}).get("questions")
    if rounding:  # how close the same model comes in another dtype: what a method nearly exact would read
        for ax, metric in zip(axes, ("agreement", "kl")):
            ax.axhline(rounding["answer"][metric], color="black", linestyle=":",
                       label=f"full cache in {report['ceiling']['dtype']}")
    for ax, label in zip(axes, ("answer-token agreement with the full cache", "KL(full || method), answer tokens")):
        ax.set_xscale("log")
        ax.set_xlabel("bytes kept for the document / full KV cache bytes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    log_if_positive(axes[1], "y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fidelity vs bytes, {report['document_tokens']}-token document")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap(report: dict, path: Path) -> None:
    """Approximation error against next-token gap: per layer, and per method x budget."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    main = next((r for r in report["rows"] if "layer_gap" in r), None)
    c = report["correlation"]
    if main:
        err, gap = main["layers"]["merged_rel"], main["layer_gap"]
        axes[0].scatter(err, gap)
        for layer, (x, y) in enumerate(zip(err, gap)):
            axes[0].annotate(str(layer), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        axes[0].set_title(f"per layer (nectar at {main['budget']:g}): Spearman {c.get('per_layer', float('nan')):.2f}")
        axes[0].set_xlabel("merged-output relative error of that layer")
        axes[0].set_ylabel("answer KL with only that layer approximated")
        log_if_positive(axes[0], "y")
    for name in dict.fromkeys(r["method"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["method"] == name]
        axes[1].scatter([r["errors"]["merged_rel"] for r in rows], [r["questions"]["answer"]["kl"] for r in rows],
                        label=name, s=40 if name.startswith("nectar") else 20)
    axes[1].set_title(f"per method and budget: Spearman {c['across_methods']:.2f}")
    axes[1].set_xlabel("mean merged-output relative error (all layers)")
    axes[1].set_ylabel("answer-token KL(full || method)")
    log_if_positive(axes[1], "x")
    log_if_positive(axes[1], "y")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    paths = [out / "eval.json", out / "fidelity_vs_bytes.png", out / "error_vs_gap.png"]
    write_json(paths[0], report)
    plot_fidelity(report, paths[1])
    plot_gap(report, paths[2])
    return paths
