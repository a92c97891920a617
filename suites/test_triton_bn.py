"""The built-in ``triton`` implementation (implementations/triton_bn.py).

Four layers, each where it can run:

1. everywhere (CI has no triton and no GPU): the module imports, and on CPU the implementation
   is "not supported" with the reason, through the registry and the CLI;
2. where triton is installed: the real gate, in a subprocess under Triton's interpreter
   (TRITON_INTERPRET=1 BNBENCH_TRITON_ON_CPU=1), on a representative set of cases, and the
   split statistics merged from many splits against a float64 reference;
3. where triton is installed: every kernel variant that representative calls launch compiled
   for Hopper (sm_90) with the ptxas triton ships; no GPU or driver needed;
4. on a CUDA device: the modules against nn.BatchNorm for the layouts and dtypes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bnbench.implementations import triton_bn
from bnbench.implementations.vectorized import to_canonical
from bnbench.registry import Config

from helpers import bnbench

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
needs_cuda = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device"
)

CUDA_ONLY = "Triton kernels run on CUDA devices only"
NOT_INSTALLED = "needs the triton package (not installed)"


def _env(**changes: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "BNBENCH_TRITON_ON_CPU")
    }
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


# ---------------------------------------------------------------------------------------------
# 1. Everywhere


def test_not_supported_on_cpu_with_the_reason():
    impl = triton_bn.triton_impl
    assert impl.name == "triton" and not impl.supports_double_backward
    assert impl.deviation_for("forward_ad-rank4")
    reasons = impl.not_supported_reasons(Config(rank=4, device="cpu"))
    if triton_bn.triton is None:
        assert reasons == ["device cpu not supported", f"{CUDA_ONLY}; {NOT_INSTALLED}"]
        assert impl.not_supported_reasons(Config(rank=4, device="cuda")) == [NOT_INSTALLED]
    elif triton_bn._ON_CPU:  # this pytest runs under the interpreter, asked to run on CPU
        assert reasons == []
    else:
        assert reasons == ["device cpu not supported", CUDA_ONLY]
        assert impl.not_supported_reasons(Config(rank=4, device="cuda")) == []


def test_module_imports_without_triton_and_says_so():
    """``import triton`` failing (CI) leaves a module that imports, builds modules and gives
    both reasons on CPU."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton raises ImportError
        from bnbench.registry import Config
        from bnbench.implementations import triton_bn
        assert triton_bn.triton is None
        module = triton_bn.TritonBatchNorm2d(3)
        assert module.running_var.tolist() == [1.0, 1.0, 1.0]
        print(triton_bn.unsupported_reason(Config(rank=4, device="cpu")))
        print(triton_bn.unsupported_reason(Config(rank=4, device="cuda")))
        """
    )
    env = _env(TRITON_INTERPRET="1", BNBENCH_TRITON_ON_CPU="1")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{CUDA_ONLY}; {NOT_INSTALLED}", NOT_INSTALLED]


def test_cli_verify_on_cpu_is_all_not_supported(tmp_path, monkeypatch):
    """Without the interpreter switch, every case is n/s with the reason, and since nothing
    was verified the gate exits 1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("BNBENCH_TRITON_ON_CPU", raising=False)
    result = bnbench(
        "verify", "--impl", "triton", "--device", "cpu", "--case", "default*", "-v", cwd=tmp_path
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert CUDA_ONLY in result.stdout
    assert "nothing was verified" in result.stdout
    # registered through the entry point, as a third-party package would be
    listed = bnbench("list", cwd=tmp_path)
    assert listed.returncode == 0 and "triton" in listed.stdout


# ---------------------------------------------------------------------------------------------
# 2. The gate under Triton's interpreter

# What the interpreter runs in well under a minute on 2 cores: large offsets, sizes with tiling
# tails and several splits, channels_last, half dtypes, float64, momentum=None, affine=False,
# bias=False, eval, backward (input, parameters, odd grad layouts), errors.
INTERPRETER_CASES = [
    "default-rank*",
    "large_offset-rank*",
    "constant_channel-rank4",
    "variance_at_eps-rank4",
    "bfloat16_bessel_300-rank3",
    "zero_batch-rank4",
    "mode_from_training_flag-rank4",
    "eps_zero-rank4",
    "size_63_c13-rank4",
    "size_1025_c11-rank4",
    "size_4205_c3-rank4",
    "size_65557_c2-rank2",
    "batch_129_c11-rank2",
    "channels_last-rank*",
    "channels_last_float16-rank4",
    "float16-rank3",
    "bfloat16-rank4",
    "float16_count_4098-rank3",
    "float64-rank5",
    "momentum_none-rank4",
    "momentum_none_varying_batch-rank2",
    "not_affine-rank3",
    "not_affine_no_running_stats-rank4",
    "bias_false-rank4",
    "eval_first-rank4",
    "no_running_stats-rank2",
    "non_contiguous-rank2",
    "gradcheck_train-rank4",
    "gradcheck_eval-rank3",
    "grad_params_only-rank4",
    "frozen_affine-rank3",
    "grad_output_permuted-rank2",
    "grad_output_channels_last-rank4",
    "grad_output_contiguous_for_channels_last-rank5",
    "forward_ad-rank4",
    "wrong_channels-rank4",
    "one_value_per_channel-rank2",
]


@needs_triton
def test_gate_under_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BNBENCH_TRITON_ON_CPU", "1")
    args = ["verify", "--impl", "triton", "--device", "cpu", "--json", str(tmp_path / "r.json")]
    for case in INTERPRETER_CASES:
        args += ["--case", case]
    # cwd: a directory without a stale bnbench.egg-info, whose entry points the workers
    # would otherwise read first
    result = bnbench(*args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    verdicts = {
        r["case"]: r["verdict"] for r in json.loads((tmp_path / "r.json").read_text())["results"]
    }
    assert len(verdicts) >= 40
    assert verdicts.pop("forward_ad-rank4") == "deviation"
    assert set(verdicts.values()) == {"pass"}, verdicts


SPLIT_SCRIPT = """
import torch
from bnbench.implementations import triton_bn as T

# many splits and chunks: the merge of partials is what is checked
T._sm_count = lambda device: 64
T._REDUCTION_TILE = 64
plans = []
split = T._split
T._split = lambda *args: plans.append(split(*args)) or plans[-1]
torch.manual_seed(0)
for shape, fmt, dtype in [
    ((7, 3, 37, 5), None, torch.float32),
    ((7, 3, 37, 5), torch.channels_last, torch.float32),
    ((1000, 5), None, torch.float32),
    ((9, 4, 61), None, torch.float16),
    ((7, 3, 37, 5), None, torch.float64),
]:
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    offset = 60.0 if dtype == torch.float16 else 1e4  # |mean|/std up to 2e4 (120 in float16)
    means = offset * torch.linspace(-1, 1, c, dtype=torch.float64).view(view)
    x = (torch.randn(shape, dtype=torch.float64) * 0.5 + means).to(dtype)
    x64 = x.double()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    cls = {2: T.TritonBatchNorm1d, 3: T.TritonBatchNorm1d, 4: T.TritonBatchNorm2d}[x.dim()]
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = cls(c, momentum=None, dtype=module_dtype)
    x.requires_grad_()
    y = m(x)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    y.backward(g)
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // c
    mean = x64.mean(dims)
    var = x64.var(dims, unbiased=False)
    xhat = (x64 - mean.view(view)) / (var.view(view) + m.eps).sqrt()
    g64 = g.double()
    dx = (g64 - g64.mean(dims, keepdim=True) - xhat * (g64 * xhat).mean(dims, keepdim=True)) / (
        var.view(view) + m.eps
    ).sqrt()
    # The statistics tightly (a merge that dropped the spread between the splits' means is off
    # by about 1/count per split); what is normalized with them up to the rounding every
    # faithful kernel makes at |mean|/std = 2e4: a few machine epsilons of |x| / std.
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-10}[dtype]
    eps = torch.finfo(module_dtype).eps
    invstd = 1 / (var + m.eps).sqrt()
    cond = 8 * eps * x64.abs() * invstd.view(view)
    checks = {
        "running_mean": (m.running_mean, mean, 0.0),
        "running_var": (m.running_var, var * n / (n - 1), 0.0),
        "y": (y, xhat, cond),
        "dx": (x.grad, dx, 2 * cond * invstd.view(view)),
        "grad_weight": (m.weight.grad, (g64 * xhat).sum(dims), (g64.abs() * cond).sum(dims)),
        "grad_bias": (m.bias.grad, g64.sum(dims), 0.0),
    }
    for name, (got, want, rounding) in checks.items():
        excess = (got.detach().double() - want).abs() - tol * (1 + want.abs()) - rounding
        assert float(excess.max()) <= 0, (shape, fmt, dtype, name, float(excess.max()))
    assert fmt is None or y.is_contiguous(memory_format=fmt)
    assert min(plan.splits for plan in plans[-2:]) >= 8, plans[-2:]  # forward and backward
print("ok")
"""


@needs_triton
def test_many_splits_under_the_interpreter():
    """Statistics merged from many splits, tiles with tails, |mean|/std = 2e4: the shifted
    sums and Chan's merge against float64 (running stats, output, every gradient)."""
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT],
        capture_output=True,
        text=True,
        env=_env(TRITON_INTERPRET="1", BNBENCH_TRITON_ON_CPU="1"),
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# 3. Compiled for sm_90 without a GPU


def _recorded_launches() -> list:
    """Every launch of representative calls, recorded instead of run (tensors on the meta
    device: the launch arguments, block sizes and flags are those of the real shapes)."""
    launches = []
    original_launch, original_sms = triton_bn._launch, triton_bn._sm_count
    triton_bn._launch = lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta))
    triton_bn._sm_count = lambda device: 132  # an H100's SMs
    classes = {2: triton_bn.TritonBatchNorm1d, 3: triton_bn.TritonBatchNorm1d}
    classes.update({4: triton_bn.TritonBatchNorm2d, 5: triton_bn.TritonBatchNorm3d})
    try:
        scenarios = [
            ((256, 64, 112, 112), None, torch.float32, {}),
            ((256, 64, 112, 112), torch.channels_last, torch.float16, {}),
            ((256, 2048, 7, 7), None, torch.bfloat16, {}),
            ((256, 2048, 7, 7), torch.channels_last, torch.float32, dict(momentum=None)),
            ((50432, 768), None, torch.float32, dict(bias=False)),
            ((4, 6, 5, 3, 2), torch.channels_last_3d, torch.float64, {}),
            ((64, 9, 1), None, torch.float32, dict(affine=False)),
        ]
        for shape, fmt, dtype, kwargs in scenarios:
            module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            m = classes[len(shape)](shape[1], device="meta", dtype=module_dtype, **kwargs)
            x = torch.empty(shape, device="meta", dtype=dtype)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            x.requires_grad_()
            for training in (True, False):
                m.train(training)
                y = m(x)
                y.backward(torch.empty_like(y))
        # a transposed 2-D input and grad, gradients of the parameters only
        m = triton_bn.TritonBatchNorm1d(32, device="meta")
        x = torch.empty(32, 100, device="meta").t()
        for training in (True, False):
            m.train(training)
            m(x).backward(torch.empty(32, 100, device="meta").t())
    finally:
        triton_bn._launch, triton_bn._sm_count = original_launch, original_sms
    return launches


def _spill_stores(ptx: str, tmp_path) -> int:
    """Bytes of register spill stores ptxas reports for ``ptx`` (triton's own ptxas)."""
    import re

    from triton import knobs

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    log = subprocess.run(
        [knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", str(source), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


@needs_triton
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    """What the JIT would compile for these calls on an H100, compiled here for sm_90: a
    kernel that would not compile for Hopper (or spills) fails here, without a GPU."""
    if triton_bn._INTERPRETED:
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    try:
        backend = make_backend(target)
    except Exception as exc:  # a triton without its NVIDIA backend
        pytest.skip(f"no CUDA backend in this triton: {exc}")
    compiled = {}
    for kernel, args, meta in _recorded_launches():
        # as JITFunction.run specializes a launch, without asking a driver for the target
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **meta)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, meta, bound, specialization, options
        )
        key = (kernel.__name__, repr(signature), repr(constexprs), repr(attrs))
        if key in compiled:
            continue
        source = ASTSource(kernel, signature, constexprs, attrs)
        binary = triton.compile(source, target=target, options=options.__dict__)
        assert binary.asm["cubin"], key
        assert _spill_stores(binary.asm["ptx"], tmp_path) == 0, f"{key}: spills registers"
        compiled[key] = binary
    names = {key[0] for key in compiled}
    assert names == {
        "_stats_partial_kernel",
        "_stats_finalize_kernel",
        "_normalize_kernel",
        "_grad_partial_kernel",
        "_grad_finalize_kernel",
        "_grad_input_kernel",
    }
    assert len(compiled) >= 30


def test_launch_plans_fill_an_h100():
    """The split reductions put a few programs on each of 132 SMs for ResNet-50's shapes, one
    read of each element per pass, contiguous runs in both layouts."""
    geometry, blocks, split = triton_bn._geometry, triton_bn._blocks, triton_bn._split
    sms = triton_bn._sm_count
    try:
        triton_bn._sm_count = lambda device: 132
        for shape, fmt in [
            ((256, 64, 112, 112), None),
            ((256, 64, 112, 112), torch.channels_last),
            ((256, 2048, 7, 7), None),
            ((256, 2048, 7, 7), torch.channels_last),
            ((50432, 768), None),
        ]:
            x = torch.empty(shape, device="meta")
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            g = geometry(to_canonical(x)[0])
            b = blocks(g, triton_bn._REDUCTION_TILE)
            s = split(g, b, torch.device("cuda"))
            programs = s.c_blocks * s.splits
            assert 2 * 132 <= programs <= 8 * 132, (shape, fmt, s)
            # every chunk is read by exactly one program
            assert (s.splits - 1) * s.per_split < s.chunks <= s.splits * s.per_split
            contiguous_run = b.block_c if g.strides[1] == 1 else b.block_l
            assert contiguous_run >= 32, (shape, fmt, b)
    finally:
        triton_bn._sm_count = sms


# ---------------------------------------------------------------------------------------------
# 4. On a CUDA device

CUDA_LAYOUTS = [
    ((16, 8), None),
    ((8, 6, 33), None),
    ((4, 8, 13, 11), None),
    ((4, 8, 13, 11), torch.channels_last),
    ((2, 5, 6, 7, 3), None),
    ((2, 5, 6, 7, 3), torch.channels_last_3d),
    ((32, 64, 56, 56), torch.channels_last),
    ((8, 256, 7, 7), None),
]
_BUILTIN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_TRITON = {
    2: triton_bn.TritonBatchNorm1d,
    3: triton_bn.TritonBatchNorm1d,
    4: triton_bn.TritonBatchNorm2d,
    5: triton_bn.TritonBatchNorm3d,
}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,fmt", CUDA_LAYOUTS)
@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False), dict(bias=False)])
def test_matches_nn_batchnorm_on_cuda(shape, fmt, dtype, kwargs):
    torch.manual_seed(0)
    c = shape[1]
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, device="cuda") * 2 + torch.randn(c, device="cuda").view(view) * 50
    x = x.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    ours = _TRITON[len(shape)](c, device="cuda", dtype=module_dtype, **kwargs)
    ref = _BUILTIN[len(shape)](c, device="cuda", dtype=module_dtype, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.normal_(1, 0.3)
            ref.weight.copy_(ours.weight)
            if ours.bias is not None:
                ours.bias.normal_()
                ref.bias.copy_(ours.bias)
    rtol, atol = {
        torch.float32: (1e-4, 1e-4),
        torch.float16: (4e-3, 4e-3),
        torch.bfloat16: (3e-2, 3e-2),
        torch.float64: (1e-9, 1e-9),
    }[dtype]
    for step, training in enumerate((True, True, False, True, False)):
        ours.train(training)
        ref.train(training)
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert ya.dtype == x.dtype, step
        assert ya.is_contiguous(memory_format=fmt or torch.contiguous_format), step
        torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
        grad = torch.randn_like(yb)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol * 10)
        for name in ("weight", "bias"):
            p, q = getattr(ours, name), getattr(ref, name)
            if p is not None:
                scale = float(q.grad.abs().max()) + 1
                torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol * scale)
                p.grad = q.grad = None
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@needs_cuda
def test_gate_on_cuda(tmp_path):
    result = bnbench("verify", "--impl", "triton", "--device", "cuda", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@needs_cuda
def test_training_step_does_not_synchronize_with_the_host():
    """momentum=None reads num_batches_tracked on the device: a training step (forward and
    backward) queues kernels without waiting for the GPU."""
    m = triton_bn.TritonBatchNorm2d(64, momentum=None, device="cuda")
    x = torch.randn(8, 64, 28, 28, device="cuda", requires_grad=True)
    m(x).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
