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
    error: str | None = None  # kind == error: what is wrong with the input (for the report)
    salt: int = 0  # varies the generated inputs between cases of the same id (property tests)
    # False: construct with num_features alone, so the constructor's own defaults are tested.
    explicit_kwargs: bool = True
    bias: bool = True  # False: torch's keyword-only bias=False (a weight, no bias)
    offset: float = 0.0  # every channel's |mean| / std, when large offsets are the point
    small_std: float = 0.01  # the last channel's std (its variance against eps)
    batch_sizes: tuple[int, ...] = ()  # the batch size of each step, when it varies
    grad_layout: str = "same"  # grad_output: same | permuted (non-contiguous) | channels_last
    input_grad: bool = True  # False: only the parameters require grad
    frozen_affine: bool = False  # weight and bias with requires_grad=False
    # (before step i, action): attribute changes, resets, loads between calls (see checks.py)
    actions: tuple[tuple[int, str], ...] = ()
    spread: float = 1.0  # scales every channel's mean and std (large values for half inputs)
    neutral: bool = False  # keep the fresh module's weight 1, bias 0 and default statistics
    category: str = ""  # numerics | running state | lifecycle | object contract | autograd | errors

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
            bias=self.bias,
            track_running_stats=self.track_running_stats,
            tracking_switched_off=self.stop_tracking_after is not None,
            needs_backward=self.needs_backward,
            needs_double_backward=self.needs_double_backward,
            rank_specific=self.rank_specific,
            positional_constructor=self.kind == "positional",
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
    c += _round_two_cases()
    c += _per_rank(
        "explore",
        "model-based exploration: random sequences of calls, attribute changes, loads, "
        "resets and copies, checked after every operation",
        kind="explore",
    )
    return [dataclasses.replace(case, category=category_of(case.check)) for case in c]


# Sizes that cross the boundaries kernels have (vector widths, blocks, tiles, fast paths):
# values per channel just below, at and above multiples of 8, 16, 64, 256 and 1024, above 2^12
# and 2^16; one channel, odd channel counts, counts above 8 that are not multiples of 8; batches
# above 64. One or two steps each: forward and backward reductions both run.
SIZES: list[tuple[str, tuple[int, ...], str]] = [
    ("size_7_c1", (7, 1), "7 values per channel, one channel"),
    ("size_8_c3", (8, 3), "8 values per channel"),
    ("size_17_c9", (1, 9, 17), "17 values per channel, 9 channels"),
    ("size_63_c13", (7, 13, 3, 3), "63 values per channel, 13 channels"),
    ("size_64_c1", (4, 1, 4, 4), "64 values per channel, one channel"),
    ("size_255_c17", (3, 17, 85), "255 values per channel, 17 channels"),
    ("size_256_c3", (1, 3, 16, 16), "256 values per channel (one tile of 16x16)"),
    ("size_1023_c5", (3, 5, 11, 31), "1023 values per channel"),
    ("size_1025_c11", (5, 11, 5, 41), "1025 values per channel, 11 channels"),
    ("size_1041_c13", (3, 13, 347), "1041 values per channel, 13 channels"),
    ("size_4205_c3", (5, 3, 29, 29), "4205 values per channel (above 2^12)"),
    ("size_65557_c2", (65557, 2), "65557 values per channel (above 2^16), N=65557"),
    ("size_68850_c2", (2, 2, 17, 45, 45), "68850 values per channel (above 2^16), rank 5"),
    ("batch_65_c3", (65, 3, 3, 5), "batch of 65 (above 64)"),
    ("batch_129_c11", (129, 11), "batch of 129, 11 channels"),
    ("batch_300_c10", (300, 10, 7), "batch of 300, 10 channels"),
]


def _round_two_cases() -> list[Case]:
    c: list[Case] = []
    for check, shape, description in SIZES:
        c.append(Case(check, "steps", len(shape), shape, description, steps=("train", "eval")))
    # Numerics: large offsets, variance at and below eps, half counts beyond exact integers.
    for r, shape in ((2, (600, 4)), (3, (8, 4, 75)), (4, (6, 4, 10, 10))):
        c.append(
            Case(
                "large_offset",
                "steps",
                r,
                shape,
                "|mean|/std = 1000 on every channel (a one-pass E[x^2]-E[x]^2 fails)",
                offset=1e3,
                steps=("train", "train", "eval"),
            )
        )
    for r in (2, 4):
        c.append(
            Case(
                "variance_below_eps",
                "steps",
                r,
                BASE_SHAPES[r],
                "a channel whose variance (1e-7) is below eps",
                small_std=3e-4,
            )
        )
        c.append(
            Case(
                "variance_at_eps",
                "steps",
                r,
                BASE_SHAPES[r],
                "a channel whose variance equals eps",
                small_std=10**-2.5,
            )
        )
    # Counts past what half types hold exactly: float16 rounds 4098 to 4096 and overflows above
    # 65504; bfloat16 rounds 4111 to 4096 and the Bessel factor 300/299 to 1. momentum=1 puts
    # the last batch's statistics in the running buffers, so a rounded count shows there.
    half_counts: list[tuple[str, tuple[int, ...], torch.dtype, dict, str]] = [
        (
            "float16_count_4098",
            (2, 3, 2049),
            torch.float16,
            dict(offset=3.0, momentum=1.0),
            "float16 input, 4098 values per channel (float16 rounds the count to 4096)",
        ),
        (
            "float16_count_above_65504",
            (2, 2, 40000),
            torch.float16,
            dict(spread=5.0, steps=("train", "train", "eval")),
            "float16 input, 80000 values per channel, std up to 8 (a float16 count or "
            "sum of squares overflows)",
        ),
        (
            "float16_many",
            (3, 3, 40, 40),
            torch.float16,
            {},
            "float16 input, 4800 values per channel",
        ),
        (
            "bfloat16_count_4111",
            (1, 3, 4111),
            torch.bfloat16,
            dict(offset=3.0, momentum=1.0),
            "bfloat16 input, 4111 values per channel (bfloat16 rounds the count to 4096)",
        ),
        (
            "bfloat16_bessel_300",
            (4, 3, 75),
            torch.bfloat16,
            dict(momentum=1.0),
            "bfloat16 input, 300 values per channel, momentum=1 (bfloat16 rounds 300/299 to 1)",
        ),
    ]
    for check, shape, dtype, kw, description in half_counts:
        kw = {"steps": ("train", "eval"), **kw}
        c.append(Case(check, "steps", len(shape), shape, description, dtype=dtype, **kw))
    # torch 2.13's keyword-only bias=False (only where the installed torch has it).
    if builtin_has_bias_argument():
        c += _per_rank("bias_false", "bias=False: a weight and no bias", bias=False)
        c += _per_rank(
            "defaults_bias_false",
            "fresh module, bias=False: bias is None, absent from state_dict",
            kind="defaults",
            bias=False,
        )
        c += _per_rank(
            "state_dict_bias_false",
            "state_dict round trip, bias=False",
            kind="state_dict",
            bias=False,
        )
    # Lifecycle: a module lives through many calls.
    lifecycle: list[tuple[str, str, dict]] = [
        (
            "momentum_assigned",
            "module.momentum assigned between calls",
            dict(actions=((2, "momentum=0.6"), (4, "momentum=None"))),
        ),
        (
            "eps_assigned",
            "module.eps assigned between calls (channel of small variance)",
            dict(actions=((2, "eps=0.1"),)),
        ),
        (
            "training_assigned",
            "module.training assigned directly (not .train()/.eval())",
            dict(steps=("train_attr", "eval_attr", "train_attr", "eval_attr")),
        ),
        (
            "tracking_toggled",
            "track_running_stats switched off, then on again",
            dict(actions=((1, "tracking_off"), (3, "tracking_on"))),
        ),
        (
            "load_between_calls",
            "load_state_dict between eval calls (no stale cache)",
            dict(
                steps=("train", "eval", "eval", "train", "eval"), actions=((2, "load_state_dict"),)
            ),
        ),
        (
            "reset_between_calls",
            "reset_running_stats between calls (no stale cache)",
            dict(steps=("train", "eval", "eval", "train"), actions=((2, "reset_running_stats"),)),
        ),
        (
            "weight_updated_in_place",
            "weight and bias updated in place between eval calls",
            dict(
                steps=("train", "eval", "eval", "train", "eval"),
                actions=((2, "scale_parameters"), (4, "scale_parameters")),
            ),
        ),
        (
            "inference_cache",
            "eval under no_grad after in-place parameter updates, load_state_dict, a new eps "
            "and reset_running_stats (no cached scale and shift)",
            dict(
                steps=(
                    "train",
                    "eval_nograd",
                    "eval_nograd",
                    "eval_nograd",
                    "eval_nograd",
                    "eval_nograd",
                ),
                actions=(
                    (2, "scale_parameters"),
                    (3, "load_state_dict"),
                    (4, "eps=0.1"),
                    (5, "reset_running_stats"),
                ),
            ),
        ),
        (
            "varying_batch",
            "batch size changes from step to step",
            dict(batch_sizes=(2, 7, 3, 5, 4, 6)),
        ),
        (
            "momentum_none_varying_batch",
            "momentum=None with varying batch sizes: the average is per batch, not per sample",
            dict(momentum=None, batch_sizes=(2, 9, 3, 6, 4, 5)),
        ),
        (
            "counter_set_to_none",
            "num_batches_tracked set to None on a tracking module: the running statistics "
            "still move by the momentum (not at all under momentum=None, nn's factor 0.0)",
            dict(actions=((1, "counter_none"), (3, "momentum=None"))),
        ),
        (
            "buffers_set_to_none",
            "running buffers set to None on a tracking module (test-time "
            "adaptation): batch statistics in eval too",
            dict(actions=((1, "buffers_none"),)),
        ),
    ]
    for check, description, kw in lifecycle:
        c += _per_rank(check, description, **kw)
    c += _per_rank(
        "legacy_state_dict",
        "a state_dict without num_batches_tracked (saved "
        "before it existed) loads as into nn.BatchNorm",
        kind="legacy_state_dict",
    )
    c += _per_rank("two_instances", "two modules never share state", kind="two_instances")
    # Object contract.
    c += _per_rank(
        "module_dtype",
        "dtype=float16/bfloat16/float64 and device='meta': "
        "parameter and buffer dtypes and devices as nn.BatchNorm's",
        kind="module_dtype",
    )
    c += _per_rank(
        "eval_fresh_module",
        "a fresh module (weight 1, bias 0, default statistics) in eval: still a new tensor",
        neutral=True,
        steps=("eval_nograd", "eval", "train", "eval_nograd"),
    )
    c += _per_rank(
        "eval_fresh_not_affine",
        "affine=False, fresh statistics, eval: still a new tensor",
        ranks=(2, 4),
        neutral=True,
        affine=False,
        steps=("eval_nograd", "eval"),
    )
    c += _per_rank(
        "positional_constructor",
        "nn.BatchNorm's positional signature (num_features, eps, momentum, affine, "
        "track_running_stats): each argument lands where nn.BatchNorm puts it",
        kind="positional",
    )
    c += _per_rank(
        "copy_and_save",
        "deepcopy, pickle and torch.save/load round trips keep state and behaviour",
        kind="copy_and_save",
    )
    # Autograd contract.
    autograd: list[tuple[str, str, dict]] = [
        (
            "grad_params_only",
            "input without requires_grad: weight and bias grads still flow",
            dict(input_grad=False),
        ),
        (
            "frozen_affine",
            "weight and bias frozen (requires_grad=False): input grad only",
            dict(frozen_affine=True),
        ),
        (
            "grad_output_permuted",
            "non-contiguous grad_output (a downstream transpose)",
            dict(grad_layout="permuted"),
        ),
    ]
    for check, description, kw in autograd:
        c += _per_rank(check, description, **kw)
    c += _per_rank(
        "forward_ad",
        "forward-mode AD (dual numbers, as torch.func.jvp uses) in train and eval",
        kind="forward_ad",
        initial_running_stats=True,
    )
    c += _per_rank(
        "grad_output_channels_last",
        "channels_last grad_output for a contiguous input (a downstream permute)",
        ranks=(4, 5),
        grad_layout="channels_last",
    )
    c += _per_rank(
        "grad_output_contiguous_for_channels_last",
        "contiguous grad_output for a channels_last input",
        ranks=(4, 5),
        memory_format="channels_last",
        grad_layout="contiguous",
    )
    # Errors nn.BatchNorm raises for inputs it cannot take.
    c += _per_rank(
        "wrong_channels",
        "an input with one channel too many or too few raises as nn.BatchNorm does",
        kind="wrong_channels",
    )
    return c


def builtin_has_bias_argument() -> bool:
    """Whether the installed torch's nn.BatchNorm takes the keyword-only ``bias`` (2.13+)."""
    import inspect

    from torch import nn

    return "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


CATEGORIES = (
    "numerics",
    "running state",
    "lifecycle",
    "object contract",
    "autograd",
    "errors",
    "distributed",  # bnbench.distributed's cases (verify --world-size)
)
_RUNNING_STATE = {
    "momentum_float",
    "momentum_none",
    "momentum_0",
    "momentum_1",
    "no_running_stats",
    "not_affine_no_running_stats",
    "stop_tracking",
    "momentum_none_stop_tracking",
    "eval_first",
    "mode_from_training_flag",
    "zero_batch",
}
_LIFECYCLE = {
    "reset",
    "momentum_assigned",
    "eps_assigned",
    "training_assigned",
    "tracking_toggled",
    "load_between_calls",
    "reset_between_calls",
    "weight_updated_in_place",
    "varying_batch",
    "momentum_none_varying_batch",
    "buffers_set_to_none",
    "counter_set_to_none",
    "legacy_state_dict",
    "two_instances",
    "inference_cache",
    "explore",
}
_OBJECT = {
    "default_constructor",
    "channels_last",
    "channels_last_float16",
    "module_dtype",
    "copy_and_save",
    "non_contiguous",
    "eval_fresh_module",
    "eval_fresh_not_affine",
    "positional_constructor",
}
_ERRORS = {
    "one_value_per_channel",
    "one_value_per_channel_no_running_stats",
    "eps_zero",
    "wrong_rank",
    "wrong_channels",
}


def category_of(check: str) -> str:
    """The category a check belongs to (the matrix, JSON and JUnit group by it)."""
    if check in _RUNNING_STATE:
        return "running state"
    if check in _LIFECYCLE or check.startswith("state_dict"):
        return "lifecycle"
    if check in _OBJECT or check.startswith("defaults"):
        return "object contract"
    if check.startswith(("gradcheck", "gradgradcheck", "grad_")) or check in (
        "frozen_affine",
        "forward_ad",
    ):
        return "autograd"
    if check in _ERRORS:
        return "errors"
    return "numerics"


def case_by_id() -> dict[str, Case]:
    return {case.id: case for case in all_cases()}


def replace(case: Case, **changes) -> Case:
    return dataclasses.replace(case, **changes)
