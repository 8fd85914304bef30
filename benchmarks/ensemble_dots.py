"""The dynamics ensemble's three kinds of 200 x 200 layer matmul, alone, as fractions of the machine's matmul rate.

One training update of the 7-member ensemble (batch 256, feature-major activations [E, features, B], see
`dynamics.ensemble_mlp`) runs, per hidden 200 x 200 layer, a forward dot and two backward dots: the input gradient
(same layout as the forward) and the weight gradient, which contracts over the batch, the minor axis of
both operands. This times each alone (100 chained in one compiled scan), to separate what the matmul
kernels allow from what the rest of an update costs (`mb2po-bench dynamics` times whole updates).

    python -m benchmarks.ensemble_dots
    python -m benchmarks.ensemble_dots --eigen   # dots to Eigen, YNNPACK kept for reductions
    taskset -c 0 python -m benchmarks.ensemble_dots   # one core: against the one-core matmul rate
    python -m benchmarks.ensemble_dots --compare_torch   # + the same products in PyTorch's BLAS (MKL on x86)

`--eigen` compiles the timed functions with `compiler_options={"xla_cpu_experimental_ynn_fusion_type":
"LIBRARY_FUSION_TYPE_REDUCE"}`: a per-function XLA option, the rest of the process is untouched.
The last entry is the weight gradient as an NN dot on a transposed cotangent [E, B, O], the layout that
Eigen runs fastest. The transpose is made once, outside the timed loop, so the figure leaves out its cost.
`--compare_torch` times the same three products as `torch.bmm` (on x86 PyTorch's CPU build calls MKL) and
PyTorch's own square-1024 rate, right after, in the same process: what another BLAS makes of these shapes,
against its own square rate and against XLA's.
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import matmul_flops_per_s, time_call

E, I, O, B, R = 7, 200, 200, 256, 100


EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def chained(dot, compiler_options=None):
    """R dependent calls of `dot(w, h, g) -> [E, I, O]-shaped update` in one compiled scan. The scale s
    depends on the carry, so XLA can neither hoist the dot out of the loop nor constant-fold it."""

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(w, h, g):
        def body(w, _):
            s = 1.0 + 1e-9 * w[0, 0, 0]
            return 0.5 * w + 1e-3 * dot(w, h * s, g), None

        return jax.lax.scan(body, w, None, length=R)[0]

    return run


DOTS = {
    "forward     eio,eib->eob": lambda w, h, g: jnp.einsum("eio,eib->eob", w, h)[:, :, :O],
    "input grad  eio,eob->eib": lambda w, h, g: jnp.einsum("eio,eob->eib", w, g)[:, :, :O],
    "weight grad eib,eob->eio": lambda w, h, g: jnp.einsum("eib,eob->eio", h, g),
    # g is passed in as [E, B, O] for this one (see main)
    "weight grad eib,ebo->eio (transposed cotangent)": lambda w, h, g: jnp.einsum("eib,ebo->eio", h, g),
}


def torch_rates(min_time: float = 1.0) -> dict[str, float]:
    """Rates (FLOP/s) of torch.bmm on the same shapes and of torch's square 1024 matmul, timed best-of
    like the XLA products (`time_call`; torch CPU calls return when done), on as many threads as JAX's CPU
    client uses (the cores)."""
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)

    def rate(fn, flops):
        return flops / time_call(fn, min_time=min_time)

    w, h, g = torch.randn(E, I, O), torch.randn(E, I, B), torch.randn(E, O, B)
    w_t, a = w.transpose(1, 2).contiguous(), torch.randn(1024, 1024)
    one = 2.0 * E * I * O * B
    return {
        "forward     bmm(W^T, h)": rate(lambda: torch.bmm(w_t, h), one),
        "input grad  bmm(W, g)": rate(lambda: torch.bmm(w, g), one),
        "weight grad bmm(h, g^T)": rate(lambda: torch.bmm(h, g.transpose(1, 2)), one),
        "square 1024": rate(lambda: a @ a, 2.0 * 1024**3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eigen", action="store_true", help="give the dots to Eigen instead of YNNPACK")
    parser.add_argument("--compare_torch", action="store_true", help="also time the products in PyTorch")
    args = parser.parse_args()
    options = EIGEN_DOTS if args.eigen else None
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    w = 0.05 * jax.random.normal(keys[0], (E, I, O))
    h = jax.random.normal(keys[1], (E, I, B))
    g = 0.01 * jax.random.normal(keys[2], (E, O, B))
    flops = 2.0 * E * I * O * B * R
    peak = matmul_flops_per_s()
    rates = {}
    for name, dot in DOTS.items():
        fn = chained(dot, options)
        g_in = jnp.swapaxes(g, 1, 2) if "transposed" in name else g
        rates[name] = flops / time_call(lambda: fn(w, h, g_in), min_time=1.0)
    peak = max(peak, matmul_flops_per_s())
    for name, rate in rates.items():
        print(f"{name:50s} {rate / 1e9:6.1f} GFLOP/s = {rate / peak:.2f} of the matmul rate")
    print(f"matmul rate (square 1024, same process): {peak / 1e9:.0f} GFLOP/s; dots: "
          f"{'Eigen' if args.eigen else 'XLA:CPU default (YNNPACK)'}")
    if args.compare_torch:
        rates = torch_rates()
        square = rates.pop("square 1024")
        for name, rate in rates.items():
            print(f"torch {name:44s} {rate / 1e9:6.1f} GFLOP/s = {rate / square:.2f} of torch's square rate, "
                  f"{rate / peak:.2f} of XLA's")
        print(f"torch square 1024: {square / 1e9:.0f} GFLOP/s = {square / peak:.2f} x XLA's")


if __name__ == "__main__":
    main()
