"""Figures of results: matplotlib is imported only when a plot is made.

`figure()` makes the figures that the results' `.plot()` return. They are made
through pyplot, so that a notebook's inline backend knows how to show them, and
then closed: a cell that ends with `result.plot()` shows the figure once (as the
cell's value), and plots do not pile up in pyplot's list. Elsewhere,
`fig.savefig("x.png")`. Files are drawn on a bare `Figure` (`grid`): no pyplot
state, and the session's backend is left as it is.
"""

from typing import Dict, Sequence

import numpy as np


def figure(panels: int = 1, width: float = 5.0, height: float = 3.4):
    """(figure, axes): `panels` side by side, closed in pyplot (module docstring)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False, layout="constrained")
    plt.close(fig)
    return fig, list(axes[0])


def per_position(ax, series: Dict[str, Sequence[float]], ylabel: str, title: str = ""):
    """One line per series over drafted positions 1, 2, ... (acceptance or accuracy per position)."""
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    longest = max((len(v) for v in series.values()), default=1)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("drafted position")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")


def bars(ax, groups: Sequence[str], series: Dict[str, Sequence[float]], ylabel: str, title: str = ""):
    """Grouped bars: one group per entry of `groups`, one bar per series (values in group order)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")


def grid(results, path, title: str, key: str = "tokens_per_step", label: str = "mean tokens per step"):
    """Heatmaps of `key` over W x Lb (one panel per lookup setting), written to `path` as PNG."""
    from matplotlib.figure import Figure

    widths = sorted({r["width"] for r in results})
    lengths = sorted({r["length"] for r in results})
    panels = sorted({bool(r.get("lookup")) for r in results})
    grids = {p: np.full((len(widths), len(lengths)), np.nan) for p in panels}
    for r in results:
        grids[bool(r.get("lookup"))][widths.index(r["width"]), lengths.index(r["length"])] = r[key]
    every = np.stack(list(grids.values()))
    low, high = np.nanmin(every), np.nanmax(every)
    fig = Figure(figsize=(len(panels) * (1.2 * len(lengths) + 1.2) + 1, 0.8 * len(widths) + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        values = grids[panel]
        im = ax.imshow(values, cmap="viridis", origin="lower", vmin=low, vmax=high)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(widths)), widths)
        ax.set_xlabel("beam length Lb (g0 included)")
        ax.set_ylabel("beam width W")
        for i in range(len(widths)):
            for j in range(len(lengths)):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w")
        if len(panels) > 1:
            ax.set_title("drafter + context lookup" if panel else "drafter alone")
    fig.colorbar(im, ax=axes[0].tolist(), label=label)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
