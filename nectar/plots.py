"""Plot helpers shared by the eval and bench reports."""
from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on a backend that needs no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_if_positive(ax, axis: str) -> None:
    """Log scale where every plotted value allows it (a perfect method can reach 0)."""
    values = [v for coll in ax.collections for v in coll.get_offsets()[:, 0 if axis == "x" else 1]]
    values += [v for line in ax.lines for v in (line.get_xdata() if axis == "x" else line.get_ydata())]
    if values and min(values) > 0:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def n_ticks(ax, sizes: list[int]) -> None:
    """Ticks at the measured sizes, written 1k, 8k, 1M: a log axis's own 3x10^3 labels collide."""
    sizes = sorted(set(sizes))
    ax.set_xticks(sizes, [f"{n / 2**20:.0f}M" if n >= 2**20 else f"{n / 1024:.0f}k" for n in sizes])
    ax.minorticks_off()
