"""mb2po_jax: AWAC pretraining + MB2PO model-based fine-tuning for offline RL, in JAX."""
import sys

from setuptools import find_packages, setup

# The benchmarks (top-level `benchmarks/`, `mb2po-bench`) are a checkout's tool, not part of the library:
# an editable install (`pip install -e .`) maps them and installs the command; a wheel ships mb2po_jax alone.
EDITABLE = bool({"editable_wheel", "develop"} & set(sys.argv[1:]))
BENCH = ["benchmarks", "benchmarks.*"] if EDITABLE else []

setup(
    name="mb2po_jax",
    version="0.1.0",
    description=(
        "Fine-tuning offline RL with model-based policy optimisation (AWAC + MB2PO) in JAX"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mb2po_jax", "mb2po_jax.*", *BENCH]),
    package_data={"mb2po_jax": ["configs/*.json"], "mb2po_jax.behavior": ["assets/**/*"]},
    install_requires=[
        "jax>=0.4.35,<0.12",
        "flax>=0.10,<0.13",
        "optax>=0.2.3,<0.3",
        "distrax>=0.1.5,<0.2",
        "chex>=0.1.87,<0.2",
        "orbax-checkpoint>=0.11,<0.13",
        "absl-py>=2.0,<3",
        "mujoco>=3.1,<5",
        "gymnasium[mujoco]>=1.0,<2",
        "h5py>=3.10,<4",
        "numpy>=1.26,<3",
        "tensorboardX>=2.6.5,<3",  # TensorBoard event files (numpy + protobuf; no TensorFlow or torch)
    ],
    extras_require={
        "minari": ["minari[hdf5]>=0.5,<0.6"],
        # wheel: tests/test_config.py builds the package offline (pip wheel --no-build-isolation).
        # tensorboard: tests/test_logger.py reads the event files back with TensorBoard's own reader.
        # imageio, imageio-ffmpeg: tests/test_policy_eval.py records a video and checks a renderer's failure.
        "test": ["pytest>=8", "minari[hdf5]>=0.5,<0.6", "wheel", "matplotlib>=3.7", "tensorboard>=2.14,<3",
                 "imageio>=2.9", "imageio-ffmpeg>=0.4"],
        # Learning curves: `mb2po-plot` and `experiments/benchmark.py report`.
        "plot": ["matplotlib>=3.7"],
        # `mb2po-eval --video`: imageio's mp4 writer (imageio-ffmpeg ships an ffmpeg binary).
        "video": ["imageio>=2.9", "imageio-ffmpeg>=0.4"],
        # PyTorch reference implementations, only for `mb2po-bench ... --compare_torch`.
        "bench": ["torch>=2.2"],
    },
    entry_points={
        "console_scripts": [
            "mb2po-train=mb2po_jax.train:run",
            "mb2po-data=mb2po_jax.data.cli:run",
            "mb2po-eval=mb2po_jax.eval_cli:run",
            "mb2po-plot=mb2po_jax.plot:run",
        ] + (["mb2po-bench=benchmarks:run"] if EDITABLE else [])
    },
)
