"""The A/B gate's own error rates on this machine, next to the stored-run `compare`'s, with a
CPU-bound neighbour (a Python busy loop) running all along:

* identical code (the baseline against a copy of itself): how often it is flagged (slower);
* a planted 2x slowdown, and a planted 1.3x slowdown (suites/ab_planted.py: nn.BatchNorm that
  repeats its own work on all of the batch, or 30% of it): how often each is flagged.

Each side is the same ``MODULE:ATTR`` (``bnimpl:BN``) in a directory of its own, as a pull
request's checkout and a worktree of the main branch would be: `ab` gets the baseline's
directory with ``--baseline-path`` and runs in the candidate's; `compare` gets two `bench` runs
made one after the other (each trial's baseline run, then the candidates' runs, then the next
baseline run, which is the identical code's "new" run). Both time the
same cases (a subset of the quick sweep where the BatchNorm work dominates, so that the planted
factors are what they say: they are measured first, without the neighbour, and printed) at one
thread per side. `compare` is judged at its default threshold (25%) and at ab's (10%).

    python suites/ab_error_rates.py [--trials 20] [--output ab-error-rates.json]

Not collected by pytest (no test_ prefix): it takes about 20 minutes at 20 trials, and it must
run when no other heavy process does (check with ``ps aux --sort=-%cpu | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUITES = Path(__file__).resolve().parent
sys.path.insert(0, str(SUITES))

from bnbench import ab  # noqa: E402
from bnbench.benchmark import QUICK, LayerGroup, Sweep  # noqa: E402

# The cases: four of the quick sweep's float32 layers, one per mode, where BatchNorm's own work
# dominates the call (32 and 64 x 64 x 28 x 28).
GROUPS = (
    LayerGroup((32,), (64,), ((28, 28),), modes=("forward_train", "backward")),
    LayerGroup((64,), (64,), ((28, 28),), modes=("forward_eval", "forward_backward")),
)
SUBSET = Sweep("error-rates", GROUPS, budget_s=QUICK.budget_s, warmup_s=QUICK.warmup_s)

MODULES = {
    "identical": "from bnbench.registry import from_classes\n"
    "from torch import nn\n"
    "BN = from_classes('bn', {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, "
    "5: nn.BatchNorm3d})\n",
    "2x": "from ab_planted import slow2x as BN\n",
    "1.3x": "from ab_planted import slow13 as BN\n",
}
SPEC = "bnimpl:BN"


@contextlib.contextmanager
def neighbour():
    """A CPU-bound process beside the measurements (killed, by its pid, at the end)."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def directories(root: Path) -> dict[str, Path]:
    """One directory per version, each holding bnimpl.py."""
    made = {}
    for name, source in dict(MODULES, baseline=MODULES["identical"]).items():
        directory = root / name.replace(".", "_")
        directory.mkdir()
        (directory / "bnimpl.py").write_text(source)
        made[name] = directory
    return made


def calibrate(rows, pairs: int = 80, block_s: float = 0.005) -> dict[str, dict]:
    """The planted factors, measured in this process without the neighbour: per case, both
    workloads' blocks of the same calls alternating in a random order, the median of the
    pairs' ratios."""
    import torch
    from ab_planted import slow2x, slow13

    from bnbench.ab import _Case
    from bnbench.benchmark import make_workload
    from bnbench.registry import resolve

    torch.set_num_threads(1)
    builtin = resolve(["builtin"])[0]
    rng = np.random.default_rng(0)
    found = {}
    for name, impl in (("2x", slow2x), ("1.3x", slow13)):
        ratios = []
        for row in rows:
            cases = {
                "a": _Case(make_workload(builtin, "cpu", row), "cpu"),
                "b": _Case(make_workload(impl, "cpu", row), "cpu"),
            }
            for case in cases.values():
                case.block(5)
            calls = max(1, round(block_s / (cases["a"].block(5) / 5)))
            logs = []
            for _ in range(pairs):
                order = ("a", "b") if rng.random() < 0.5 else ("b", "a")
                times = {side: cases[side].block(calls) for side in order}
                logs.append(math.log(times["b"] / times["a"]))
            ratios.append(math.exp(float(np.median(logs))))
        found[name] = {
            "geomean": float(np.exp(np.mean(np.log(ratios)))),
            "per_case": {
                f"{r.mode} {'x'.join(map(str, r.shape))}": x for r, x in zip(rows, ratios)
            },
        }
    return found


def ab_trial(dirs: dict[str, Path], scenario: str, rows, seed: int) -> dict:
    """One `bnbench ab` over the subset: the baseline from its directory, the candidate from
    the scenario's (the current directory, as a pull request's checkout)."""
    here = os.getcwd()
    os.chdir(dirs[scenario])
    try:
        run = ab.run_ab(
            {"baseline": SPEC, "candidate": SPEC},
            rows,
            threads=1,
            plan=ab.PLANS["quick"],
            verify=False,
            baseline_path=str(dirs["baseline"]),
            seed=seed,
        )
    finally:
        os.chdir(here)
        sys.modules.pop("bnimpl", None)
    summary = ab.summarize(run.cases, ab.DEFAULT_THRESHOLD_PCT)
    result = ab.ABResult(
        SPEC, SPEC, str(dirs["baseline"]), "cpu", 1, "error-rates", ab.DEFAULT_THRESHOLD_PCT,
        False, seed, ab.PLANS["quick"], run.cases, run.files, run.seconds,
    )  # fmt: skip
    return {
        "flagged": not result.ok,
        "verdict": summary.verdict,
        "ratio": summary.ratio,
        "ci": [summary.ci_low, summary.ci_high],
        "case_verdicts": summary.counts,
        "problems": [f"{c.status}: {c.message}" for c in run.cases if c.status != "ok"],
        "seconds": run.seconds,
    }


def bench_run(directory: Path, output: Path) -> Path:
    """One `bnbench bench` of the subset, from ``directory`` (its bnimpl), one thread."""
    from bnbench.benchmark import run_sweep
    from bnbench.registry import resolve_isolated

    here = os.getcwd()
    os.chdir(directory)
    try:
        impls = resolve_isolated([SPEC])
        run_sweep(impls, [SPEC], ["cpu"], SUBSET, output, threads=1, verify=False)
    finally:
        os.chdir(here)
        sys.modules.pop("bnimpl", None)
    return output


def compare_trial(baseline: Path, new: Path) -> dict:
    from bnbench.regression import compare, compare_implementations

    found = {}
    for threshold in (25.0, ab.DEFAULT_THRESHOLD_PCT):
        result = compare(baseline, new, threshold)
        summary = compare_implementations(result.cases, threshold)
        row = summary.iloc[0]
        flagged = bool((summary.verdict == "regression").any() or len(result.lost))
        found[f"{threshold:g}"] = {
            "flagged": flagged,
            "verdict": str(row.verdict),
            "ratio": float(row.geomean_ratio),
            "ci": [float(row.ci_low), float(row.ci_high)],
        }
    return found


def rate(trials: list[dict], key=lambda t: t["flagged"]) -> tuple[int, int]:
    return sum(bool(key(t)) for t in trials), len(trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--output", default="ab-error-rates.json")
    parser.add_argument("--skip-compare", action="store_true")
    args = parser.parse_args()
    rows = SUBSET.rows()
    began = time.time()
    root = Path(tempfile.mkdtemp(prefix="bnbench-error-rates-"))
    figures: dict = {"cases": [f"{r.mode} {'x'.join(map(str, r.shape))}" for r in rows]}
    try:
        dirs = directories(root)
        print(f"calibrating the planted slowdowns on {len(rows)} cases (no neighbour)...")
        figures["planted"] = calibrate(rows)
        for name, found in figures["planted"].items():
            spread = ", ".join(f"{v:.2f}" for v in found["per_case"].values())
            print(f"  planted {name}: measured {found['geomean']:.2f}x ({spread})", flush=True)
        with neighbour() as busy:
            figures["neighbour_pid"] = busy.pid
            ab_trials: dict[str, list[dict]] = {s: [] for s in MODULES}
            for trial in range(args.trials):
                for scenario in MODULES:
                    found = ab_trial(dirs, scenario, rows, seed=1000 * trial + len(scenario))
                    ab_trials[scenario].append(found)
                    print(
                        f"ab {scenario:9s} trial {trial + 1:2d}: {found['ratio']:.3f} "
                        f"[{found['ci'][0]:.3f}, {found['ci'][1]:.3f}] {found['verdict']}"
                        f"{' FLAGGED' if found['flagged'] else ''} ({found['seconds']:.0f} s)"
                        + (f" {found['problems']}" if found["problems"] else ""),
                        flush=True,
                    )
            figures["ab"] = ab_trials
            if not args.skip_compare:
                # trial i: baseline run b_i, then the candidates' runs; identical code is
                # b_i against b_(i+1), the next baseline run (the same code, later)
                compare_trials: dict[str, list[dict]] = {s: [] for s in MODULES}
                runs = root / "runs"
                previous = bench_run(dirs["baseline"], runs / "baseline-0")
                for trial in range(args.trials):
                    found = {}
                    for scenario in ("2x", "1.3x"):
                        new = bench_run(dirs[scenario], runs / f"{scenario}-{trial}")
                        found[scenario] = compare_trial(previous, new)
                    following = bench_run(dirs["baseline"], runs / f"baseline-{trial + 1}")
                    found["identical"] = compare_trial(previous, following)
                    shutil.rmtree(previous, ignore_errors=True)
                    previous = following
                    for scenario in MODULES:
                        compare_trials[scenario].append(found[scenario])
                        print(
                            f"compare {scenario:9s} trial {trial + 1:2d}: "
                            + "; ".join(
                                f"threshold {t}%: {f['ratio']:.3f} [{f['ci'][0]:.3f}, "
                                f"{f['ci'][1]:.3f}] {f['verdict']}"
                                for t, f in found[scenario].items()
                            ),
                            flush=True,
                        )
                figures["compare"] = compare_trials
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures["minutes"] = (time.time() - began) / 60
    targets = {"identical": ("<=", 0.05), "2x": (">=", 0.95), "1.3x": (">=", 0.80)}
    lines = [f"\nflagged (slower), {args.trials} trials each, a CPU-bound neighbour running:"]
    for scenario, (sense, target) in targets.items():
        n, total = rate(figures["ab"][scenario])
        ok = n / total <= target if sense == "<=" else n / total >= target
        line = (
            f"  {scenario:9s} ab (threshold {ab.DEFAULT_THRESHOLD_PCT:g}%): {n}/{total} = "
            f"{n / total:.0%} (target {sense} {target:.0%}: {'met' if ok else 'NOT MET'})"
        )
        if "compare" in figures:
            for threshold in ("25", f"{ab.DEFAULT_THRESHOLD_PCT:g}"):
                m, _ = rate(figures["compare"][scenario], lambda t, k=threshold: t[k]["flagged"])
                line += f"; compare (threshold {threshold}%): {m}/{total} = {m / total:.0%}"
        lines.append(line)
    for scenario in MODULES:
        ratios = [t["ratio"] for t in figures["ab"][scenario] if t["ratio"]]
        widths = [t["ci"][1] / t["ci"][0] for t in figures["ab"][scenario] if t["ci"][0]]
        text = (
            f"  {scenario:9s} ab geometric means {min(ratios):.3f}-{max(ratios):.3f}, "
            f"interval width (high/low) median {np.median(widths):.3f}"
        )
        if "compare" in figures:
            c = [t["25"]["ratio"] for t in figures["compare"][scenario]]
            cw = [t["25"]["ci"][1] / t["25"]["ci"][0] for t in figures["compare"][scenario]]
            text += f"; compare {min(c):.3f}-{max(c):.3f}, width median {np.median(cw):.3f}"
        lines.append(text)
    seconds = [t["seconds"] for trials in figures["ab"].values() for t in trials]
    lines.append(
        f"  one ab trial ({len(rows)} cases) took {np.median(seconds):.0f} s (median); the "
        f"script {figures['minutes']:.1f} min"
    )
    print("\n".join(lines))
    figures["summary"] = lines
    Path(args.output).write_text(json.dumps(figures, indent=1, default=str))
    print(f"figures: {args.output}")


if __name__ == "__main__":
    main()
