"""compiled's per-call time against builtin's at ResNet-50 BatchNorm shapes (a plain script).

    python suites/compiled_overhead_probe.py                # CUDA, bfloat16, channels_last
    python suites/compiled_overhead_probe.py --device cpu   # a smoke run on small shapes

For each shape and mode (``fwd``: a training forward whose input requires grad; ``fwd+bwd``: zero
the grads, forward, backward), each implementation is warmed up (the first call compiles), then
timed over back-to-back calls: ``call`` is CUDA events around the loop over the call count (what
a training step pays: the longer of host and GPU time, since launches are asynchronous),
``host`` the host's own time per call (perf_counter around the same loop, before the final
synchronize: the Python, dynamo guards, wrappers and launches). ``host`` close to ``call`` means
the call is host-bound. Each is the median of several repetitions; ``x`` is compiled over builtin.
``graphs`` counts graphs dynamo compiled during compiled's timed loops (should be 0). The first
lines calibrate the host: one eager kernel launch, and a compiled call of compiled's training
graph alone (dynamo guards, AOTAutograd's wrapper, inductor's launches, no autograd). Stops
before ``--budget`` seconds, so a stage time limit still gets the rows printed so far.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CUDA_SHAPES = (  # ResNet-50 BatchNorm inputs at 32 images (bnbench.gpu.RESNET50_BN), and one at 256
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 128, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (256, 256, 14, 14),
)
CPU_SHAPES = ((2, 8, 4, 4), (4, 16, 8, 8), (8, 64, 7, 7))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Per-call (call, host) seconds of ``step`` over ``calls`` back-to-back calls."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, step, calls: int) -> tuple[float, float]:
        sync(self.device)
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            for i in range(calls):
                step(i)
            host = time.perf_counter() - begin
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls, host / calls
        begin = time.perf_counter()
        for i in range(calls):
            step(i)
        host = time.perf_counter() - begin
        return host / calls, host / calls


def measure(timer: Timer, step, repeats: int, target_s: float) -> tuple[float, float]:
    """Median (call, host) per call, with the call count sized to ``target_s`` a repetition."""
    for i in range(3):  # warm-up: compilation, autotuning, allocator
        step(i)
    sync(timer.device)
    call, _ = timer(step, 3)
    calls = max(5, min(2000, int(target_s / max(call, 1e-6))))
    samples = [timer(step, calls) for _ in range(repeats)]
    return (
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
    )


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def make_steps(module, xs, gs):
    def fwd(i):
        return module(xs[i % len(xs)])

    def fwd_bwd(i):
        x = xs[i % len(xs)]
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(gs[i % len(gs)])

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument(
        "--memory-format", default="channels_last", choices=("channels_last", "contiguous")
    )
    parser.add_argument("--budget", type=float, default=100.0, help="seconds (default 100)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--static",
        action="store_true",
        help="compile every shape as static (torch._dynamo.config.automatic_dynamic_shapes "
        "off): one graph pair per shape, for comparing the kernels with the dynamic ones",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if args.static:
        torch._dynamo.config.automatic_dynamic_shapes = False

    from bnbench.implementations import compiled as compiled_module
    from bnbench.implementations.compiled import CompiledBatchNorm2d

    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    target_s = 0.02 if device == "cuda" else 0.05
    timer = Timer(device)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__}, {name}"
    else:
        torch.set_num_threads(1)
        versions = f"torch {torch.__version__}, cpu, 1 thread"
    print(f"# {versions}; {args.dtype} {args.memory_format}; modules in float32", flush=True)

    # Calibration: one eager launch, and compiled's training graph called alone (no autograd).
    small = torch.randn(64, device=device)
    call, host = measure(timer, lambda i: small.add_(1.0), args.repeats, target_s)
    print(f"# one eager op (add_ on 64 floats): call {call * 1e6:.1f} us, host {host * 1e6:.1f} us")
    probe = CompiledBatchNorm2d(64, device=device)
    x = torch.randn(32, 64, 7, 7, device=device, dtype=dtype).contiguous(memory_format=fmt)
    state = (
        probe.running_mean,
        probe.running_var,
        probe.num_batches_tracked,
        compiled_module._scalar(probe.eps, x.device),
        compiled_module._scalar(probe.momentum, x.device),
        probe.eps,
    )

    def graph_alone(i):
        with torch.no_grad():
            compiled_module._train_forward(x, probe.weight, probe.bias, state)

    call, host = measure(timer, graph_alone, args.repeats, target_s)
    print(
        f"# compiled's training graph alone, {tuple(x.shape)}: call {call * 1e6:.1f} us, "
        f"host {host * 1e6:.1f} us",
        flush=True,
    )

    print(
        f"{'shape':>22s} {'mode':>8s} {'builtin call':>13s} {'host':>7s} "
        f"{'compiled call':>14s} {'host':>7s} {'x':>6s} {'graphs':>6s}",
        flush=True,
    )
    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            if time.perf_counter() - began > args.budget:
                print(f"# budget of {args.budget:.0f} s spent: stopping", flush=True)
                return 0
            xs = [
                torch.randn(shape, device=device, dtype=dtype)
                .contiguous(memory_format=fmt)
                .requires_grad_()
                for _ in range(2)
            ]
            gs = [torch.randn_like(x) for x in xs]
            row = {}
            for impl, cls in (("builtin", torch.nn.BatchNorm2d), ("compiled", CompiledBatchNorm2d)):
                module = cls(shape[1], device=device)
                step = make_steps(module, xs, gs)[mode]
                step(0)  # compiles
                before = graphs()
                row[impl] = measure(timer, step, args.repeats, target_s)
                row[impl + "_graphs"] = graphs() - before
                del module
            (b_call, b_host), (c_call, c_host) = row["builtin"], row["compiled"]
            print(
                f"{str(shape):>22s} {mode:>8s} {b_call * 1e6:11.1f}us {b_host * 1e6:5.1f}us "
                f"{c_call * 1e6:12.1f}us {c_host * 1e6:5.1f}us {c_call / b_call:6.2f} "
                f"{row['compiled_graphs']:6d}",
                flush=True,
            )
    print(f"# {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
