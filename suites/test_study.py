"""BatchNorm against no BatchNorm on digits: measured, deterministic, concluded from the data."""

import json

from bnbench.study import SMOKE_STUDY, conclusion, run_one, summarize, without_batchnorm
from bnbench.zoo import build

from helpers import in_process


def test_study_command_writes_curves_summary_and_conclusion(tmp_path):
    result = in_process("study", "--smoke", "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["schema"] == "bnbench.study/1"
    assert {(s["model"], s["batchnorm"]) for s in summary["summary"]} == {
        ("mlp_bn", True),
        ("mlp_bn", False),
    }
    assert summary["conclusion"][0] in result.stdout
    assert (tmp_path / "study.csv").read_text().startswith("model,batchnorm,seed,step")


def test_the_old_claim_command_and_files_still_work(tmp_path):
    from bnbench.runs import load_bench_dir

    assert "claim" not in in_process("--help").stdout  # hidden alias
    assert in_process("claim", "--smoke", "--output", str(tmp_path)).returncode == 0
    (tmp_path / "study.json").rename(tmp_path / "claim.json")
    (tmp_path / "study.csv").rename(tmp_path / "claim.csv")
    data = json.loads((tmp_path / "claim.json").read_text())
    (tmp_path / "claim.json").write_text(json.dumps(dict(data, schema="bnbench.claim/1")))
    (tmp_path / "environment.json").write_text(json.dumps({"schema": "bnbench.bench/1"}))
    (tmp_path / "results.csv").write_text(
        "implementation,device,dtype,mode,batch_size,channels,spatial,shape,memory_format,"
        "status,median_s\n"
    )
    loaded = load_bench_dir(tmp_path)
    assert loaded.study is not None and loaded.study[1]["conclusion"] == data["conclusion"]


def test_the_study_is_deterministic_and_really_removes_batchnorm():
    assert run_one("mlp_bn", True, 3, SMOKE_STUDY) == run_one("mlp_bn", True, 3, SMOKE_STUDY)
    stripped = without_batchnorm(build("conv_bn", seed=0))
    assert not any("BatchNorm" in type(m).__name__ for m in stripped.modules())


def curve(model, batchnorm, accuracies):
    return [
        {
            "model": model,
            "batchnorm": batchnorm,
            "seed": 0,
            "step": 10 * (i + 1),
            "test_accuracy": a,
        }
        for i, a in enumerate(accuracies)
    ]


def test_the_conclusion_follows_the_figures_whichever_way_they_fall():
    helps = summarize(curve("m", True, [0.5, 0.95, 0.97]) + curve("m", False, [0.3, 0.6, 0.8]), 0.9)
    assert conclusion(helps, 0.9)[0].startswith("m: BatchNorm helps")
    hurts = summarize(curve("m", True, [0.3, 0.6, 0.8]) + curve("m", False, [0.5, 0.95, 0.97]), 0.9)
    assert conclusion(hurts, 0.9)[0].startswith("m: BatchNorm does not help")
    mixed = summarize(
        curve("m", True, [0.95, 0.91, 0.91]) + curve("m", False, [0.5, 0.95, 0.99]), 0.9
    )
    assert conclusion(mixed, 0.9)[0].startswith("m: mixed result")
