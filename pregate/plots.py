"""PNG plots a person can read. matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(result: dict, path: str | Path) -> Path:
    """Grouped bars: test perplexity per domain for each variant (log scale: variants differ by x10)."""
    plt = _pyplot()
    domains = list(result["domains"])
    variants = [v for v in dict.fromkeys(k for row in result["domains"].values() for k in row)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(domains)), 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(domains))]
        ys = [result["domains"][d].get(v, float("nan")) for d in domains]
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title(f"{result.get('base', '')}: {result['tokens_per_domain']} test tokens per domain")
    ax.legend(fontsize=8, ncols=len(variants), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
