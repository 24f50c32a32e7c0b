"""The picture of section 8 (the warm pool): each kind's create-to-first-login times, one dot per
create, for the pooled path, pooled creates 8 at once, the cold path and a bare server start, on
a log scale. Written to docs/pool-latency.png, which the README shows."""

import matplotlib

matplotlib.use("Agg")  # no display: a file only

import matplotlib.pyplot as plt

from .stack import BASE_DIR

PICTURE = BASE_DIR / "docs" / "pool-latency.png"
LABELS = {"redis": "Redis", "mysql": "MySQL"}


def draw(results: dict) -> None:
    samples = results["samples_ms"]
    figure, axes = plt.subplots(1, len(samples), figsize=(11, 4.2), sharey=True)
    for ax, (kind, series) in zip(axes, samples.items(), strict=True):
        names = list(series)
        ax.boxplot([series[name] for name in names], whis=(5, 95), showfliers=False, widths=0.5)
        for position, name in enumerate(names, start=1):
            values = series[name]
            spread = [position + ((index % 7) - 3) * 0.04 for index in range(len(values))]
            ax.scatter(spread, values, s=9, alpha=0.6, zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_yscale("log")
        ax.set_title(f"{LABELS.get(kind, kind)}: create request to first login")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("milliseconds (log scale)")
    figure.suptitle(
        f"Warm pool of {results['pool']} per kind vs the cold path and a bare server start (boxes: p5–p95)",
        fontsize=10,
    )
    figure.tight_layout()
    PICTURE.parent.mkdir(exist_ok=True)
    figure.savefig(PICTURE, dpi=110)
    plt.close(figure)
