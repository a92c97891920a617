"""The BatchNorm study: does BatchNorm make training faster? The seeds claim it does; this
measures it.

The same networks are trained on scikit-learn's digits with their BatchNorm layers, and with
them replaced by identities, over several seeds each (same initialization order, same batches
for a given seed). Recorded every few steps: training loss and held-out accuracy. Reported:
steps to reach a target held-out accuracy and the final held-out accuracy, with their spread,
and a conclusion computed from those figures, whichever way they fall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnbench import zoo
from bnbench.results import STUDY_SCHEMA, to_csv, write_atomic


@dataclass(frozen=True)
class Study:
    models: tuple[str, ...] = ("mlp_bn", "conv_bn")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 200
    every: int = 10
    batch_size: int = 32
    lr: float = 0.1
    target: float = 0.9  # held-out accuracy


QUICK_STUDY = Study()
SMOKE_STUDY = Study(models=("mlp_bn",), seeds=(0, 1), steps=40, every=10)


def without_batchnorm(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def run_one(name: str, batchnorm: bool, seed: int, study: Study) -> list[dict]:
    model = zoo.build(name, seed=seed)
    if not batchnorm:
        model = without_batchnorm(model)
    x_train, y_train, x_test, y_test = zoo.digits()
    x_train = zoo.prepare(name, x_train).float()
    x_test = zoo.prepare(name, x_test).float()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=study.lr)
    rows = []
    for step in range(1, study.steps + 1):
        model.train()
        index = torch.randint(0, len(y_train), (study.batch_size,), generator=generator)
        loss = F.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % study.every == 0 or step == 1:
            model.eval()
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
            rows.append(
                {
                    "model": name,
                    "batchnorm": batchnorm,
                    "seed": seed,
                    "step": step,
                    "train_loss": float(loss.detach()),
                    "test_accuracy": accuracy,
                }
            )
    return rows


def run_study(study: Study = QUICK_STUDY) -> list[dict]:
    rows = []
    for name in study.models:
        for batchnorm in (True, False):
            for seed in study.seeds:
                rows += run_one(name, batchnorm, seed, study)
    return rows


def summarize(rows: list[dict], target: float) -> list[dict]:
    """Per model and with/without BN: steps to the target (median, min, max over seeds; a seed
    that never gets there counts as not reached) and final held-out accuracy."""
    out = []
    keys = sorted({(r["model"], r["batchnorm"]) for r in rows}, key=lambda k: (k[0], not k[1]))
    for name, batchnorm in keys:
        mine = [r for r in rows if r["model"] == name and r["batchnorm"] == batchnorm]
        seeds = sorted({r["seed"] for r in mine})
        reached, finals = [], []
        for seed in seeds:
            curve = sorted((r for r in mine if r["seed"] == seed), key=lambda r: r["step"])
            hit = next((r["step"] for r in curve if r["test_accuracy"] >= target), None)
            reached.append(hit)
            finals.append(curve[-1]["test_accuracy"])
        got = sorted(s for s in reached if s is not None)
        mean = sum(finals) / len(finals)
        std = math.sqrt(sum((f - mean) ** 2 for f in finals) / max(len(finals) - 1, 1))
        out.append(
            {
                "model": name,
                "batchnorm": batchnorm,
                "seeds": len(seeds),
                "reached_target": len(got),
                "steps_to_target_median": got[len(got) // 2] if got else None,
                "steps_to_target_min": got[0] if got else None,
                "steps_to_target_max": got[-1] if got else None,
                "final_accuracy_mean": mean,
                "final_accuracy_std": std,
            }
        )
    return out


def conclusion(summary: list[dict], target: float) -> list[str]:
    """One sentence per model, computed from the figures (never assumed)."""
    lines = []
    for name in dict.fromkeys(s["model"] for s in summary):
        with_bn = next(s for s in summary if s["model"] == name and s["batchnorm"])
        without = next(s for s in summary if s["model"] == name and not s["batchnorm"])
        faster = _earlier(with_bn, without)
        better = with_bn["final_accuracy_mean"] - without["final_accuracy_mean"]
        verdict = (
            "BatchNorm helps"
            if faster and better >= -0.01
            else "BatchNorm does not help"
            if not faster and better <= 0.01
            else "mixed result"
        )
        lines.append(
            f"{name}: {verdict} on this data. With BN {with_bn['reached_target']}/"
            f"{with_bn['seeds']} seeds reached {target:.0%} held-out accuracy (median step "
            f"{with_bn['steps_to_target_median']}), without BN {without['reached_target']}/"
            f"{without['seeds']} (median step {without['steps_to_target_median']}); final "
            f"held-out accuracy {with_bn['final_accuracy_mean']:.3f} +- "
            f"{with_bn['final_accuracy_std']:.3f} with BN, {without['final_accuracy_mean']:.3f}"
            f" +- {without['final_accuracy_std']:.3f} without."
        )
    return lines


def _earlier(a: dict, b: dict) -> bool:
    """Did ``a`` reach the target earlier (or in more seeds) than ``b``?"""
    if a["reached_target"] != b["reached_target"]:
        return a["reached_target"] > b["reached_target"]
    if not a["reached_target"]:
        return False
    return a["steps_to_target_median"] < b["steps_to_target_median"]


def plot(rows: list[dict], target: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for batchnorm, color in ((True, "tab:blue"), (False, "tab:orange")):
            mine = [r for r in rows if r["model"] == name and r["batchnorm"] == batchnorm]
            steps = sorted({r["step"] for r in mine})
            per_step = [[r["test_accuracy"] for r in mine if r["step"] == s] for s in steps]
            ax.plot(
                steps,
                [sum(v) / len(v) for v in per_step],
                color=color,
                label=("with" if batchnorm else "without") + " BatchNorm (mean)",
            )
            ax.fill_between(
                steps,
                [min(v) for v in per_step],
                [max(v) for v in per_step],
                color=color,
                alpha=0.2,
                label="min-max over seeds",
            )
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{name}: held-out accuracy on digits")
        ax.set_xlabel("SGD step")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_study(output: Path, study: Study = QUICK_STUDY) -> list[str]:
    """study.csv (every recorded point) and study.json (summary and conclusion)."""
    import json

    rows = run_study(study)
    summary = summarize(rows, study.target)
    lines = conclusion(summary, study.target)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "study.csv", to_csv(rows, list(rows[0])))
    write_atomic(
        output / "study.json",
        json.dumps(
            {
                "schema": STUDY_SCHEMA,
                "study": study.__dict__,
                "summary": summary,
                "conclusion": lines,
            },
            indent=2,
            default=list,
        ),
    )
    return lines
