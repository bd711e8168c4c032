"""The weights level's per-layer chart, as PNG bytes: ||t - s|| / ||t|| and ||d|| / ||t|| (log scale) over
the layers, cos(t - s, d) below, the verdict's thresholds as lines. One line per diff.

matplotlib runs on its Agg backend through a Figure of our own (no pyplot): nothing global is touched, and
the figure is freed when this returns.
"""

from __future__ import annotations

import io

from worker.engine.verdict import BASES_DISTANCE_INCOMPATIBLE, BASES_DISTANCE_RISKY, COS_AGAINST_RISKY

DPI = 80
_STYLES = ("-", "--", ":", "-.")


def _series(layers: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["layer"], entry[key]) for entry in layers
              if entry["layer"] is not None and entry.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def layers_png(diffs: list[dict], title: str = "") -> bytes:
    """`diffs`: the weights section's per-diff summaries (their "layers")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 5), dpi=DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    several = len(diffs) > 1
    for k, entry in enumerate(diffs):
        style = _STYLES[k % len(_STYLES)]
        label = f" (diff {entry['diff']})" if several else ""
        for key, color, name in (("bases_distance_ratio", "tab:red", "||t - s|| / ||t||"),
                                 ("delta_ratio", "tab:blue", "||d|| / ||t||")):
            x, y = _series(entry["layers"], key)
            positive = [(a, b) for a, b in zip(x, y, strict=True) if b > 0]  # log scale
            if positive:
                top.plot(*zip(*positive, strict=True), style, color=color, marker=".", label=name + label)
        x, y = _series(entry["layers"], "cos_bases_delta")
        if x:
            bottom.plot(x, y, style, color="tab:green", marker=".", label="cos(t - s, d)" + label)
    top.set_yscale("log")
    for value, name in ((BASES_DISTANCE_RISKY, "risky"), (BASES_DISTANCE_INCOMPATIBLE, "incompatible")):
        top.axhline(value, color="grey", linewidth=0.8, linestyle="--")
        top.annotate(name, (0.005, value), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
    bottom.axhline(COS_AGAINST_RISKY, color="grey", linewidth=0.8, linestyle="--")
    bottom.annotate("risky", (0.005, COS_AGAINST_RISKY), xycoords=("axes fraction", "data"), fontsize=7,
                    color="grey")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.axhline(0.0, color="black", linewidth=0.5)
    bottom.set_ylim(-1.05, 1.05)
    top.set_ylabel("ratio")
    bottom.set_ylabel("cosine")
    bottom.set_xlabel("layer")
    top.set_title(title or "target vs source base, per layer", fontsize=10)
    for ax in (top, bottom):
        ax.grid(True, linewidth=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.1, right=0.97, top=0.93, bottom=0.1, hspace=0.08)  # tight_layout costs ~0.3 s
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return buf.getvalue()
