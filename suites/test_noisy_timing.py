"""Measurements that know when they are wrong: the timer's disturbed blocks, the floor checks,
flagged rows kept out of the headline figures (bench summary, report, compare), and results
written before flags existed.

Nothing here asserts on a real timing: the blocks, floors and rows are synthetic, and the one
real measurement sleeps (a sleeping block uses no CPU, whatever the machine is doing)."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from bnbench import benchmark, regression, report, runs, timing
from bnbench.results import COLUMNS, Flag, join_flags, split_flags, to_csv
from bnbench.timing import Block, Samples

# ---------------------------------------------------------------------------------------------
# The disturbed-block rule


def quiet(ms: float = 1.0, calls: int = 10) -> Block:
    """A block of the kind a quiet machine gives: the process on the CPU throughout."""
    return Block(wall_s=ms / 1e3, cpu_s=ms / 1e3 * 1.0, involuntary=0, calls=calls)


def test_quiet_blocks_are_never_disturbed():
    # what the quiet machine measured: CPU / wall 0.93-1.16, now and then a preemption
    blocks = [
        quiet(),
        Block(1.1e-3, 1.1e-3 * 0.93, 1, 10),  # preempted briefly, barely slower
        Block(1.9e-3, 1.9e-3 * 0.95, 1, 10),  # preempted, under 2x the fastest
        Block(1.0e-3, 1.16e-3, 0, 10),  # a worker's time counted at a tick
        Block(5e-3, 5e-3, 0, 10),  # slow, but on the CPU and never preempted
    ]
    assert timing.classify(blocks) == [False] * len(blocks)


def test_blocks_that_lost_the_cpu_are_disturbed():
    fastest = quiet().per_call
    # off the CPU for most of an 8 ms slice (one thread: 0.01-0.4 measured)
    assert timing.disturbed(Block(8e-3, 1e-3, 1, 10), fastest)
    # the threshold: under 0.8 of the wall time on the CPU
    assert timing.disturbed(Block(1e-3, 0.79e-3, 0, 10), fastest)
    assert not timing.disturbed(Block(1e-3, 0.81e-3, 0, 10), fastest)
    # two threads: the main thread spins (on the CPU) while the preempted worker waits
    assert timing.disturbed(Block(8e-3, 8e-3, 2, 10), fastest)
    # as slow, but nothing was preempted: the work itself varied
    assert not timing.disturbed(Block(8e-3, 8e-3, 0, 10), fastest)
    # per call, not per block: 2 calls of 0.15 ms each are not slower than 10 of 0.1 ms
    assert not timing.disturbed(Block(0.3e-3, 0.3e-3, 1, 2), fastest)


def samples_of(blocks: list[Block]) -> Samples:
    samples = Samples(classified=True, blocks=list(blocks))
    samples.seconds = [b.per_call for b in blocks]
    return samples


def test_enough_undisturbed_blocks_become_the_samples():
    blocks = [quiet()] * 8 + [Block(9e-3, 2e-3, 3, 10)] * 4
    samples = samples_of(blocks)
    samples.settle(min_samples=7, drop=True)
    assert samples.seconds == [quiet().per_call] * 8
    assert samples.dropped == [9e-4] * 4
    assert samples.disturbed_blocks == 4 and not samples.disturbed
    assert samples.median == pytest.approx(1e-4)


def test_too_few_undisturbed_blocks_keep_every_block_and_mark_the_row():
    blocks = [quiet()] * 3 + [Block(9e-3, 2e-3, 3, 10)] * 9
    samples = samples_of(blocks)
    samples.settle(min_samples=7, drop=True)
    assert len(samples.seconds) == 12 and samples.dropped == []
    assert samples.disturbed and samples.disturbed_blocks == 9


def test_without_dropping_the_samples_stay_as_timed_but_are_judged():
    blocks = [quiet()] * 3 + [Block(9e-3, 2e-3, 3, 10)] * 9
    samples = samples_of(blocks)
    samples.settle(min_samples=7, drop=False)
    assert len(samples.seconds) == 12 and samples.disturbed and samples.disturbed_blocks == 9


def test_a_row_stuck_at_the_step_in_every_block_is_disturbed():
    """8 ms a call in every block, the main thread spinning (CPU / wall 1.0) while the worker
    waits on a run queue: no block is slower than another, the waiting gives it away."""
    stuck = [Block(8e-3, 8e-3, 1, 1, waiting_s=8.4e-3)] * 9
    samples = samples_of(stuck)
    samples.settle(min_samples=7, drop=True)
    assert samples.disturbed_blocks == 0 and samples.disturbed
    assert samples.waiting_per_wall == pytest.approx(1.05)
    # a quiet row's threads wait a little now and then
    samples = samples_of([quiet()] * 8 + [Block(1e-3, 1e-3, 1, 10, waiting_s=0.6e-3)])
    samples.settle(min_samples=7, drop=True)
    assert not samples.disturbed and samples.waiting_per_wall < 0.1


def test_unclassified_blocks_cuda_are_left_alone():
    samples = samples_of([Block(9e-3, 1e-6, 3, 10)] * 9)
    samples.classified = False
    samples.settle(min_samples=7, drop=True)
    assert samples.disturbed_blocks == 0 and not samples.disturbed and len(samples.seconds) == 9


def test_cpu_per_wall_sums_over_blocks():
    samples = samples_of([Block(1e-3, 1e-3, 0, 1), Block(3e-3, 1e-3, 0, 1)])
    assert samples.cpu_per_wall == pytest.approx(0.5)
    assert Samples().cpu_per_wall != Samples().cpu_per_wall  # NaN without blocks


def test_measure_drops_sleeping_blocks():
    """A real measurement: every third call sleeps 2 ms (no CPU used), the others spin. The
    sleeping blocks are disturbed whatever the machine does; whether the spinning ones are
    depends on the machine, so only what holds either way is asserted."""

    def step(i: int) -> None:
        if i % 3 == 0:
            time.sleep(2e-3)
        else:
            end = time.perf_counter() + 2e-4
            while time.perf_counter() < end:
                pass

    samples = timing.measure(
        step,
        "cpu",
        prepare=lambda i: None,  # one call per block: block k is call warmup_calls + k
        budget_s=0.05,
        warmup_s=0.0,
        min_samples=5,
        drop_disturbed=True,
    )
    flags = timing.classify(samples.blocks)
    sleeping = [(samples.warmup_calls + k) % 3 == 0 for k in range(len(samples.blocks))]
    assert all(flag for flag, slept in zip(flags, sleeping) if slept)
    assert samples.disturbed_blocks >= sum(sleeping) > 0
    assert samples.load.cpus >= 1
    if not samples.disturbed:
        kept = [b.per_call for b, flag in zip(samples.blocks, flags) if not flag]
        assert samples.seconds == kept and len(samples.dropped) == samples.disturbed_blocks
    else:
        assert len(samples.seconds) == len(samples.blocks)


def test_measure_without_dropping_keeps_its_sample_count():
    """Callers timing in lockstep (ranks) ask for exactly n samples: they still get n."""
    samples = timing.measure(
        lambda i: time.sleep(1e-4),
        "cpu",
        prepare=lambda i: None,
        warmup_s=0.0,
        min_samples=6,
        max_samples=6,
    )
    assert len(samples.seconds) == 6 == len(samples.blocks)
    assert samples.disturbed_blocks == 6 and samples.disturbed  # asleep: off the CPU


# ---------------------------------------------------------------------------------------------
# Floors


def floor(nbytes: int, copy_s: float, clone_s: float | None = None, disturbed=False) -> dict:
    return {
        "copy_gbps": 2 * nbytes / copy_s / 1e9,
        "copy_s": copy_s,
        "clone_s": copy_s if clone_s is None else clone_s,
        "bytes": nbytes,
        "disturbed": disturbed,
        "flags": [],
    }


def keyed(*floors: dict, device="cpu", dtype="float32") -> dict[tuple, dict]:
    return {(device, dtype, (f["bytes"] // 4,)): f for f in floors}


# quiet 2-thread copies measured here: 200 KB 4.2 us ... 25 MB 1.06 ms
GOOD = [floor(200_000, 4.2e-6), floor(1_000_000, 24e-6), floor(5_000_000, 159e-6),
        floor(25_000_000, 1.06e-3)]  # fmt: skip


def test_good_floors_have_no_flags():
    assert all(not found for found in benchmark.check_floors(keyed(*GOOD)).values())


def test_the_issue_floors_are_flagged():
    """About 8 ms for every tensor from 200 KB to 25 MB (the issue), with one right floor."""
    floors = keyed(
        floor(200_000, 8e-3), floor(1_000_000, 8e-3), floor(5_000_000, 8e-3),
        floor(25_000_000, 1.06e-3),
    )  # fmt: skip
    flags = benchmark.check_floors(floors)
    by_size = {key[2][0] * 4: found for key, found in flags.items()}
    for size in (200_000, 1_000_000, 5_000_000):
        assert Flag.FLOOR_NOT_MONOTONE in by_size[size], by_size
    # 0.05 and 0.25 GB/s are no memory's bandwidth; 5 MB in 8 ms (1.25 GB/s) might be
    assert Flag.FLOOR_IMPLAUSIBLE in by_size[200_000]
    assert Flag.FLOOR_IMPLAUSIBLE in by_size[1_000_000]
    assert Flag.FLOOR_IMPLAUSIBLE not in by_size[5_000_000]
    assert by_size[25_000_000] == []  # the right one is not blamed


def test_a_clone_floor_alone_can_be_out_of_order():
    floors = keyed(floor(1_000_000, 24e-6, clone_s=6e-3), floor(5_000_000, 159e-6))
    flags = benchmark.check_floors(floors)
    assert flags[("cpu", "float32", (250_000,))] == [
        Flag.FLOOR_NOT_MONOTONE,
        Flag.FLOOR_IMPLAUSIBLE,
    ]


def test_floors_within_the_margin_and_of_other_dtypes_are_not_compared():
    # a larger tensor 30% faster (noise between two near sizes): within the margin
    near = keyed(floor(1_000_000, 30e-6), floor(1_100_000, 21e-6))
    assert all(not f for f in benchmark.check_floors(near).values())
    # a bfloat16 floor is not compared with a float32 one
    mixed = keyed(floor(1_000_000, 1e-3)) | keyed(floor(2_000_000, 1e-5), dtype="bfloat16")
    assert all(not f for f in benchmark.check_floors(mixed).values())


def test_a_floor_faster_than_any_memory_is_implausible():
    flags = benchmark.check_floors(keyed(floor(25_000_000, 1e-6)))  # 50 TB/s
    assert list(flags.values()) == [[Flag.FLOOR_IMPLAUSIBLE]]


def test_a_disturbed_floor_is_flagged():
    flags = benchmark.check_floors(keyed(floor(1_000_000, 24e-6, disturbed=True)))
    assert list(flags.values()) == [[Flag.FLOOR_DISTURBED]]


def test_suspect_floors_are_measured_again():
    attempts: dict[tuple, int] = {}

    def measure(device, dtype, shape, budget_s):
        attempts[shape] = attempts.get(shape, 0) + 1
        nbytes = shape[0] * 4
        if nbytes == 200_000 and attempts[shape] == 1:
            return floor(nbytes, 8e-3)  # disturbed the first time only
        if nbytes == 1_000_000:
            return floor(nbytes, 8e-3)  # always
        return floor(nbytes, {200_000: 4.2e-6, 5_000_000: 159e-6}[nbytes])

    keys = [("float32", (n // 4,)) for n in (200_000, 1_000_000, 5_000_000)]
    floors = benchmark.measure_floors("cpu", keys, 0.1, measure)
    assert attempts == {(50_000,): 2, (250_000,): 1 + benchmark.FLOOR_RETRIES, (1_250_000,): 1}
    assert floors[("cpu", "float32", (50_000,))]["flags"] == []
    assert Flag.FLOOR_NOT_MONOTONE in floors[("cpu", "float32", (250_000,))]["flags"]


# ---------------------------------------------------------------------------------------------
# Rows


def base(impl="builtin", shape=(8, 64, 28, 28), mode="forward_eval") -> dict:
    return benchmark.base_columns(impl, "cpu", benchmark.Row(shape, "float32", "contiguous", mode))


def result(median: float, disturbed=False) -> dict:
    return {
        "status": "ok",
        "verified": "pass",
        "median_s": median,
        "p20_s": median,
        "p80_s": median,
        "repetitions": 9,
        "disturbed": disturbed,
        "disturbed_blocks": 5 if disturbed else 0,
        "cpu_per_wall": 0.4 if disturbed else 1.0,
        "load": 3.2,
    }


def test_rows_take_flags_from_the_timer_the_floor_and_the_ratio():
    b = base()
    good = floor(b["bytes"] // 2, 100e-6)  # a copy of the input: 100 us
    assert benchmark.finish_row(b, result(300e-6), good, 2)["flags"] == ""
    # a row timed at under 0.8x its floor: the builtin at 4-8x its floor in the issue
    fast = benchmark.finish_row(b, result(20e-6), good, 2)
    assert fast["flags"] == Flag.FASTER_THAN_FLOOR and fast["ratio_to_floor"] == pytest.approx(0.2)
    # a cache effect (between 0.8x and 1/1.05x) is not a flag
    cached = benchmark.finish_row(b, result(90e-6), good, 2)
    assert cached["flags"] == "" and cached["cache_effect"]
    disturbed = benchmark.finish_row(b, result(300e-6, disturbed=True), good, 2)
    assert disturbed["flags"] == Flag.DISTURBED and disturbed["disturbed_blocks"] == 5
    wrong = dict(good, flags=[Flag.FLOOR_NOT_MONOTONE])
    row = benchmark.finish_row(b, result(20e-6, disturbed=True), wrong, 2)
    assert split_flags(row["flags"]) == [
        Flag.DISTURBED,
        Flag.FASTER_THAN_FLOOR,
        Flag.FLOOR_NOT_MONOTONE,
    ]
    # the floor measured again, right this time: only the row's own flag stays
    benchmark.apply_floor(row, floor(b["bytes"] // 2, 10e-6))
    assert row["flags"] == Flag.DISTURBED and row["ratio_to_floor"] == pytest.approx(2.0)
    assert list(row) == COLUMNS


def test_a_row_faster_than_its_floor_has_the_floor_measured_again(tmp_path):
    """After the worker is done, the suspect floor is measured again and given to every row
    written with it; a row still faster than the new floor stays flagged."""
    b = base()
    nbytes = b["bytes"] // 2
    key = ("cpu", "float32", (8, 64, 28, 28))
    floors = {key: floor(nbytes, 8e-3)}  # the issue's 8 ms floor
    writer = benchmark.ResultsWriter(tmp_path, {"schema": "bnbench.bench/1"})
    for impl, median in (("builtin", 300e-6), ("identity", 1e-6)):
        row = benchmark.finish_row(base(impl), result(median), floors[key], 2)
        assert benchmark.faster_than_floor(row, floors[key])
        writer.add(row, [median])
    benchmark.remeasure_floors(
        floors, [key], 0.1, writer, lambda device, dtype, shape, budget_s: floor(nbytes, 100e-6)
    )
    assert floors[key]["copy_s"] == 100e-6
    builtin, identity = writer.rows
    assert builtin["flags"] == "" and builtin["ratio_to_floor"] == pytest.approx(3.0)
    assert identity["flags"] == Flag.FASTER_THAN_FLOOR
    assert "faster-than-floor" in (tmp_path / "results.csv").read_text()


def test_a_row_that_did_not_measure_has_no_flags():
    row = benchmark.finish_row(base(), {"status": "error", "disturbed": True}, None, 2)
    assert row["flags"] == ""


def test_worker_results_carry_the_timer_report():
    data, _ = benchmark.validate_result(result(1e-3, disturbed=True) | {"samples": [1e-3]})
    assert data["disturbed"] and data["disturbed_blocks"] == 5 and data["load"] == 3.2
    for bad in ({"disturbed_blocks": -1}, {"cpu_per_wall": float("nan")}, {"load": -1.0}):
        with pytest.raises(ValueError):
            benchmark.validate_result(result(1e-3) | bad)


def summary_row(impl: str, median: float, flags=(), shape="8x64") -> dict:
    return {
        "implementation": impl, "device": "cpu", "dtype": "float32", "mode": "forward_eval",
        "shape": shape, "memory_format": "contiguous", "model": "", "status": "ok",
        "median_s": median, "ratio_to_floor": 2.0, "verified": "pass",
        "flags": join_flags(flags),
    }  # fmt: skip


def test_bench_summary_leaves_flagged_rows_out_and_says_how_many():
    rows = [
        summary_row("builtin", 1e-3),
        summary_row("builtin", 1e-3, shape="16x64"),
        summary_row("fast", 0.5e-3),
        # the impossible ratio of the issue: 8 ms against 0.03 ms
        summary_row("fast", 8e-3, [Flag.DISTURBED], shape="16x64"),
        summary_row("broken", 1e-6, [Flag.FASTER_THAN_FLOOR, Flag.FLOOR_NOT_MONOTONE]),
    ]
    lines = benchmark.summary_lines(rows)
    assert lines[0].startswith("WARNING: 2 measured rows are flagged")
    assert "disturbed: 1" in lines[0] and "faster-than-floor: 1" in lines[0]
    assert any(
        line.startswith("fast@cpu: 1 rows")
        and "0.50x" in line
        and "1 flagged rows left out" in line
        for line in lines
    ), lines
    assert "broken@cpu: all 1 measured rows flagged: no figure is given" in lines


# ---------------------------------------------------------------------------------------------
# Stored runs: the report, compare, and results written before flags


OLD_COLUMNS = [c for c in COLUMNS if c not in ("flags", "disturbed_blocks", "cpu_per_wall", "load")]


def stored_rows(flagged_new: bool) -> list[dict]:
    rows = []
    for impl, base_s in (("builtin", 1e-3), ("vectorized", 2e-3)):
        for batch in (1, 8, 32):
            median = base_s * batch
            flags = ""
            if flagged_new and impl == "vectorized" and batch == 1:
                # 20x faster than before: flagged (not over 1000x: that is implausible)
                median, flags = median / 20, "faster-than-floor;floor-not-monotone"
            rows.append(
                {
                    "implementation": impl,
                    "device": "cpu",
                    "dtype": "float32",
                    "mode": "forward_eval",
                    "batch_size": batch,
                    "channels": 64,
                    "spatial": "28x28",
                    "rank": 4,
                    "shape": f"{batch}x64x28x28",
                    "memory_format": "contiguous",
                    "status": "ok",
                    "verified": "pass",
                    "flags": flags,
                    "median_s": median,
                    "p20_s": median * 0.99,
                    "p80_s": median * 1.01,
                    "repetitions": 9,
                    "ratio_to_floor": 3.0,
                    "disturbed_blocks": 4 if flags else 0,
                    "cpu_per_wall": 0.5 if flags else 1.0,
                    "load": 3.5 if flags else 0.2,
                }  # fmt: skip
            )
    return rows


def write_run(directory, rows, columns=COLUMNS):
    directory.mkdir(parents=True)
    (directory / "results.csv").write_text(to_csv(rows, columns))
    (directory / "environment.json").write_text(
        json.dumps({"schema": "bnbench.bench/1", "complete": True, "threads": 2})
    )
    return directory


def test_old_results_without_flags_load_unflagged(tmp_path):
    old = write_run(tmp_path / "old", stored_rows(False), OLD_COLUMNS)
    assert "flags" not in (old / "results.csv").read_text().splitlines()[0]
    loaded = runs.load(old)
    assert list(loaded.rows["flags"]) == [""] * 6
    assert not report.flagged(loaded.rows).any()
    # and compare an old run with a new one
    new = write_run(tmp_path / "new", stored_rows(True))
    cases = regression.compare(old, new, 5.0, resamples=50).cases
    assert list(cases.loc[cases["verdict"] == "flagged", "flags"]) == [
        "NEW:faster-than-floor;NEW:floor-not-monotone"
    ]


def test_a_flags_cell_that_is_not_flags_is_refused(tmp_path):
    rows = stored_rows(False)
    rows[2]["flags"] = "<script>"
    directory = write_run(tmp_path / "bad", rows)
    with pytest.raises(runs.ReportInputError, match=r"row 3 .*flags"):
        runs.load(directory)


def test_report_tables_keep_flagged_rows_out_and_warn_first(tmp_path):
    loaded = runs.load(write_run(tmp_path / "run", stored_rows(True)))
    frame = runs.combine([loaded])
    fastest = report.fastest_table(frame)
    # without the flag, vectorized's 0.1 ms would be the fastest at batch 1
    assert list(fastest["fastest"]) == ["builtin"] * 3
    speed = report.speedup_table(frame).set_index("implementation")
    assert speed.loc["vectorized", "rows"] == 2
    assert speed.loc["vectorized", "time_vs_builtin"] == pytest.approx(2.0)
    table = report.flagged_table(frame)
    assert len(table) == 1 and table["flags"][0] == "faster-than-floor;floor-not-monotone"
    warnings = report.warnings_list(frame, [loaded], report.verify_items([loaded]), [])
    assert warnings[0].startswith("1 measured rows FLAGGED as unreliable")
    assert (
        "faster-than-floor: 1" in warnings[0]
        and "vectorized@cpu forward_eval 1x64x28x28" in (warnings[0])
    )
    assert "load average reached 3.50" in warnings[0]
    summaries, _ = report.device_summaries(frame, [loaded], report.verify_items([loaded]))
    shown = summaries[0].table.set_index("implementation")
    assert shown.loc["vectorized", "flagged (left out)"] == 1


def test_report_page_says_so_at_the_top(tmp_path):
    directory = write_run(tmp_path / "run", stored_rows(True))
    report.write_report([str(directory)], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    top = md.split("## Summary")[0]
    assert "WARNING: 1 measured rows are flagged as unreliable" in top
    warnings = md.split("## Warnings")[1].split("\n## ")[0]
    assert warnings.strip().splitlines()[0].startswith("- 1 measured rows FLAGGED")
    assert "## Rows flagged as unreliable measurements" in md
    flagged_csv = pd.read_csv(tmp_path / "out" / "flagged.csv")
    assert list(flagged_csv["implementation"]) == ["vectorized"]
    fastest = pd.read_csv(tmp_path / "out" / "fastest.csv")
    assert "vectorized" not in set(fastest["fastest"])


def test_compare_lists_flagged_cases_out_of_the_verdict(tmp_path):
    before = write_run(tmp_path / "before", stored_rows(False))
    after = write_run(tmp_path / "after", stored_rows(True))
    cases = regression.compare(before, after, 5.0, resamples=50).cases
    flagged_cases = cases[cases["verdict"] == "flagged"]
    assert len(flagged_cases) == 1 and flagged_cases["implementation"].iloc[0] == "vectorized"
    summary = regression.compare_implementations(cases, 5.0, resamples=50)
    vectorized = summary.set_index("implementation").loc["vectorized"]
    # the flagged 20x-faster case is left out: the other two did not change
    assert vectorized["cases"] == 2 and vectorized["geomean_ratio"] == pytest.approx(1.0)
    assert set(summary["verdict"]) == {"same"}
