"""`pregate analyze`: the paper's routing analyses on a trained checkpoint (layer redundancy, temporal
locality, reuse distance, expert specialisation).

This module owns the statistics of expert choices (pure functions over integer expert ids, no torch),
the collection of those choices on held-out text (test split of every domain, the blocks `eval ppl`
reads) and the JSON/PNG outputs. Choices are top-1 experts:
- router:     the pre-gating router of MODEL (`pregate train` output), one expert per token for all layers;
- oracle:     the router's distillation target on MODEL's backbone (`distill.distill_targets`: per layer,
              the share of the token's routed activation mass each expert's channels hold; summed over
              layers for the single choice: `router.oracle_experts`, what `router_accuracy` compares to);
- layerwise:  the per-layer gates of a `pregate train --layerwise` run on the same refactored model,
              each reading the hidden state entering its layer's MLP (that run's own backbone).

Definitions (entropies and mutual information in bits):
- transition matrix of layers (l, l+1): P[a, b] = P(expert b at layer l+1 | expert a at layer l); rows
  of experts layer l never picks are zero.
- MI(l, l+1) from the joint counts; normalised MI = MI / H(layer l+1) (Theil's uncertainty
  coefficient: the fraction of the next layer's choice that this layer's choice determines; 0 for
  independent choices, 1 when the next layer is a function of this one; 1 by convention when the next
  layer always picks one expert).
- temporal locality: of the consecutive token pairs inside a block, the fraction whose expert equals
  the previous token's. "Chance" is sum_e p(e)^2, the locality of independent choices with the same
  expert usage. The paper's figures count tokens of a 4096-token sample: 2921/4096 (Read-ME) and 850/4096
  (Mixtral); `per_4096` rescales ours to that size.
- reuse distance: in the reference string a per-token expert cache sees (a domain's tokens in order;
  unit = whole expert under pre-gating, one string per layer for layer-wise gates), the number of
  distinct other experts referenced since the previous reference to the same expert (LRU stack
  distance; "cold" = first reference). Distance 0 is temporal locality; an LRU cache of k experts hits
  exactly the references with distance < k.

Imports from the package: `errors` at import time (the statistics need no torch); `checkpoint`, `moe`,
`router`, `distill`, `data`, `evaluate` and `plots` inside the functions that collect and draw.

Legend: B blocks, n block length, T = B*n tokens, Y backbone layers, E routed experts, D domains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pregate.errors import PregateError, check_expert_ids, check_int

PAPER_ANALYSIS = {
    "locality_readme": 2921 / 4096,
    "locality_mixtral": 850 / 4096,
    "source": "Read-ME (NeurIPS 2024): 2921 of 4096 tokens reuse the previous token's expert, 850 in Mixtral",
}
RESULT_FILE = "analysis.json"


# ----------------------------------------------------------------------------------------- statistics


def _ids(choices: Sequence[int] | np.ndarray, num_experts: int) -> np.ndarray:
    a = np.asarray(choices, dtype=np.int64).reshape(-1)
    if a.size:
        check_expert_ids(int(a.min()), int(a.max()), num_experts)
    return a


def joint_counts(a: Sequence[int], b: Sequence[int], num_experts: int) -> np.ndarray:
    """[E, E] counts of (a[t], b[t]) over tokens t: a = experts at one layer, b at the next."""
    a, b = _ids(a, num_experts), _ids(b, num_experts)
    if a.shape != b.shape:
        raise PregateError(f"need one expert per token at both layers, got {a.size} and {b.size} tokens")
    counts = np.zeros((num_experts, num_experts), dtype=np.int64)
    np.add.at(counts, (a, b), 1)
    return counts


def transition_matrix(counts: np.ndarray) -> np.ndarray:
    """Row-normalised joint counts: P(next = b | this = a); all-zero rows stay zero."""
    rows = counts.sum(1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)


def entropy(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution proportional to `counts` (any shape)."""
    p = np.asarray(counts, dtype=float).reshape(-1)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0


def mutual_information(counts: np.ndarray) -> float:
    """MI in bits between the row and column variables of joint counts [E, E]: H(a) + H(b) - H(a, b)."""
    mi = entropy(counts.sum(1)) + entropy(counts.sum(0)) - entropy(counts)
    return max(0.0, mi)  # float rounding can leave -1e-16 for independent variables


def normalised_mi(counts: np.ndarray) -> float:
    """MI / H(column variable): 0 for independence, 1 when the column is a function of the row."""
    h_next = entropy(counts.sum(0))
    return 1.0 if h_next == 0 else mutual_information(counts) / h_next


def layer_pairs(choices: np.ndarray, num_experts: int) -> list[dict]:
    """For choices [Y, T] (expert per layer and token): one entry per consecutive layer pair."""
    out = []
    for i in range(len(choices) - 1):
        counts = joint_counts(choices[i], choices[i + 1], num_experts)
        out.append(
            {
                "layers": [i, i + 1],
                "mi_bits": mutual_information(counts),
                "normalised_mi": normalised_mi(counts),
                "entropy_bits": [entropy(counts.sum(1)), entropy(counts.sum(0))],
                "same_expert": float(np.trace(counts) / max(1, counts.sum())),
                "transition": transition_matrix(counts).round(4).tolist(),
                "counts": counts.tolist(),
            }
        )
    return out


def temporal_locality(blocks: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(pairs whose expert equals the previous token's, consecutive pairs), summed over blocks."""
    same = pairs = 0
    for block in blocks:
        b = np.asarray(block).reshape(-1)
        same += int((b[1:] == b[:-1]).sum())
        pairs += max(0, b.size - 1)
    return same, pairs


def chance_locality(usage: np.ndarray) -> float:
    """sum_e p(e)^2: the locality of independent choices with this expert usage."""
    p = np.asarray(usage, dtype=float)
    return float(((p / p.sum()) ** 2).sum()) if p.sum() else 0.0


def reuse_distances(refs: Sequence[object]) -> list[int | None]:
    """LRU stack distance of every reference: distinct other units since its previous use; None = cold."""
    stack: list[object] = []  # most recent first
    out: list[int | None] = []
    for unit in refs:
        if unit in stack:
            d = stack.index(unit)
            out.append(d)
            stack.pop(d)
        else:
            out.append(None)
        stack.insert(0, unit)
    return out


def reuse_histogram(refs: Sequence[object], num_units: int) -> dict:
    """{"distance": counts of distances 0..num_units-1, "cold": first references, "references": n}."""
    hist = [0] * num_units
    cold = 0
    for d in reuse_distances(refs):
        if d is None:
            cold += 1
        else:
            hist[d] += 1
    return {"distance": hist, "cold": cold, "references": len(refs)}


def add_histograms(hists: Sequence[dict]) -> dict:
    n = len(hists[0]["distance"])
    return {
        "distance": [sum(h["distance"][i] for h in hists) for i in range(n)],
        "cold": sum(h["cold"] for h in hists),
        "references": sum(h["references"] for h in hists),
    }


def lru_hit_ratios(hist: dict) -> list[float]:
    """Hit ratio of an LRU cache of k = 1..E experts on the string (cold misses count as misses)."""
    hits = np.cumsum(hist["distance"])
    return [float(h / max(1, hist["references"])) for h in hits]


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of tokens where two routings pick the same expert."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise PregateError(f"agreement needs equally many (> 0) choices, got {a.size} and {b.size}")
    return float((a == b).mean())


def usage_counts(choices: Sequence[int], num_experts: int) -> np.ndarray:
    """[E] how many tokens each expert receives."""
    return np.bincount(_ids(choices, num_experts), minlength=num_experts)


def usage_matrix(by_domain: dict[str, Sequence[int]], num_experts: int) -> np.ndarray:
    """[D, E] row-normalised: the share of domain d's tokens that expert e receives."""
    counts = np.stack([usage_counts(c, num_experts) for c in by_domain.values()]).astype(float)
    return counts / np.maximum(1, counts.sum(1, keepdims=True))


# ----------------------------------------------------------------------------------------- collection


@dataclass
class AnalyzeConfig:
    domains: list[str] | None = None  # None: the experts' domains
    tokens_per_domain: int = 4096  # the paper's locality sample size
    block_len: int = 512
    batch_size: int = 4

    def __post_init__(self):
        for name in ("tokens_per_domain", "block_len", "batch_size"):
            value = getattr(self, name)
            check_int(f"AnalyzeConfig.{name}", value)
        if self.block_len < 2 or self.tokens_per_domain < self.block_len:
            raise PregateError(
                f"need block_len >= 2 and tokens_per_domain >= block_len "
                f"(got {self.block_len}, {self.tokens_per_domain})"
            )


def _load_pregating(model_dir: Path):
    """(MoE, pre-gating router) of a `pregate train` output; clear errors for anything else."""
    import torch

    from pregate.checkpoint import has_router
    from pregate.moe import load_moe
    from pregate.router import LayerwiseGate, load_router

    moe = load_moe(model_dir, torch.float32)
    if moe.num_experts == 0:
        raise PregateError(
            f"{model_dir} is a dense checkpoint (0 routed experts); give a `pregate train` output"
        )
    if not has_router(model_dir):
        raise PregateError(
            f"{model_dir} has no trained router; train one with "
            f"`pregate train {model_dir} --out DIR` and analyze DIR"
        )
    router = load_router(model_dir)
    if isinstance(router, LayerwiseGate):
        raise PregateError(
            f"{model_dir} holds layer-wise gates, not a pre-gating router: "
            f"give the pre-gating run as MODEL and this one as --layerwise {model_dir}"
        )
    return moe, router


def _load_layerwise(path: Path, moe):
    """(MoE, LayerwiseGate) of a `pregate train --layerwise` output that fits `moe`."""
    import torch

    from pregate.checkpoint import ROUTER_CONFIG, has_router
    from pregate.moe import load_moe
    from pregate.router import LayerwiseGate, load_router

    if not path.is_dir() or not has_router(path):
        raise PregateError(
            f"--layerwise {path} is not a `pregate train --layerwise` output "
            f"(no {ROUTER_CONFIG}); train one with "
            f"`pregate train PARENT --layerwise --out {path}`"
        )
    gate = load_router(path)
    if not isinstance(gate, LayerwiseGate):
        raise PregateError(
            f"--layerwise {path} holds a pre-gating router, not layer-wise gates; "
            "train them with `pregate train PARENT --layerwise --out DIR`"
        )
    lw_moe = load_moe(path, torch.float32)
    if lw_moe.num_experts != moe.num_experts or len(lw_moe.layers) != len(moe.layers):
        raise PregateError(
            f"--layerwise {path} has {len(lw_moe.layers)} layers x {lw_moe.num_experts} "
            f"experts, MODEL {len(moe.layers)} x {moe.num_experts}: "
            "train both from the same refactored model"
        )
    return lw_moe, gate


def collect_choices(moe, router, blocks, batch_size: int, layerwise=None, desc: str = "") -> dict:
    """Top-1 experts on blocks [B, n] -> {"router": [B, n], "oracle": [B, n], "oracle_layers": [Y, B, n],
    "layerwise": [Y, B, n] (only with layerwise=(MoE, LayerwiseGate))} as numpy arrays."""
    import torch
    from tqdm.auto import tqdm

    from pregate.distill import distill_targets
    from pregate.router import oracle_experts, routing_for

    parts: dict[str, list] = {"router": [], "oracle": [], "oracle_layers": [], "layerwise": []}
    with torch.no_grad():
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", leave=False):
            ids = blocks[start : start + batch_size]  # [b, n]
            shape = tuple(ids.shape)
            eids, _ = router.route(router(ids))  # [b, n, K]
            parts["router"].append(eids[..., 0].numpy())
            scores = distill_targets(moe, ids)  # [b*n, Y, E]
            parts["oracle"].append(oracle_experts(scores).view(shape).numpy())
            parts["oracle_layers"].append(scores.argmax(-1).T.reshape(-1, *shape).numpy())
            if layerwise is not None:
                lw_moe, gate = layerwise
                _, layer_router = routing_for(gate, ids)
                picked = []

                def record(layer, h, layer_router=layer_router, picked=picked, shape=shape):
                    routing = layer_router(layer, h)
                    picked.append(routing.expert_ids[:, 0].view(shape))
                    return routing

                lw_moe(ids, None, record)
                parts["layerwise"].append(torch.stack(picked).numpy())
    out = {k: np.concatenate(v, axis=0) for k, v in parts.items() if k in ("router", "oracle") and v}
    out["oracle_layers"] = np.concatenate(parts["oracle_layers"], axis=1)
    if parts["layerwise"]:
        out["layerwise"] = np.concatenate(parts["layerwise"], axis=1)
    return out


# ----------------------------------------------------------------------------------------- the analysis


def _locality(blocks: np.ndarray, num_experts: int) -> dict:
    same, pairs = temporal_locality(blocks)
    frac = same / max(1, pairs)
    return {
        "same": same,
        "pairs": pairs,
        "fraction": frac,
        "per_4096": round(4096 * frac),
        "chance": chance_locality(usage_counts(blocks, num_experts)),
    }


def _layer_analysis(per_domain: dict[str, np.ndarray], num_experts: int) -> dict:
    """Choices [Y, B, n] per domain -> layer pairs (all domains pooled), per-layer locality, reuse."""
    pooled = np.concatenate([c.reshape(c.shape[0], -1) for c in per_domain.values()], axis=1)  # [Y, T]
    layers = pooled.shape[0]
    locality = []
    for i in range(layers):
        locality.append(_locality(np.concatenate([c[i] for c in per_domain.values()]), num_experts))
    reuse = add_histograms(
        [
            reuse_histogram(c[i].reshape(-1).tolist(), num_experts)
            for c in per_domain.values()
            for i in range(layers)
        ]
    )
    pairs = layer_pairs(pooled, num_experts)
    return {
        "pairs": pairs,
        "mean_mi_bits": float(np.mean([p["mi_bits"] for p in pairs])) if pairs else None,
        "mean_normalised_mi": float(np.mean([p["normalised_mi"] for p in pairs])) if pairs else None,
        "locality_per_layer": locality,
        "locality_mean": float(np.mean([x["fraction"] for x in locality])),
        "reuse_distance": {**reuse, "lru_hit_ratio": lru_hit_ratios(reuse)},
    }


def analyze(
    model_dir: str | Path,
    out: str | Path,
    cfg: AnalyzeConfig | None = None,
    layerwise_dir: str | Path | None = None,
) -> dict:
    """Run every analysis on MODEL (and its layer-wise twin when given); write JSON and PNGs into `out`."""
    from transformers import AutoTokenizer

    from pregate import data
    from pregate.evaluate import register_recorded_domains

    cfg = cfg or AnalyzeConfig()
    model_dir, out = Path(model_dir), Path(out)
    moe, router = _load_pregating(model_dir)
    layerwise = _load_layerwise(Path(layerwise_dir), moe) if layerwise_dir is not None else None
    register_recorded_domains(moe)
    experts = moe.config.expert_names
    domains = cfg.domains or list(experts)
    for d in domains:
        data.domain_info(d)
    notes = []
    if layerwise is None:
        notes.append(
            "no --layerwise: layer redundancy and layer-wise locality skipped; train the gates with "
            f"`pregate train {moe.config.provenance.get('parent', 'PARENT')} --layerwise --out DIR` "
            "and pass --layerwise DIR"
        )
    else:
        lw_parent = layerwise[0].config.provenance.get("parent")
        if lw_parent != moe.config.provenance.get("parent"):
            notes.append(
                f"the layer-wise run was trained from {lw_parent}, MODEL from "
                f"{moe.config.provenance.get('parent')}: not the same refactored model"
            )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    e = moe.num_experts
    choices = {}
    for d in domains:
        blocks = data.token_blocks(tokenizer, d, "test", cfg.tokens_per_domain, cfg.block_len)
        choices[d] = collect_choices(moe, router, blocks, cfg.batch_size, layerwise, desc=f"routing {d}")
    result: dict = {
        "model": str(model_dir),
        "layerwise": None if layerwise_dir is None else str(layerwise_dir),
        "experts": list(experts),
        "num_layers": len(moe.layers),
        "domains": domains,
        "tokens_per_domain": cfg.tokens_per_domain,
        "block_len": cfg.block_len,
        "split": "test",
        "paper": PAPER_ANALYSIS,
        "notes": notes,
    }
    routers = {"router": {}, "oracle": {}}
    for name in routers:
        per_domain = {d: _locality(choices[d][name], e) for d in domains}
        everything = np.concatenate([choices[d][name] for d in domains])
        reuse = add_histograms([reuse_histogram(choices[d][name].reshape(-1).tolist(), e) for d in domains])
        routers[name] = {
            "locality": {"all": _locality(everything, e), "domains": per_domain},
            "reuse_distance": {**reuse, "lru_hit_ratio": lru_hit_ratios(reuse)},
            "usage": usage_matrix({d: choices[d][name] for d in domains}, e).round(4).tolist(),
        }
    all_router = np.concatenate([choices[d]["router"].reshape(-1) for d in domains])
    all_oracle = np.concatenate([choices[d]["oracle"].reshape(-1) for d in domains])
    routers["router"]["oracle_agreement"] = agreement(all_router, all_oracle)
    result.update(routers)
    result["oracle_layers"] = _layer_analysis({d: choices[d]["oracle_layers"] for d in domains}, e)
    if layerwise is not None:
        lw = _layer_analysis({d: choices[d]["layerwise"] for d in domains}, e)
        flat = [choices[d]["layerwise"].reshape(len(moe.layers), -1) for d in domains]
        pooled = np.concatenate(flat, axis=1)  # [Y, T]
        p_router = usage_counts(all_router, e) / all_router.size
        lw["router_agreement"] = []
        for i in range(len(moe.layers)):
            p_gate = usage_counts(pooled[i], e) / pooled.shape[1]
            lw["router_agreement"].append(
                {
                    "layer": i,
                    "agreement": agreement(pooled[i], all_router),
                    "chance": float((p_router * p_gate).sum()),
                }
            )
        result["layerwise_gates"] = lw
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = [p.name for p in write_figures(result, out)]
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------- output


def format_mi_table(result: dict) -> str:
    """MI per consecutive layer pair: layer-wise gates (when analysed) and the per-layer oracle."""
    sources = [("layerwise_gates", "gates"), ("oracle_layers", "oracle")]
    sources = [(k, label) for k, label in sources if result.get(k)]
    head = "layers".ljust(9)
    for _, label in sources:
        head += f"{label + ' MI':>12s}{label + ' H(l+1)':>14s}{label + ' nMI':>12s}"
    lines = [head + "   (bits; nMI = MI / H(l+1))"]
    for i, pair in enumerate(result["oracle_layers"]["pairs"]):
        row = f"{pair['layers'][0]:>2d} -> {pair['layers'][1]:<3d}"
        for key, _ in sources:
            p = result[key]["pairs"][i]
            row += f"{p['mi_bits']:12.3f}{p['entropy_bits'][1]:14.3f}{p['normalised_mi']:12.3f}"
        lines.append(row)
    mean = "mean".ljust(9)
    for key, _ in sources:
        mean += f"{result[key]['mean_mi_bits']:12.3f}{'':14s}{result[key]['mean_normalised_mi']:12.3f}"
    lines.append(mean)
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """Locality, reuse and agreement lines next to the paper's numbers."""
    r = result["router"]
    loc = r["locality"]["all"]
    lines = [
        f"temporal locality, pre-gating router: {loc['same']}/{loc['pairs']} consecutive pairs = "
        f"{100 * loc['fraction']:.1f} % ({loc['per_4096']}/4096; chance {100 * loc['chance']:.1f} %; "
        f"paper 2921/4096 = {100 * PAPER_ANALYSIS['locality_readme']:.1f} %, Mixtral 850/4096 = "
        f"{100 * PAPER_ANALYSIS['locality_mixtral']:.1f} %)",
        f"temporal locality, oracle: {100 * result['oracle']['locality']['all']['fraction']:.1f} %",
        f"router agrees with the oracle on {100 * r['oracle_agreement']:.1f} % of tokens",
        f"LRU hit ratio from the router's reuse distances, k = 1..{len(result['experts'])}: "
        + " ".join(f"{100 * h:.0f}%" for h in r["reuse_distance"]["lru_hit_ratio"]),
    ]
    lw = result.get("layerwise_gates")
    if lw:
        agree = [a["agreement"] for a in lw["router_agreement"]]
        per_layer = [x["fraction"] for x in lw["locality_per_layer"]]
        mean = 100 * lw["locality_mean"]
        lines.append(
            f"temporal locality, layer-wise gates: mean over layers {mean:.1f} % "
            f"(min {100 * min(per_layer):.1f}, max {100 * max(per_layer):.1f})"
        )
        lines.append(
            f"layer-wise gates agree with the router's choice: mean {100 * np.mean(agree):.1f} % "
            f"(per layer {100 * min(agree):.1f} .. {100 * max(agree):.1f} %)"
        )
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def _heatmap(ax, matrix, title: str, xlabels, ylabels, vmax: float = 1.0, fontsize: int = 7) -> object:
    im = ax.imshow(np.asarray(matrix), vmin=0, vmax=vmax, cmap="viridis")
    ax.set_title(title, fontsize=fontsize + 1)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, fontsize=fontsize)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=fontsize)
    return im


def plot_transitions(pairs: list[dict], experts: list[str], path: Path, title: str) -> Path:
    """A grid of P(expert at l+1 | expert at l) heatmaps, one per consecutive layer pair."""
    from pregate.plots import pyplot

    plt = pyplot()
    cols = min(6, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1, 2.3 * rows + 0.6), squeeze=False)
    short = [x[:4] for x in experts]
    im = None
    for ax, p in zip(axes.flat, pairs):
        label = f"{p['layers'][0]}->{p['layers'][1]}  nMI {p['normalised_mi']:.2f}"
        im = _heatmap(ax, p["transition"], label, short, short, fontsize=6)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: P(expert at layer l+1 (columns) | expert at layer l (rows))", fontsize=9)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_usage(result: dict, path: Path) -> Path:
    """Domain x expert usage (share of each domain's tokens per expert): router beside oracle."""
    from pregate.plots import pyplot

    plt = pyplot()
    d, e = len(result["domains"]), len(result["experts"])
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.6 * e + 2), 0.5 * d + 2), squeeze=False)
    im = None
    for ax, name in zip(axes[0], ("router", "oracle")):
        usage = result[name]["usage"]
        title = f"{name}: share of domain's tokens"
        im = _heatmap(ax, usage, title, result["experts"], result["domains"], fontsize=8)
        for i in range(d):
            for j in range(e):
                color = "black" if usage[i][j] > 0.6 else "white"
                ax.text(j, i, f"{usage[i][j]:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("domain (test split)")
    fig.tight_layout()
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_locality(result: dict, path: Path) -> Path:
    """Left: locality per domain (router, oracle, layer-wise mean; paper's Read-ME and Mixtral lines).
    Right: reuse-distance histograms (share of references)."""
    from pregate.plots import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    domains = result["domains"]
    series = {
        "pre-gating router": [result["router"]["locality"]["domains"][d]["fraction"] for d in domains],
        "oracle": [result["oracle"]["locality"]["domains"][d]["fraction"] for d in domains],
    }
    lw = result.get("layerwise_gates")
    width = 0.8 / len(series)
    for i, (name, ys) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        left.bar(xs, ys, width, label=name)
    left.axhline(
        PAPER_ANALYSIS["locality_readme"], color="tab:green", ls="--", lw=1, label="paper Read-ME 2921/4096"
    )
    left.axhline(
        PAPER_ANALYSIS["locality_mixtral"], color="tab:red", ls="--", lw=1, label="paper Mixtral 850/4096"
    )
    if lw:
        left.axhline(
            lw["locality_mean"], color="tab:purple", ls=":", lw=1.5, label="layer-wise gates, mean of layers"
        )
    left.set_xticks(range(len(domains)), domains, rotation=20)
    left.set_ylim(0, 1)
    left.set_ylabel("tokens with the previous token's expert")
    left.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    strings = {
        "pre-gating router": result["router"]["reuse_distance"],
        "oracle": result["oracle"]["reuse_distance"],
    }
    if lw:
        strings["layer-wise gates (per layer)"] = lw["reuse_distance"]
    labels = [str(i) for i in range(len(result["experts"]))] + ["cold"]
    width = 0.8 / len(strings)
    for i, (name, h) in enumerate(strings.items()):
        ys = [c / max(1, h["references"]) for c in [*h["distance"], h["cold"]]]
        xs = [j + (i - (len(strings) - 1) / 2) * width for j in range(len(labels))]
        right.bar(xs, ys, width, label=name)
    right.set_xticks(range(len(labels)), labels)
    right.set_xlabel("reuse distance (distinct other experts since the last use)")
    right.set_ylabel("share of references")
    right.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(result: dict, out: Path) -> list[Path]:
    paths = [plot_usage(result, out / "usage.png"), plot_locality(result, out / "locality.png")]
    if len(result["oracle_layers"]["pairs"]):
        paths.append(
            plot_transitions(
                result["oracle_layers"]["pairs"],
                result["experts"],
                out / "transitions_oracle.png",
                "per-layer oracle",
            )
        )
    if result.get("layerwise_gates") and result["layerwise_gates"]["pairs"]:
        paths.append(
            plot_transitions(
                result["layerwise_gates"]["pairs"],
                result["experts"],
                out / "transitions_layerwise.png",
                "layer-wise gates",
            )
        )
    return paths
