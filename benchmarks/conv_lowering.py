"""Times the conv/pool lowerings of tljax.ops on the DANN digit feature extractor.

Workload: NHWC 28x28x3 input, batch 256, conv5x5x32 VALID -> ReLU -> maxpool 2x2/2 ->
conv5x5x48 VALID -> ReLU -> maxpool 2x2/2; loss = sum of the outputs; gradients w.r.t. all
parameters (which needs the gradient w.r.t. the input of the 2nd conv, but not of the image
unless --input_grad). A square fp32 matmul gives the machine's reference GFLOP/s.

FLOPs are 2 * MACs per convolution pass: one pass forward, and in the backward pass one for
each kernel gradient plus one for each input gradient that is computed (conv 2 always, conv 1
only with --input_grad). Pooling, ReLU and bias adds are not counted.

With --layers it instead times single convolutions (forward + both gradients) of the digit
net and of ResNet under every lowering: the measurements behind conv_lowering's auto rule.

Usage:
  python benchmarks/conv_lowering.py [--batch 256] [--iters 20] [--impls xla,im2col,auto]
  python benchmarks/conv_lowering.py --layers
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tljax import host, ops  # noqa: E402

# (kernel, cin, cout) of the two convolutions; both VALID, stride 1.
_CONVS = ((5, 3, 32), (5, 32, 48))


def _digit_features(params, x, impl):
    for i in range(len(_CONVS)):
        y = ops.conv2d(x, params[f"k{i}"], padding="VALID", impl=impl) + params[f"b{i}"]
        x = ops.max_pool(jax.nn.relu(y), (2, 2), impl=impl)
    return x


# (name, input NHWC, kernel side, cout, padding) for --layers.
_LAYERS = (
    ("digit conv1 5x5x3->32", (256, 28, 28, 3), 5, 32, "VALID"),
    ("digit conv2 5x5x32->48", (256, 12, 12, 32), 5, 48, "VALID"),
    ("ConvNet8 conv2 3x3x32->32 (28x28)", (128, 28, 28, 32), 3, 32, "SAME"),
    ("ConvNet8 conv4 3x3x64->64 (14x14)", (128, 14, 14, 64), 3, 64, "SAME"),
    ("ResNet 3x3x64->64 (56x56)", (32, 56, 56, 64), 3, 64, "SAME"),
    ("ResNet 3x3x128->128 (28x28)", (32, 28, 28, 128), 3, 128, "SAME"),
    ("ResNet 3x3x256->256 (14x14)", (32, 14, 14, 256), 3, 256, "SAME"),
)


def _layer_table(impls: list[str], iters: int, warmup: int) -> None:
    """Prints ms for forward + input and kernel gradients of each of _LAYERS under `impls`."""
    print("| layer | batch | " + " | ".join(impls) + " | auto picks |")
    print("|---|---|" + "---|" * (len(impls) + 1))
    for name, shape, k, cout, padding in _LAYERS:
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], cout)) * 0.05
        fns = {
            impl: jax.jit(
                jax.grad(
                    lambda x, w, impl=impl, pad=padding: jnp.sum(
                        ops.conv2d(x, w, 1, pad, impl) ** 2
                    ),
                    argnums=(0, 1),
                )
            )
            for impl in impls
        }
        times = _time_interleaved(fns, (x, kernel), iters, warmup)
        cells = " | ".join(f"{times[impl][0]:.1f}" for impl in impls)
        picked = ops.conv_lowering("auto", kernel.shape, (1, 1))
        print(f"| {name} | {shape[0]} | {cells} | {picked} |")


def _conv_macs(batch: int, size: int) -> list[int]:
    macs = []
    for k, cin, cout in _CONVS:
        out = size - k + 1
        macs.append(batch * out * out * k * k * cin * cout)
        size = out // 2
    return macs


def _time_interleaved(fns: dict, args, iters: int, warmup: int) -> dict:
    """name -> (median, min) wall ms of ``fn(*args)`` for each jitted fn.

    Samples of the different functions are interleaved so that load from other processes
    (shared dev boxes) biases all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        # Rotate the order too: a run right after a memory-hungry one is slower.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=28, help="input height = width")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--impls",
        default=None,
        help="comma-separated conv impls (default: xla,im2col; with --layers: im2col,winograd)",
    )
    parser.add_argument("--matmul", type=int, default=1536, help="square matmul size (0: skip)")
    parser.add_argument("--input_grad", action="store_true", help="also differentiate the image")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layers", action="store_true", help="per-layer table (ms, median)")
    args = parser.parse_args(argv)
    host.retain_freed_memory()  # As in training (tljax/host.py).
    if args.layers:
        _layer_table((args.impls or "im2col,winograd").split(","), args.iters, args.warmup)
        return

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(_CONVS) + 1)
    x = jax.random.normal(keys[0], (args.batch, args.size, args.size, 3), dtype)
    params = {}
    for i, (k, cin, cout) in enumerate(_CONVS):
        scale = (k * k * cin) ** -0.5
        params[f"k{i}"] = (jax.random.normal(keys[2 * i + 1], (k, k, cin, cout)) * scale).astype(
            dtype
        )
        params[f"b{i}"] = jnp.zeros((cout,), dtype)

    macs = _conv_macs(args.batch, args.size)
    fwd_flops = 2 * sum(macs)
    bwd_flops = 2 * sum(macs) + 2 * sum(macs[1:]) + (2 * macs[0] if args.input_grad else 0)
    argnums = (0, 1) if args.input_grad else 0

    rows = []
    ref_rate = None
    if args.matmul:
        n = args.matmul
        a = jax.random.normal(keys[-1], (n, n), jnp.float32)
        med, best = _time_interleaved(
            {"mm": jax.jit(lambda a: a @ a)}, (a,), args.iters, args.warmup
        )["mm"]
        ref_rate = 2 * n**3 / med / 1e6
        rows.append((f"matmul {n}x{n}x{n} fp32", "", med, best, 2 * n**3))

    fns, flops = {}, {}
    for impl in (args.impls or "xla,im2col").split(","):
        loss = lambda p, x, impl=impl: jnp.sum(_digit_features(p, x, impl).astype(jnp.float32))
        fns[(impl, "fwd")] = jax.jit(loss)
        fns[(impl, "fwd+bwd")] = jax.jit(jax.value_and_grad(loss, argnums=argnums))
        flops[(impl, "fwd")] = fwd_flops
        flops[(impl, "fwd+bwd")] = fwd_flops + bwd_flops
    for key, (med, best) in _time_interleaved(fns, (params, x), args.iters, args.warmup).items():
        rows.append((*key, med, best, flops[key]))

    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
        f"batch={args.batch} dtype={args.dtype} iters={args.iters} (median; min in brackets)"
    )
    print()
    print("| impl | pass | ms/iter | GFLOP/s | fraction of matmul |")
    print("|---|---|---|---|---|")
    for impl, name, med, best, flops in rows:
        rate = flops / med / 1e6
        frac = f"{rate / ref_rate:.2f}" if ref_rate else "-"
        print(f"| {impl} | {name} | {med:.1f} ({best:.1f}) | {rate:.1f} | {frac} |")


if __name__ == "__main__":
    main()
