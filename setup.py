"""fitv2-jax: FiTv2 (flexible-resolution diffusion transformer) in JAX/Flax, TPU-first."""

from setuptools import find_packages, setup

setup(
    name="fitv2_jax",
    version="0.1.0",
    description="FiTv2 diffusion transformers in JAX/Flax: sharded training, any-resolution sampling, FID",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fitv2_jax", "fitv2_jax.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.10",
        "array-record>=0.7.0",
        "tensorflow-datasets>=4.9.7",
        "einops>=0.8.0",
        "ml-collections>=1.0.0",
        "clu>=0.0.12",
        "numpy>=1.26",
        "scipy>=1.11",
        "absl-py>=2.1.0",
        "diffrax>=0.6.2",
        "safetensors>=0.4.5",
        "pillow>=10.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "scikit-image>=0.22",
        "tensorboardx>=2.6",
        "pyyaml>=6.0",
    ],
    extras_require={
        # torch is pinned to the CPU wheel in launch/test.sh before this extra is installed.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch>=2.4",
            "diffusers>=0.31",
        ],
    },
)
