"""Registration: built-ins and third-party packages through the same entry-point group."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bnbench.cases import case_by_id
from bnbench.registry import (
    UsageError,
    entry_point_implementations,
    from_classes,
    from_module_class,
    load_spec,
    resolve,
)


def test_builtins_are_registered_through_entry_points():
    names = set(entry_point_implementations())
    assert {"builtin", "builtin-native", "vectorized", "compiled", "d2l"} <= names


def test_resolve_defaults_to_every_registered_implementation():
    assert [i.name for i in resolve()] == list(entry_point_implementations())


def test_plain_module_class_is_checked_on_every_rank():
    impl = from_module_class("plain", nn.Module)
    assert impl.supports_ranks == frozenset({2, 3, 4, 5}) and not impl.rank_specific
    assert impl.not_supported_reasons(case_by_id()["wrong_rank-rank4"].config("cpu"))
    assert not impl.not_supported_reasons(case_by_id()["default-rank5"].config("cpu"))


def test_rank_classes_pick_the_class_by_input_rank():
    impl = from_classes("bn", {2: nn.BatchNorm1d, 4: nn.BatchNorm2d})
    assert impl.supports_ranks == frozenset({2, 4})
    assert isinstance(impl.factory(4, 3), nn.BatchNorm2d)
    assert "rank 3 input not supported" in impl.not_supported_reasons(
        case_by_id()["default-rank3"].config("cpu")
    )


def test_load_spec_wraps_a_class_and_names_it_by_the_spec(tmp_path, monkeypatch):
    (tmp_path / "localbn.py").write_text("from torch import nn\nclass BN(nn.BatchNorm2d): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    impl = load_spec("localbn:BN")
    assert impl.name == "localbn:BN"
    with pytest.raises(UsageError, match="expected a registered name or MODULE:ATTR"):
        load_spec("localbn")


def test_a_third_party_package_appears_through_its_entry_point(tmp_path):
    # What `pip install someones-bn` leaves on disk: a module and a dist-info with the entry point.
    (tmp_path / "someones_bn.py").write_text(
        textwrap.dedent("""
        from torch import nn
        from bnbench import from_classes
        impl = from_classes("ignored-name", {2: nn.BatchNorm1d, 3: nn.BatchNorm1d,
                                             4: nn.BatchNorm2d, 5: nn.BatchNorm3d})
    """)
    )
    dist = tmp_path / "someones_bn-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: someones-bn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[bnbench.implementations]\nsomeones = someones_bn:impl\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnbench.cli",
            "verify",
            "--case",
            "default-rank4",
            "--impl",
            "someones",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "someones@cpu" in result.stdout


def test_tolerance_table_covers_every_supported_dtype():
    from bnbench.registry import ALL_DTYPES
    from bnbench.tolerances import STATISTICS_TOLERANCES, TOLERANCES

    assert set(TOLERANCES) == set(ALL_DTYPES) == set(STATISTICS_TOLERANCES)
    assert TOLERANCES[torch.float64].rtol < TOLERANCES[torch.float32].rtol
