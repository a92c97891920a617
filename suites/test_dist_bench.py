"""bench --world-size: synchronized BatchNorm timed across rank processes (gloo on CPU), next to
local BatchNorm on the same shard, with the share of time spent in collectives. A real run of
world sizes 1 and 2 over the smoke sweep (one small shape, three modes, a tiny budget); a rank
that raises costs its row, not the run; what a rank sends is validated; the report shows the
section, escaped."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import textwrap

import pytest
import torch

import bnbench
from bnbench.dist_bench import DIST_RESULTS, merge_ranks
from bnbench.distributed import RankReport

from helpers import bnbench as cli

pytestmark = pytest.mark.timeout(300)

# What dist_results.csv promises its readers.
EXPECTED_COLUMNS = {
    "implementation",
    "device",
    "world_size",
    "mode",
    "shape",
    "batch_per_rank",
    "global_batch",
    "status",
    "median_s",
    "p20_s",
    "p80_s",
    "local_median_s",
    "ratio_to_local",
    "comm_share",
    "collectives_per_call",
    "message",
}
# bnbench's sync BatchNorm: one all_gather in the forward, one all_reduce in the backward
COLLECTIVES = {"forward_train": 1, "backward": 1, "forward_backward": 2}


def _rows(directory) -> list[dict]:
    with open(directory / DIST_RESULTS, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``bnbench bench --world-size 1 --world-size 2 --smoke`` for sync."""
    out = tmp_path_factory.mktemp("dist") / "out"
    result = cli(
        "bench", "--world-size", "1", "--world-size", "2", "--smoke", "--impl", "sync",
        "--output", str(out), "--timeout", "60",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_rows_columns_and_communication_share(smoke):
    out, _ = smoke
    rows = _rows(out)
    assert EXPECTED_COLUMNS <= set(rows[0])
    sync = [r for r in rows if r["implementation"] == "sync"]
    assert {(int(r["world_size"]), r["mode"]) for r in sync} == {
        (w, m) for w in (1, 2) for m in COLLECTIVES
    }
    for r in sync:
        assert r["status"] == "ok", r
        ws, median, local = int(r["world_size"]), float(r["median_s"]), float(r["local_median_s"])
        assert 0 < float(r["p20_s"]) <= median <= float(r["p80_s"]) < 1, r
        assert 0 < local < 1
        assert math.isclose(float(r["ratio_to_local"]), median / local, rel_tol=1e-3)
        assert int(r["global_batch"]) == int(r["batch_per_rank"]) * ws
        if ws == 1:  # one rank: local BatchNorm, no communication
            assert float(r["comm_share"]) == 0 and float(r["collectives_per_call"]) == 0
        else:
            assert 0 < float(r["comm_share"]) <= 1, r
            assert float(r["collectives_per_call"]) == COLLECTIVES[r["mode"]], r
    env = json.loads((out / "environment.json").read_text())
    assert env["complete"] and env["world_sizes"] == [1, 2]
    digest = hashlib.sha256((out / DIST_RESULTS).read_bytes()).hexdigest()
    assert env["files"][DIST_RESULTS]["sha256"] == digest


def test_a_non_synchronized_implementation_is_a_usage_error(tmp_path):
    """A plain BatchNorm named with --world-size would time nothing: exit 2 saying why."""
    result = cli(
        "bench", "--world-size", "2", "--smoke", "--impl", "builtin",
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a synchronized BatchNorm" in result.stderr
    assert not (tmp_path / "out" / DIST_RESULTS).exists()


def test_the_table_shows_each_world_size_against_one_rank_and_local(smoke):
    out, stdout = smoke
    for header in ("ranks", "vs 1 rank", "vs local BN", "comm share", "8x16x8x8"):
        assert header in stdout, stdout
    assert "6 rows in" in stdout and DIST_RESULTS in stdout


def test_cuda_without_a_gpu_per_rank_is_not_supported(tmp_path):
    ranks = torch.cuda.device_count() + 1
    outcome = bnbench.bench(
        "sync", devices=["cuda"], world_sizes=[ranks], sweep="smoke", output=tmp_path / "o"
    )
    assert isinstance(outcome, bnbench.api.DistBenchResult)
    assert len(outcome.rows) == 3
    for r in outcome.rows:
        assert r["status"] == "not-supported", r
        assert "GPU" in r["message"] or "NCCL" in r["message"], r


RAISES = textwrap.dedent("""
    import os

    import torch.distributed as dist

    from bnbench.implementations.sync import SyncBatchNorm


    class RaisesOnRank1(SyncBatchNorm):
        def forward(self, x):
            mark = os.environ["DIST_BENCH_MARK"]
            if dist.is_initialized() and dist.get_rank() == 1 and not os.path.exists(mark):
                open(mark, "w").close()  # once: the rows after it measure
                raise RuntimeError("rank 1 refuses this batch")
            return super().forward(x)
""")


def test_a_rank_that_raises_costs_its_row_not_the_run(tmp_path, monkeypatch):
    (tmp_path / "raising.py").write_text(RAISES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIST_BENCH_MARK", str(tmp_path / "raised"))
    outcome = bnbench.bench(
        "raising:RaisesOnRank1",
        world_sizes=[2],
        sweep="smoke",
        output=tmp_path / "o",
        timeout=60,
    )
    rows = {r["mode"]: r for r in outcome.rows}
    assert (tmp_path / "raised").exists()
    first = rows["forward_train"]  # the first row: rank 1 raised in its first forward
    assert first["status"] == "error" and first["median_s"] is None
    assert first["message"].startswith("rank 1: the synchronized module: raised RuntimeError")
    assert "rank 1 refuses this batch" in first["message"]
    for mode in ("backward", "forward_backward"):  # a fresh world ran the rest
        assert rows[mode]["status"] == "ok" and rows[mode]["comm_share"] > 0, rows[mode]
    assert json.loads((tmp_path / "o" / "environment.json").read_text())["complete"]
    assert [r["mode"] for r in outcome.problems] == ["forward_train"]


def _timed(**changes) -> dict:
    timed = {
        "median_s": 1e-3,
        "p20_s": 9e-4,
        "p80_s": 1.1e-3,
        "repetitions": 10,
        "block_s": 1e-2,
        "comm_s": 5e-3,
        "collectives": 10,
    }
    return dict(timed, **changes)


@pytest.mark.parametrize(
    "bad, words",
    [
        (_timed(median_s=None), "median_s"),  # NaN arrives as null
        (_timed(median_s=-1.0), "median_s"),
        (_timed(median_s=1e9, p80_s=2e9, block_s=3e9), "median_s"),  # longer than a day
        (_timed(comm_s=1.0), "comm_s is larger"),  # more communication than time
        (_timed(p20_s=2e-3), "between p20_s and p80_s"),
        (_timed(repetitions=True), "repetitions"),
        (dict(_timed(), extra=1), "extra"),
    ],
)
def test_a_ranks_numbers_are_validated_before_use(bad, words):
    good = {"status": "ok", "message": "", "sync": _timed(), "local": _timed(comm_s=0.0)}
    assert merge_ranks([RankReport(good, None)] * 2, 2)["status"] == "ok"
    merged = merge_ranks([RankReport(good, None), RankReport(dict(good, sync=bad), None)], 2)
    assert merged["status"] == "error"
    assert merged["message"].startswith("rank 1: the rank sent an invalid result")
    assert words in merged["message"], merged["message"]


def test_no_collective_seen_at_two_ranks_reads_n_a_not_0():
    quiet = {
        "status": "ok",
        "sync": _timed(comm_s=0.0, collectives=0),
        "local": _timed(comm_s=0.0, collectives=0),
    }
    merged = merge_ranks([RankReport(quiet, None)] * 2, 2)
    assert merged["comm_share"] == "" and "n/a" in merged["message"]
    assert merge_ranks([RankReport(quiet, None)], 1)["comm_share"] == 0.0


def _record(directory) -> None:
    """environment.json records the dist_results.csv now in ``directory``."""
    env = json.loads((directory / "environment.json").read_text())
    digest = hashlib.sha256((directory / DIST_RESULTS).read_bytes()).hexdigest()
    env["files"][DIST_RESULTS]["sha256"] = digest
    (directory / "environment.json").write_text(json.dumps(env))


def test_report_shows_the_section_escaped(smoke, tmp_path):
    from bnbench.report import DIST_HEADING, write_report

    out, _ = smoke
    hostile = tmp_path / "hostile"
    shutil.copytree(out, hostile, ignore=shutil.ignore_patterns(".bnbench.lock"))
    name = "<img src=x onerror=alert(1)>|$x$"
    text = (hostile / DIST_RESULTS).read_text().replace("\nsync,", f'\n"{name}",')
    (hostile / DIST_RESULTS).write_text(text)
    _record(hostile)
    page = write_report([str(hostile)], tmp_path / "r").read_text()
    assert DIST_HEADING in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    md = (tmp_path / "r" / "report.md").read_text()
    assert DIST_HEADING in md and "<img src=x" not in md and "&lt;img" in md
    assert list((tmp_path / "r" / "plots").glob("dist-*.png"))
    # a dist_results.csv its environment.json does not record (another run's) is not shown
    (hostile / DIST_RESULTS).write_text(text + "\n")
    page = write_report([str(hostile)], tmp_path / "r2").read_text()
    assert DIST_HEADING not in page and "from another run" in page


def test_report_refuses_an_invalid_dist_table(smoke, tmp_path):
    from bnbench.report import write_report
    from bnbench.runs import ReportInputError

    out, _ = smoke
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns(".bnbench.lock"))
    rows = _rows(broken)
    rows[0]["comm_share"] = "1.5"
    with open(broken / DIST_RESULTS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _record(broken)
    with pytest.raises(ReportInputError, match="comm_share: 1.5 is not between 0 and 1"):
        write_report([str(broken)], tmp_path / "r")
