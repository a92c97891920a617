"""The distributed gate (verify --world-size): the built-ins at world sizes 2 and 3, ranks that
raise, die or hang, torchrun, and the pieces it stands on (the rank-report merge, the
collective counter, swap to a synchronized BatchNorm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from torch import nn

from bnbench import distributed
from bnbench.checks import FAIL, PASS
from bnbench.distributed import RankReport, merge_reports
from bnbench.implementations.sync import SyncBatchNorm
from bnbench.registry import resolve
from bnbench.swap import SwapError, swap

from helpers import bnbench

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_builtins_at_world_sizes_2_and_3(tmp_path):
    """The issue's budget run: every distributed case for the built-ins at world sizes 2 and
    3. sync passes every case; builtin-sync (nn.SyncBatchNorm) is not supported on CPU, with
    the reason."""
    start = time.perf_counter()
    out = tmp_path / "d.json"
    result = bnbench("verify", "--world-size", "2", "--world-size", "3", "--json", str(out))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    report = _load(out)
    by = {}
    for r in report["results"]:
        by.setdefault((r["implementation"], r["device"]), []).append(r)
    assert set(by) == {
        ("sync", "cpu-ws2"),
        ("sync", "cpu-ws3"),
        ("builtin-sync", "cpu-ws2"),
        ("builtin-sync", "cpu-ws3"),
    }
    n = len(distributed.dist_cases())
    for key in (("sync", "cpu-ws2"), ("sync", "cpu-ws3")):
        assert [r["verdict"] for r in by[key]] == ["pass"] * n
    for key in (("builtin-sync", "cpu-ws2"), ("builtin-sync", "cpu-ws3")):
        assert {r["verdict"] for r in by[key]} == {"not-supported"}
        assert "one GPU per rank" in by[key][0]["message"]
    print(f"distributed gate over the built-ins at world sizes 2 and 3: {seconds:.1f} s")


def test_plain_and_synchronized_kinds_do_not_mix():
    """A synchronized BN named without --world-size, or a plain one named with it, is a usage
    error that says which to use (it would verify nothing); by default each gate picks its
    own kind; a forwarding constructor over a synchronized base is recognized as one."""
    from bnbench import api
    from bnbench.registry import UsageError, takes_process_group

    chosen, _, _ = api.implementations(None)
    assert "sync" not in [i.name for i in chosen] and "builtin" in [i.name for i in chosen]
    chosen, _, _ = api.implementations(None, distributed=True)
    assert {i.name for i in chosen} == {"sync", "builtin-sync"}
    with pytest.raises(UsageError, match="verify it with --world-size"):
        api.verify("sync", cases=["default-rank4"])
    with pytest.raises(UsageError, match="not a synchronized BatchNorm"):
        api.verify("builtin", world_sizes=[2], cases=["dist-uneven-rank4"])
    result = bnbench("verify", "--world-size", "2", "--impl", "builtin")
    assert result.returncode == 2 and "without --world-size" in result.stderr

    class Forwarding(SyncBatchNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    assert takes_process_group(Forwarding) and takes_process_group(nn.SyncBatchNorm)
    assert not takes_process_group(nn.BatchNorm2d)


FAULTS = textwrap.dedent("""
    import os, time
    import torch.distributed as dist
    from bnbench.implementations.sync import SyncBatchNorm

    def faulty():
        # rank 1, in training, on the rank-4 cases only: the rank-2 case shows the rest ran
        return dist.get_rank() == 1

    class Raises(SyncBatchNorm):
        def forward(self, x):
            if self.training and x.dim() == 4 and faulty():
                raise RuntimeError("rank 1 refuses")
            return super().forward(x)

    class Dies(SyncBatchNorm):
        def forward(self, x):
            if self.training and x.dim() == 4 and faulty():
                os._exit(3)
            return super().forward(x)

    class Hangs(SyncBatchNorm):
        def forward(self, x):
            if self.training and x.dim() == 4 and faulty():
                while True:
                    time.sleep(0.1)
            return super().forward(x)

    class NoSync(SyncBatchNorm):
        # normalizes each shard with its own statistics: a plain BN with the right constructor
        def forward(self, x):
            return torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                self.training, self.momentum or 0.0, self.eps)

    class EvalSync(SyncBatchNorm):
        # right numbers, but a collective in eval
        def forward(self, x):
            if not self.training:
                import torch
                t = torch.zeros(1)
                dist.all_reduce(t)
            return super().forward(x)
""").replace("import torch.distributed as dist", "import torch, torch.distributed as dist")


def _workers_of(directory) -> list[int]:
    """bnbench workers still running that a run from ``directory`` started (their PYTHONPATH
    names it: other runs on the machine are not counted)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if b"BNBENCH_WORKER_TOKEN=" in environ and str(directory).encode() in environ:
            found.append(p.pid)
    return found


def test_ranks_that_raise_die_hang_or_lie_cost_their_cases(tmp_path):
    """A rank that raises, dies or hangs fails its case (the culprit rank named first), the
    other ranks are released, a fresh world runs the next case, and nothing is left running;
    a BN that does not synchronize and one that communicates in eval fail on the numbers and
    on the collective count."""
    (tmp_path / "faults.py").write_text(FAULTS)
    specs = [f"faults:{name}" for name in ("Raises", "Dies", "Hangs", "NoSync", "EvalSync")]
    args = ["verify", "--world-size", "2", "--timeout", "12", "--json", str(tmp_path / "r.json")]
    for spec in specs:
        args += ["--impl", spec]
    args += ["--case", "dist-uneven-rank4", "--case", "dist-uneven-rank2"]
    result = bnbench(*args, cwd=tmp_path, pythonpath=[tmp_path])
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {(r["implementation"], r["case"]): r for r in _load(tmp_path / "r.json")["results"]}
    for name, first in (
        (
            "Raises",
            "rank 1: step 0 (train, shards [2, 3]): forward raised RuntimeError: rank 1 refuses",
        ),
        ("Dies", "rank 1: crashed: the rank process exited (exit code 3) during this case"),
        ("Hangs", "rank 1: no result when another rank failed"),
    ):
        row = rows[(f"faults:{name}", "dist-uneven-rank4")]
        assert row["verdict"] == "fail"
        assert row["message"].startswith(first), row["message"]
        # the next case ran in a fresh world and passed
        assert rows[(f"faults:{name}", "dist-uneven-rank2")]["verdict"] == "pass"
    no_sync = rows[("faults:NoSync", "dist-uneven-rank4")]
    assert no_sync["verdict"] == "fail" and "output:" in no_sync["message"]
    eval_sync = rows[("faults:EvalSync", "dist-uneven-rank4")]
    assert eval_sync["verdict"] == "fail"
    assert "called 1 collective(s) in eval (allreduce)" in eval_sync["message"]
    assert _workers_of(tmp_path) == []


def test_merge_names_the_culprit_first():
    ok = RankReport({"status": PASS, "message": "", "seconds": 0.1, "in_step": False}, None)
    raised = RankReport(
        {"status": FAIL, "message": "step 0: forward raised X", "seconds": 0.1, "in_step": True},
        None,
    )
    timed_out = RankReport(
        {
            "status": FAIL,
            "message": "forward raised RuntimeError: Timed out waiting 5000ms",
            "seconds": 5.0,
            "in_step": True,
        },
        None,
    )
    silent = RankReport(None, f"{distributed._NO_RESULT}: hung, or waiting")
    assert merge_reports([ok, ok]).status == PASS
    outcome = merge_reports([timed_out, silent, raised])
    assert outcome.status == FAIL
    assert [line.split(":")[0] for line in outcome.message.splitlines()] == [
        "rank 2",
        "rank 1",
        "rank 0",
    ]
    # a result that is not a valid outcome fails the case, whatever it claims
    forged = RankReport({"status": PASS, "message": "", "seconds": -1.0, "in_step": False}, None)
    assert merge_reports([ok, forged]).status == FAIL
    missing = RankReport({"status": PASS, "message": "", "seconds": 0.1}, None)
    assert merge_reports([ok, missing]).status == FAIL


def test_uneven_splits_cover_empty_and_single_sample_ranks():
    for world in (2, 3, 4):
        for name in ("uneven", "empty-rank"):
            steps = [distributed.SPLITS[name](world, i) for i in range(3)]
            assert all(len(s) == world for s in steps)
            assert len({tuple(s) for s in steps}) == 3  # the split changes every step
        assert any(1 in distributed.SPLITS["uneven"](world, i) for i in range(3))
        assert all(0 in distributed.SPLITS["empty-rank"](world, i) for i in range(3))
        groups = distributed.subgroups(world)
        assert sorted(r for g in groups for r in g) == list(range(world))


def test_swap_to_a_synchronized_bn():
    """swap(model, "sync") replaces every BatchNorm (and nn.SyncBatchNorm) with the state and
    hyper-parameters, passes process_group, and without a process group runs as local BN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    model.append(nn.Flatten()).append(nn.Linear(4 * 9, 3)).append(nn.BatchNorm1d(3, eps=1e-3))
    model.train()
    model(torch.randn(5, 2, 3, 3))  # non-trivial running statistics
    reference = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    expected_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in reference]
    sentinel = object()
    swapped = swap(model, "sync", process_group=sentinel)
    layers = [m for m in swapped.modules() if isinstance(m, SyncBatchNorm)]
    assert len(layers) == 2
    for layer, state, old in zip(layers, expected_state, reference):
        assert layer.process_group is sentinel
        assert (layer.eps, layer.momentum) == (old.eps, old.momentum)
        for key, value in state.items():
            assert torch.equal(layer.state_dict()[key], value), key
    for layer in layers:
        layer.process_group = None  # no process group initialized: local BatchNorm
    x = torch.randn(6, 2, 3, 3)
    swapped.train()
    got = swapped(x)  # training without a process group: local batch statistics
    with pytest.raises(SwapError, match="not a synchronized BatchNorm"):
        swap(nn.Sequential(nn.BatchNorm2d(3)), "builtin", process_group=sentinel)
    assert got.shape == (6, 3) and got.requires_grad
    # an nn.SyncBatchNorm (which cannot train on CPU) is swapped too
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    assert isinstance(swap(converted, "sync")[0], SyncBatchNorm)


def test_sync_without_a_process_group_is_local_batchnorm():
    torch.manual_seed(1)
    ours, theirs = SyncBatchNorm(4), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(4))


def test_builtin_sync_is_detected_as_synchronized():
    impl = resolve(["builtin-sync"])[0]
    assert impl.distributed
    from bnbench.registry import Config

    reasons = impl.not_supported_reasons(Config(rank=4, world_size=2))
    assert any("one GPU per rank" in r for r in reasons)


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun is not installed next to this interpreter",
)
def test_torchrun_runs_the_same_check(tmp_path):
    """The multi-machine path on one machine: torchrun with env:// rendezvous, two ranks;
    rank 0 writes the verdict."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "t.json"
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "bnbench.torchrun",
            "--impl",
            "sync",
            "--case",
            "dist-uneven-*",
            "--case",
            "dist-empty-rank-*",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = _load(out)
    assert report["ok"]
    assert {r["device"] for r in report["results"]} == {"cpu-ws2"}
    assert len(report["results"]) == 6
    assert "sync@cpu-ws2: 6 pass" in result.stdout
