"""Schemas of what crosses a trust boundary into the parent: a benchmark worker's row result.

Workers run implementations bnbench does not trust; their results arrive as JSON and are
validated here (pydantic) before any number is used: a median of zero, NaN or a string would
divide by zero or poison every summary built on it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bnbench.results import MEASURED, Status, Verdict

# no timed call takes a day; a larger figure is invented
Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
# integers a float64 holds exactly (a table's reader must not overflow on them)
Count = Annotated[int, Field(ge=0, le=2**53, strict=True)]

# No sweep takes more samples than this in one row (a budget of seconds, samples of at least
# a microsecond's work each): more is a worker inventing data.
MAX_SAMPLES = 100_000


class BenchResult(BaseModel):
    """What a benchmark worker sends for one row (bnbench.benchmark.bench_row plus ``verified``)."""

    model_config = ConfigDict(extra="forbid")

    status: Status
    verified: Verdict
    message: Annotated[str, Field(max_length=20_000)] = ""
    median_s: Seconds | None = None
    p20_s: Seconds | None = None
    p80_s: Seconds | None = None
    iqr_s: NonNegative | None = None
    repetitions: Annotated[int, Field(ge=1, le=MAX_SAMPLES, strict=True)] | None = None
    calls_per_repetition: Annotated[int, Field(ge=1, le=2**53, strict=True)] | None = None
    samples: Annotated[list[Seconds], Field(max_length=MAX_SAMPLES)] = []
    peak_memory_bytes: Count | None = None
    memory_method: Annotated[str, Field(max_length=200)] | None = None
    first_call_s: NonNegative | None = None
    compile_s: NonNegative | None = None
    graphs_compiled: Count | None = None
    recompiled_while_timing: bool | None = None
    # what the timer saw of the machine (bnbench.timing): too few undisturbed blocks, how many
    # blocks were disturbed, the process's CPU time over wall time, the 1-minute load average
    disturbed: bool | None = None
    disturbed_blocks: Count | None = None
    cpu_per_wall: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] | None = None
    load: Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)] | None = None
    # CUDA (bnbench.gpu.KernelTiming.columns)
    kernel_s: Seconds | None = None
    kernel_p20_s: Seconds | None = None
    kernel_p80_s: Seconds | None = None
    kernel_repetitions: Annotated[int, Field(ge=1, le=MAX_SAMPLES, strict=True)] | None = None
    kernel_calls_per_repetition: Annotated[int, Field(ge=1, le=10_000, strict=True)] | None = None
    kernel_method: Literal["cuda-graph", "events"] | None = None
    kernel_noise: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    cache: Literal["cold", "warm"] | None = None
    stop_reason: Literal["noise", "time-cap", "max-samples"] | None = None
    sm_clock_mhz: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    sm_clock_min_mhz: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    mem_clock_mhz: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    power_limit_w: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    power_w: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    temperature_c: Annotated[float, Field(ge=-100, le=1000, allow_inf_nan=False)] | None = None
    throttled: bool | None = None
    throttle_reasons: Annotated[str, Field(max_length=200, pattern=r"^[a-z;-]*$")] | None = None
    capture_error: Annotated[str, Field(max_length=2_000)] | None = None

    @field_validator("message", "memory_method", "capture_error")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        from bnbench.gate import printable

        return None if value is None else printable(value)

    @model_validator(mode="after")
    def _measured_rows_have_times(self) -> BenchResult:
        if self.status in MEASURED:
            missing = [
                name
                for name in ("median_s", "p20_s", "p80_s", "repetitions")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"a measured row without {', '.join(missing)}")
            assert self.p20_s is not None and self.p80_s is not None
            if not self.p20_s <= self.median_s <= self.p80_s:  # type: ignore[operator]
                raise ValueError("median_s is not between p20_s and p80_s")
            if self.kernel_s is not None and not (
                self.kernel_p20_s is not None
                and self.kernel_p80_s is not None
                and self.kernel_p20_s <= self.kernel_s <= self.kernel_p80_s
            ):
                raise ValueError("kernel_s is not between kernel_p20_s and kernel_p80_s")
        return self


def describe(error: ValidationError, limit: int = 3) -> str:
    """A validation error in one line: the field and what is wrong with it."""
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "result"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r:.60})"
        parts.append(f"{where}: {item['msg']}{shown}")
    more = len(error.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
