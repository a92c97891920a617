"""How long ``bnbench compare`` and ``bnbench report`` take on large runs.

    python suites/bench_scale.py                 # 200,000 rows, 10 samples a row
    python suites/bench_scale.py --rows 20000

Generates two synthetic bench directories (BASELINE, and NEW with one implementation 1.5x
slower) in a temporary directory, runs both commands in this process through the CLI and prints
the seconds each took. Not a test: speed depends on the machine; the figures are for reading
(the target on this project's 2-core machine: under 30 s each at 200,000 rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bnbench.results import COLUMNS, SAMPLE_COLUMNS

MODES = ["forward_train", "forward_eval", "backward", "forward_backward"]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]


def make_run(directory: Path, rows: int, samples: int, seed: int, slower: str = "") -> None:
    """A bench directory of about ``rows`` rows: 10 implementations x 4 modes x shapes."""
    rng = np.random.default_rng(seed)
    impls = ["builtin"] + [f"impl{i}" for i in range(9)]
    shapes_needed = -(-rows // (len(impls) * len(MODES)))
    families = -(-shapes_needed // len(BATCHES))
    channels = 16 + np.arange(families) % 97
    spatial = 4 + (np.arange(families) // 97)
    batch = np.tile(BATCHES, families)[:shapes_needed]
    family = np.repeat(np.arange(families), len(BATCHES))[:shapes_needed]
    shape = pd.DataFrame(
        {
            "batch_size": batch,
            "channels": channels[family],
            "spatial": [f"{s}x{s}" for s in spatial[family]],
        }
    )
    shape["shape"] = (
        shape["batch_size"].astype(str)
        + "x"
        + shape["channels"].astype(str)
        + "x"
        + shape["spatial"]
    )
    grid = pd.MultiIndex.from_product(
        [impls, MODES, range(len(shape))], names=["implementation", "mode", "s"]
    ).to_frame(index=False)
    grid = grid.head(rows)
    frame = grid.join(shape, on="s").drop(columns="s")
    n = len(frame)
    speed = frame["implementation"].map({name: 1 + 0.1 * i for i, name in enumerate(impls)})
    work = frame["batch_size"] * frame["channels"] * 1e-7
    median = (work * speed + 2e-5) * np.exp(rng.normal(0, 0.05, n))
    if slower:
        median = median.where(frame["implementation"] != slower, median * 1.5)
    draws = median.to_numpy()[:, None] * np.exp(rng.normal(0, 0.03, (n, samples)))
    frame = frame.assign(
        device="cpu",
        dtype="float32",
        rank=4,
        memory_format="contiguous",
        status="ok",
        verified="pass",
        median_s=np.median(draws, axis=1),
        p20_s=np.quantile(draws, 0.2, axis=1),
        p80_s=np.quantile(draws, 0.8, axis=1),
        repetitions=samples,
        threads=2,
        ratio_to_floor=3.0,
        model="",
        message="",
    )
    directory.mkdir(parents=True, exist_ok=True)
    frame.reindex(columns=COLUMNS).to_csv(
        directory / "results.csv", index=False, float_format="%.6g"
    )
    sample_frame = pd.DataFrame(
        {
            "row": np.repeat(np.arange(n), samples),
            "implementation": np.repeat(frame["implementation"].to_numpy(), samples),
            "device": "cpu",
            "mode": np.repeat(frame["mode"].to_numpy(), samples),
            "shape": np.repeat(frame["shape"].to_numpy(), samples),
            "dtype": "float32",
            "sample": np.tile(np.arange(samples), n),
            "seconds": draws.ravel(),
        }
    )
    sample_frame[SAMPLE_COLUMNS].to_csv(directory / "samples.csv", index=False, float_format="%.6g")
    (directory / "environment.json").write_text(
        json.dumps({"schema": "bnbench.bench/1", "host": "scale", "complete": True, "rows": n})
    )


def timed(*args: str) -> tuple[float, int, str]:
    from click.testing import CliRunner

    from bnbench.cli import main

    start = time.perf_counter()
    result = CliRunner().invoke(main, list(args))
    seconds = time.perf_counter() - start
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return seconds, result.exit_code, result.stdout + result.stderr


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--keep", type=Path, default=None, help="Generate into this directory.")
    options = parser.parse_args(argv)
    import bnbench.cli  # noqa: F401  (import time is not what is measured)
    import bnbench.regression  # noqa: F401
    import bnbench.report  # noqa: F401

    with tempfile.TemporaryDirectory() as scratch:
        root = options.keep or Path(scratch)
        start = time.perf_counter()
        make_run(root / "baseline", options.rows, options.samples, seed=1)
        make_run(root / "new", options.rows, options.samples, seed=2, slower="impl3")
        print(f"generated 2 x {options.rows} rows in {time.perf_counter() - start:.1f} s")
        compare_s, code, text = timed("compare", str(root / "baseline"), str(root / "new"))
        if code != 1 or "REGRESSION" not in text:  # impl3 is 1.5x slower
            raise SystemExit(f"compare did not flag the slowdown (exit {code}):\n{text}")
        methods = re.search(r"95% intervals \(([^)]*)\)", text)
        print(
            f"compare: {compare_s:.1f} s for {options.rows} rows (exit {code}; intervals: "
            f"{methods.group(1) if methods else '?'})"
        )
        report_s, code, text = timed("report", str(root / "new"), "--output", str(root / "report"))
        if code != 0:
            raise SystemExit(f"report failed (exit {code}):\n{text}")
        print(f"report: {report_s:.1f} s for {options.rows} rows")
        return {"compare_s": compare_s, "report_s": report_s}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
