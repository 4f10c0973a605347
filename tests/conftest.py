"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its pytest workers and the commands the tests
# start: the same programs (the Inception, tiny models) are compiled once, not in every process.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fitv2_jax_jit_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption("--multihost", action="store_true",
                     help="run the multi-process tests (launch/test_multihost.sh)")  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "multihost: several processes joined by jax.distributed")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--multihost"):
        return
    skip = pytest.mark.skip(reason="multi-process: run by bash launch/test_multihost.sh")
    for item in items:
        if "multihost" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_px(tmp_path_factory):
    """A pixel-space dataset of the demo photos (84 crops, <= 64 tokens, 2x2 patches)."""
    from fitv2_jax.data.encoders import PixelEncoder
    from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
    from fitv2_jax.data.sources import open_source

    out = str(tmp_path_factory.mktemp("demo_px"))
    prepare_split(open_source("demo", demo_crops=12), PixelEncoder(),
                  PrepareSettings(out=out, max_tokens=64, patch_size=2, progress=False))  # fmt: skip
    return out
