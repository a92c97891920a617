"""The correctness cases, as data.

A case is a check family (``momentum_none``, ``channels_last``...) applied to one input rank: the
constructor arguments, the input, the sequence of train/eval steps, and which runner checks it.
Its id, ``<check>-rank<R>``, is what reports, pytest ids and declared deviations use.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from bnbench.reference import eps_message, one_value_per_channel_message, wrong_rank_message
from bnbench.registry import Config

# train, train, train: running statistics accumulate; eval: uses them; then train and eval again
# so a module that breaks its state when switching modes is caught.
DEFAULT_STEPS = ("train", "train", "train", "eval", "train", "eval")

BASE_SHAPES = {2: (6, 5), 3: (4, 5, 3), 4: (3, 5, 4, 3), 5: (2, 5, 3, 2, 3)}
# Small enough for numerical Jacobians, with more than one value per channel.
GRADCHECK_SHAPES = {2: (4, 3), 3: (3, 3, 2), 4: (2, 3, 2, 2), 5: (2, 2, 2, 1, 2)}
SINGLE_VALUE_SHAPES = {2: (1, 5), 3: (1, 5, 1), 4: (1, 5, 1, 1), 5: (1, 5, 1, 1, 1)}
BATCH_ONE_SHAPES = {3: (1, 5, 7), 4: (1, 5, 3, 4), 5: (1, 5, 2, 3, 2)}
ZERO_BATCH_SHAPES = {2: (0, 5), 3: (0, 5, 9), 4: (0, 5, 2, 2), 5: (0, 5, 2, 2, 2)}


@dataclass(frozen=True)
class Case:
    check: str
    kind: str  # steps | gradcheck | defaults | reset | state_dict | error
    rank: int
    shape: tuple[int, ...]
    description: str
    dtype: torch.dtype = torch.float32  # input dtype
    module_dtype: torch.dtype = torch.float32
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    steps: tuple[str, ...] = DEFAULT_STEPS
    memory_format: str = "contiguous"  # contiguous | channels_last | non_contiguous
    constant_channel: bool = False
    stop_tracking_after: int | None = None  # switch track_running_stats off before this step
    initial_running_stats: bool = False  # start from non-trivial running statistics
    backward: bool = True
    double_backward: bool = False
    rank_specific: bool = False
    error: str | None = None  # kind == error: the exact ValueError message
    salt: int = 0  # varies the generated inputs between cases of the same id (property tests)
    # False: construct with num_features alone, so the constructor's own defaults are tested.
    explicit_kwargs: bool = True

    @property
    def id(self) -> str:
        return f"{self.check}-rank{self.rank}"

    @property
    def num_features(self) -> int:
        return self.shape[1]

    @property
    def needs_backward(self) -> bool:
        return self.kind == "gradcheck" or (self.kind == "steps" and self.backward)

    @property
    def needs_double_backward(self) -> bool:
        return self.double_backward

    def module_kwargs(self) -> dict:
        return dict(
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )

    def config(self, device: str) -> Config:
        """What this case asks of an implementation, as a capability question."""
        return Config(
            rank=self.rank,
            device=device,
            dtype=self.dtype,
            module_dtype=self.module_dtype,
            memory_format=self.memory_format,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            tracking_switched_off=self.stop_tracking_after is not None,
            needs_backward=self.needs_backward,
            needs_double_backward=self.needs_double_backward,
            rank_specific=self.rank_specific,
        )

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) + 7919 * self.salt


def _per_rank(check: str, description: str, ranks=(2, 3, 4, 5), shapes=BASE_SHAPES, **kw):
    return [
        Case(
            check=check, rank=r, shape=shapes[r], description=description, **{"kind": "steps", **kw}
        )
        for r in ranks
    ]


def all_cases() -> list[Case]:
    """Every case of the gate, in report order."""
    c: list[Case] = []
    steps: list[tuple[str, str, dict]] = [
        ("default", "default hyper-parameters, several train and eval steps", {}),
        (
            "default_constructor",
            "constructed from num_features alone: the signature's "
            "defaults must be eps=1e-5, momentum=0.1, affine, tracking",
            dict(explicit_kwargs=False),
        ),
        ("momentum_float", "momentum=0.7", dict(momentum=0.7)),
        (
            "momentum_none",
            "momentum=None: cumulative average of batch statistics",
            dict(momentum=None),
        ),
        ("momentum_0", "momentum=0: running statistics never move", dict(momentum=0.0)),
        ("momentum_1", "momentum=1: running statistics are the last batch's", dict(momentum=1.0)),
        ("eps", "eps=0.1 on a channel of small variance", dict(eps=0.1)),
        ("not_affine", "affine=False: no weight and bias", dict(affine=False)),
        (
            "no_running_stats",
            "track_running_stats=False: batch statistics in eval too",
            dict(track_running_stats=False),
        ),
        (
            "not_affine_no_running_stats",
            "affine=False and track_running_stats=False",
            dict(affine=False, track_running_stats=False),
        ),
        (
            "stop_tracking",
            "track_running_stats switched off after two steps",
            dict(stop_tracking_after=2),
        ),
        (
            "momentum_none_stop_tracking",
            "momentum=None, tracking switched off after two steps",
            dict(momentum=None, stop_tracking_after=2),
        ),
        (
            "eval_first",
            "eval from non-trivial running statistics, then training",
            dict(initial_running_stats=True, steps=("eval", "eval", "train", "eval")),
        ),
        (
            "mode_from_training_flag",
            "mode from module.training, whatever the grad mode",
            dict(
                initial_running_stats=True,
                steps=("train_nograd", "train_nograd", "eval", "eval_nograd", "train"),
            ),
        ),
        (
            "float64",
            "float64 module and input",
            dict(dtype=torch.float64, module_dtype=torch.float64),
        ),
        ("float16", "float16 input, float32 module (mixed precision)", dict(dtype=torch.float16)),
        (
            "bfloat16",
            "bfloat16 input, float32 module (mixed precision)",
            dict(dtype=torch.bfloat16),
        ),
        (
            "non_contiguous",
            "non-contiguous (transposed storage) input",
            dict(memory_format="non_contiguous"),
        ),
        ("constant_channel", "a channel with zero variance", dict(constant_channel=True)),
    ]
    for check, description, kw in steps:
        c += _per_rank(check, description, **kw)
    c += _per_rank(
        "channels_last",
        "channels_last input keeps its memory format",
        ranks=(4, 5),
        memory_format="channels_last",
    )
    c += _per_rank(
        "channels_last_float16",
        "channels_last float16 input, float32 module",
        ranks=(4, 5),
        memory_format="channels_last",
        dtype=torch.float16,
    )
    c += _per_rank(
        "zero_batch",
        "zero-size batch: empty output, stats unchanged, zero grads",
        shapes=ZERO_BATCH_SHAPES,
        initial_running_stats=True,
        steps=("train", "eval", "train"),
    )
    c += _per_rank(
        "batch_one_spatial",
        "N=1 with spatial size > 1 trains",
        ranks=(3, 4, 5),
        shapes=BATCH_ONE_SHAPES,
    )
    c += _per_rank(
        "eval_batch_one",
        "N=1 with one value per channel in eval",
        shapes=SINGLE_VALUE_SHAPES,
        initial_running_stats=True,
        steps=("eval",),
    )

    for mode in ("train", "eval"):
        c += _per_rank(
            f"gradcheck_{mode}",
            f"gradcheck in float64, {mode} mode",
            shapes=GRADCHECK_SHAPES,
            kind="gradcheck",
            dtype=torch.float64,
            module_dtype=torch.float64,
            steps=(mode,),
            initial_running_stats=True,
        )
        c += _per_rank(
            f"gradgradcheck_{mode}",
            f"double backward (gradgradcheck), {mode} mode",
            shapes=GRADCHECK_SHAPES,
            kind="gradcheck",
            dtype=torch.float64,
            module_dtype=torch.float64,
            steps=(mode,),
            initial_running_stats=True,
            double_backward=True,
        )

    c += _per_rank(
        "defaults", "fresh module: parameters, buffers, state_dict keys", kind="defaults"
    )
    c += _per_rank(
        "defaults_not_affine",
        "fresh module, affine=False: weight and bias are None",
        kind="defaults",
        affine=False,
    )
    c += _per_rank(
        "defaults_no_running_stats",
        "fresh module, track_running_stats=False: buffers are None",
        kind="defaults",
        track_running_stats=False,
    )
    c += _per_rank(
        "defaults_float64",
        "fresh module with dtype=float64",
        kind="defaults",
        dtype=torch.float64,
        module_dtype=torch.float64,
    )
    c += _per_rank(
        "reset", "reset_running_stats() and reset_parameters() restore defaults", kind="reset"
    )
    state_dicts: list[tuple[str, str, dict]] = [
        ("", "state_dict loads from nn.BatchNorm and back", {}),
        ("_not_affine", "state_dict round trip, affine=False", dict(affine=False)),
        (
            "_no_running_stats",
            "state_dict round trip, track_running_stats=False",
            dict(track_running_stats=False),
        ),
        ("_momentum_none", "state_dict round trip, momentum=None", dict(momentum=None)),
    ]
    for suffix, description, kw in state_dicts:
        c += _per_rank("state_dict" + suffix, description, kind="state_dict", **kw)

    for r, shape in SINGLE_VALUE_SHAPES.items():
        c.append(
            Case(
                "one_value_per_channel",
                "error",
                r,
                shape,
                "training with one value per channel raises ValueError",
                steps=("train",),
                error=one_value_per_channel_message(torch.Size(shape)),
            )
        )
    c.append(
        Case(
            "one_value_per_channel_no_running_stats",
            "error",
            2,
            (1, 5),
            "eval without running stats uses batch stats, so one value raises",
            track_running_stats=False,
            steps=("eval",),
            error=one_value_per_channel_message(torch.Size((1, 5))),
        )
    )
    for r in (2, 4, 5):
        c.append(
            Case(
                "eps_zero",
                "error",
                r,
                BASE_SHAPES[r],
                "eps=0 in training raises",
                eps=0.0,
                steps=("train",),
                error=eps_message(0.0),
            )
        )
    for module_rank, input_shape in [
        (2, (3, 5, 2, 2)),
        (3, (3, 5, 2, 2, 2)),
        (4, (3, 5, 4)),
        (5, (3, 5, 2, 2)),
    ]:
        c.append(
            Case(
                "wrong_rank",
                "error",
                module_rank,
                input_shape,
                "a rank-specific class rejects other ranks",
                steps=("train",),
                rank_specific=True,
                error=wrong_rank_message(module_rank, len(input_shape)),
            )
        )
    return c


def case_by_id() -> dict[str, Case]:
    return {case.id: case for case in all_cases()}


def replace(case: Case, **changes) -> Case:
    return dataclasses.replace(case, **changes)
