"""mb2po_jax: AWAC offline pretraining and MB2PO model-based fine-tuning in JAX.

The functional API a researcher needs, importable from the top level:

    dataset = load_dataset("hopper-medium-replay-v2")        # or a path, a local name, a Minari id
    data = jax.device_put(dataset.transitions)                # device-resident Transitions
    state = awac.init_seeds(keys, obs_dim, act_dim, AWACConfig(), Normalizer.fit(data.observations))
    state, metrics = awac.make_train_steps(1000)(state, data) # 1000 fused updates for every seed
    actions = awac.act_seeds(state, obs)                      # deterministic, [S, N, act_dim]
    policy = load_policy("runs/hmr", stage="mb2po", seed=0)   # a trained workdir's actor: obs -> env action
"""

from mb2po_jax.version import __version__

from mb2po_jax import awac
from mb2po_jax.awac import AWACConfig, AWACState, Normalizer, act, act_seeds, update
from mb2po_jax.checkpoint import Checkpointer, load_pytree, save_pytree
from mb2po_jax.config import RunConfig, make_config
from mb2po_jax.behavior.generation import ensure_default_dataset
from mb2po_jax.data import (
    Dataset,
    Transitions,
    env_id_for,
    load_dataset,
    normalized_score,
    read_d4rl_hdf5,
    write_d4rl_hdf5,
)
from mb2po_jax.evaluation import EvalResult, evaluate
from mb2po_jax.policy import load_policy

__all__ = [
    "awac", "AWACConfig", "AWACState", "Normalizer", "act", "act_seeds", "update",
    "Checkpointer", "save_pytree", "load_pytree", "RunConfig", "make_config",
    "Dataset", "Transitions", "load_dataset", "ensure_default_dataset", "env_id_for",
    "normalized_score", "read_d4rl_hdf5", "write_d4rl_hdf5", "EvalResult", "evaluate", "load_policy",
]
