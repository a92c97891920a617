"""bnbench as a pytest plugin in someone else's project: run from a directory outside this
checkout, with nothing but the installed package (no conftest, no suites on the path)."""

import os
import subprocess
import sys
import textwrap

USER_TEST = textwrap.dedent('''
    import pytest
    import torch
    import torch.nn.functional as F
    from torch import nn

    from bnbench.pytest_plugin import check_gate_case, gate_cases


    class MyBatchNorm(nn.BatchNorm2d):
        """The user's own layer: nn.BatchNorm2d with a forward of its own."""

        def forward(self, x):
            factor = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, factor, self.eps)


    class NoUnbiasing(MyBatchNorm):
        def forward(self, x):
            y = super().forward(x)
            if self.training:
                n = x.numel() // x.shape[1]
                # undo the unbiasing: a classic hand-written slip
                self.running_var.data.mul_((n - 1) / n)
            return y


    @pytest.mark.parametrize("gate_case", gate_cases(
        "test_user:MyBatchNorm", devices=["cpu"], cases=["default-rank4", "momentum_none-*"]))
    def test_mine(gate_case):
        check_gate_case(gate_case)


    @pytest.mark.bnbench_impl("test_user:NoUnbiasing")
    def test_broken(bnbench_gate_case):
        check_gate_case(bnbench_gate_case)
''')


def run_pytest(directory, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_users_project_runs_the_gate_through_the_installed_plugin(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    listed = run_pytest(tmp_path, "test_user.py::test_mine", "--collect-only")
    assert "test_mine[test_user:MyBatchNorm-cpu-momentum_none-rank4]" in listed.stdout
    result = run_pytest(tmp_path, "test_user.py::test_mine")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # a BatchNorm2d subclass is checked at rank 4; the other ranks are skipped with the reason
    assert "2 passed, 3 skipped" in out and "rank 2 input not supported" in out


def test_the_plugin_options_choose_implementation_device_and_fail_a_broken_one(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    result = run_pytest(
        tmp_path,
        "test_user.py::test_broken",
        "--bnbench-device",
        "cpu",
        "-k",
        "default-rank or momentum_0-",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "NoUnbiasing on cpu, default-rank" in out and "running_var" in out
    help_text = run_pytest(tmp_path, "--help").stdout
    for option in ("--bnbench-impl", "--bnbench-device", "--benchmark"):
        assert option in help_text
