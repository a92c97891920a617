"""Hypothesis strategies for random BatchNorm configurations (kept in one module)."""

import torch
from hypothesis import assume
from hypothesis import strategies as st

from bnbench.cases import Case


@st.composite
def configurations(draw, dtypes=(torch.float32, torch.float64)):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    n = draw(st.integers(0, 5))
    c = draw(st.integers(1, 6))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(rank - 2))
    shape = (n, c) + spatial
    steps = tuple(
        draw(st.lists(st.sampled_from(["train", "eval", "train_nograd"]), min_size=1, max_size=5))
    )
    track = draw(st.booleans())
    values_per_channel = n
    for s in spatial:
        values_per_channel *= s
    uses_batch_stats = any(s.startswith("train") for s in steps) or not track
    # One value per channel with batch statistics raises: that is an error case, not a step.
    assume(not (uses_batch_stats and values_per_channel == 1))
    dtype = draw(st.sampled_from(dtypes))
    memory_format = "contiguous"
    if rank in (4, 5):
        memory_format = draw(st.sampled_from(["contiguous", "channels_last", "non_contiguous"]))
    return Case(
        check="property",
        kind="steps",
        rank=rank,
        shape=shape,
        description="random configuration",
        dtype=dtype,
        module_dtype=dtype,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 0.5])),
        momentum=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        affine=draw(st.booleans()),
        track_running_stats=track,
        steps=steps,
        memory_format=memory_format,
        stop_tracking_after=draw(st.one_of(st.none(), st.integers(0, len(steps) - 1)))
        if track
        else None,
        initial_running_stats=draw(st.booleans()),
        salt=draw(st.integers(0, 10_000)),
    )
