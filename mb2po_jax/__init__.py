"""mb2po_jax: AWAC offline pretraining and MB2PO model-based fine-tuning in JAX."""

__version__ = "0.1.0"
