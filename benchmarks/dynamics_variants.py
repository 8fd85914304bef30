"""Same-process A/B of alternative schedules for one dynamics-ensemble update (none is used by the library).

Each variant compiles `dynamics.make_train_epoch`'s epoch with one piece swapped, and all of them are timed
in one process, one call each in turn, so the shared machine's drift hits all of them alike. Printed: the
median over rounds of (today's time / the variant's time), > 1 = faster, and the fastest call of each.
RESULTS.md ("Evidence behind design choices") records a run.

    python -m benchmarks.dynamics_variants [--rounds 8] [--updates 100]

Variants:
- nn_wgrad_eigen: a custom VJP per layer whose weight gradient is the NN dot `eib,ebo->eio` on a
  transposed cotangent (held apart by an optimization barrier, or XLA folds the transpose back into the
  dot), with the dots given to Eigen (the per-function compiler option of `ensemble_dots.py --eigen`).
- eigen: today's code with the dots given to Eigen.
- groups_4_3: the loss as two independent sub-ensembles (members 0-3 and 4-6).
- ordered: a custom VJP computing the input gradient, then the weight gradient, each layer after the
  last (barriers), so no two backward dots share the cores.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.ensemble_dots import EIGEN_DOTS
from mb2po_jax import dynamics as dyn

barrier = jax.lax.optimization_barrier


def dense_layer(weight_grad: str):
    """h [E, I, B] -> W^T h + b [E, O, B] with a hand-written backward."""

    @jax.custom_vjp
    def dense(w, b, h):
        return jnp.einsum("eio,eib->eob", w, h) + jnp.swapaxes(b, 1, 2)

    def fwd(w, b, h):
        return dense(w, b, h), (w, h)

    def bwd(res, g):
        w, h = res
        db = jnp.swapaxes(jnp.sum(g, axis=2, keepdims=True), 1, 2)
        if weight_grad == "transposed":
            dh = jnp.einsum("eio,eob->eib", w, g)
            dw = jnp.einsum("eib,ebo->eio", h, barrier(jnp.swapaxes(g, 1, 2)))
        else:  # "ordered": input gradient, then weight gradient, then the layer below
            dh = jnp.einsum("eio,eob->eib", w, g)
            dh, g = barrier((dh, g))
            dw = jnp.einsum("eib,eob->eio", h, g)
            dh, dw = barrier((dh, dw))
        return dw, db, dh

    dense.defvjp(fwd, bwd)
    return dense


def mlp_with(dense):
    def mlp(params, x):
        if x.ndim == 2:  # shared inputs (holdout evaluation): today's code
            return ORIGINAL["ensemble_mlp"](params, x)
        layers = params["layers"]
        h = barrier(jnp.swapaxes(x, -1, -2))
        for i, layer in enumerate(layers):
            h = dense(layer["w"], layer["b"], h)
            if i < len(layers) - 1:
                h = dyn.swish(h)
        return h

    return mlp


def grouped_loss(params, inputs, targets, config):
    total, parts = 0.0, []
    for lo, hi in ((0, 4), (4, config.num_members)):
        sub = jax.tree_util.tree_map(lambda p: p[lo:hi], params)
        loss, aux = ORIGINAL["ensemble_loss"](sub, inputs[lo:hi], targets[lo:hi], config)
        total, parts = total + loss, parts + [aux]
    aux = {k: jnp.concatenate([a[k] for a in parts]) if parts[0][k].ndim else sum(a[k] for a in parts)
           for k in parts[0]}
    return total, aux


ORIGINAL = {"ensemble_mlp": dyn.ensemble_mlp, "ensemble_loss": dyn.ensemble_loss}
VARIANTS = {  # name: (module attributes to swap, compiler options)
    "today": ({}, None),
    "nn_wgrad_eigen": ({"ensemble_mlp": mlp_with(dense_layer("transposed"))}, EIGEN_DOTS),
    "eigen": ({}, EIGEN_DOTS),
    "groups_4_3": ({"ensemble_loss": grouped_loss}, None),
    "ordered": ({"ensemble_mlp": mlp_with(dense_layer("ordered"))}, None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args()
    cfg = dyn.DynamicsConfig()
    obs_dim, act_dim, n = 11, 3, args.updates * cfg.batch_size
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (n + 256, obs_dim + act_dim))
    y = jnp.tanh(x[:, : obs_dim + 1])
    train, holdout = {"inputs": x[:n], "targets": y[:n]}, {"inputs": x[n:], "targets": y[n:]}
    state = dyn.init_dynamics(key, obs_dim, act_dim, cfg, train["inputs"])
    data = dyn.make_epoch_data(key, state, train, holdout)
    budget = jnp.int32(args.updates)
    epoch_fn = dyn.make_train_epoch.__wrapped__(cfg).__wrapped__  # the unjitted epoch (lru_cache, jit)

    compiled = {}
    for name, (swaps, options) in VARIANTS.items():
        for attr, value in swaps.items():
            setattr(dyn, attr, value)
        try:
            compiled[name] = jax.jit(epoch_fn, compiler_options=options).lower(state, data, key, budget).compile()
        finally:
            for attr, value in ORIGINAL.items():
                setattr(dyn, attr, value)

    reference = None
    for name, fn in compiled.items():  # same numbers up to float reassociation
        w = fn(state, data, key, budget)[0].params["layers"][2]["w"]
        reference = w if reference is None else reference
        print(f"{name:15s} max |W - W_today| after the epoch: {float(jnp.max(jnp.abs(w - reference))):.1e}")
    times = {name: [] for name in compiled}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, data, key, budget))
            times[name].append(time.perf_counter() - t0)
    base = np.array(times["today"])
    for name, ts in times.items():
        ts = np.array(ts)
        print(f"{name:15s} speed vs today (median of rounds) {np.median(base / ts):.3f}; "
              f"fastest {ts.min() / args.updates * 1e3:.2f} ms per update")


if __name__ == "__main__":
    main()
