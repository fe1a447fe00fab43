"""PNG plots a person can read. matplotlib with the Agg backend (no display needed).

Owns `pyplot()`, the one way modules get matplotlib (the reports of `analyze`, `bench_step` and others
call it), and the plots of the model half: `plot_perplexity` (`eval ppl`, `make demo`) and
`plot_losses` (`pregate train`). Imports nothing from the package; matplotlib only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use, so importing pregate stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(result: dict, path: str | Path) -> Path:
    """Grouped bars: test perplexity per domain for each variant (log scale: variants differ by x10)."""
    plt = pyplot()
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


def plot_losses(log: dict, path: Path) -> Path:
    """Expert-stage LM loss (MoE and control) over training steps of a `pregate train` log, router and
    expert stages shaded differently (like the paper's Figure 7); a lower panel shows the router's
    distillation accuracy."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[2, 1])
    shades = {"router": ("tab:orange", "router stage"), "expert": ("tab:blue", "expert stage")}
    for s in log["stages"]:
        if s["stage"] in shades:
            xs = [
                e["x"]
                for e in log["steps"]
                if e["model"] == "moe" and e["round"] == s["round"] and e["stage"] == s["stage"]
            ]
            color, label = shades[s["stage"]]
            for ax in (top, bottom):
                span_label = label if ax is top else None
                ax.axvspan(min(xs) - 0.5, max(xs) + 0.5, color=color, alpha=0.12, lw=0, label=span_label)
            shades[s["stage"]] = (color, None)  # one legend entry per kind
    for model, style in (("moe", "tab:blue"), ("control", "tab:gray")):
        pts = [(e["x"], e["lm"]) for e in log["steps"] if e["model"] == model and "lm" in e]
        if pts:
            xs, ys = zip(*pts)
            top.plot(xs, ys, ".", color=style, ms=3, alpha=0.5)
            # batches mix domains of very different difficulty: the trend is the running mean of 8 steps
            smooth = [sum(ys[max(0, i - 7) : i + 1]) / len(ys[max(0, i - 7) : i + 1]) for i in range(len(ys))]
            label = f"{model} LM loss, mean of 8 steps" + (" (same tokens)" if model == "control" else "")
            top.plot(xs, smooth, "-", color=style, lw=1.8, label=label)
    acc = [(e["x"], e["acc"]) for e in log["steps"] if "acc" in e]
    if acc:
        bottom.plot(*zip(*acc), ".-", color="tab:orange", ms=3, lw=1)
    top.set_ylabel("train cross-entropy")
    top.legend(fontsize=8)
    bottom.set_ylabel("router acc.")
    bottom.set_xlabel("training step (each step: one global batch of tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
