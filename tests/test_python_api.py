"""The README's "Python API" block, run as written on a random demo-sized checkpoint."""

import os
import re

import numpy as np
from safetensors.numpy import save_file

from fitv2_jax.config.files import load_config
from fitv2_jax.models.convert import to_torch_state_dict
from fitv2_jax.sampling import SolverOptions
from fitv2_jax.weights.fit import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_blocks() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Python API") : readme.index("## Design")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_one_call_load_and_generate_on_random_weights(tmp_path):
    """The first block with the demo's pixel-space config and random weights (no files)."""
    code = _readme_blocks()[0]
    assert '"configs/fitv2_xl.py", "FiTv2_XL.safetensors", vae=' in code
    code = code.replace('"configs/fitv2_xl.py", "FiTv2_XL.safetensors", vae="/weights/sd-vae-ft-ema"',
                        '"configs/demo_cpu.py", "random"')  # fmt: skip
    code = code.replace('["256x256", "320x320"]', '["32x32", "48x48"]')
    code = code.replace("labels=[207, 360, 387, 974]", "labels=[1, 2, 3, 4], options=OPTIONS")
    scope = {"OPTIONS": SolverOptions("euler", num_steps=2)}
    exec(compile(code, "README.md (Python API, first block)", "exec"), scope)
    images = scope["images"]
    assert images["32x32"].shape == (4, 32, 32, 3) and images["48x48"].shape == (4, 48, 48, 3)
    assert images["32x32"].dtype == np.uint8 and images["32x32"].std() > 0


def test_readme_python_api_samples_two_sizes_and_scores_them(tmp_path, capsys, monkeypatch):
    """The second block on a run directory: a random demo-sized model saved as one of our runs
    would need training, so the block's run is replaced by an official-layout file and its
    config, which `Generator.load` takes the same way."""
    monkeypatch.chdir(ROOT)  # the block names configs/ relative to the repository
    config = load_config("configs/demo_cpu.py")
    ckpt = str(tmp_path / "official.safetensors")
    save_file(to_torch_state_dict(random_params(config.model, seed=1), config.model), ckpt)
    code = _readme_blocks()[1]
    assert 'Generator.load(None, "demo_out/train"' in code and '"/tmp/fitv2_reference"' in code
    code = code.replace('Generator.load(None, "demo_out/train"',
                        f'Generator.load("configs/demo_cpu.py", {ckpt!r}')  # fmt: skip
    code = code.replace('"/tmp/fitv2_reference"', repr(str(tmp_path / "ref")))
    exec(compile(code, "README.md (Python API)", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["32x32", "16x64"]
    for line in lines:
        scores = eval(line.split(" ", 1)[1])  # the printed dict of scores
        assert np.isfinite(scores["fid"]) and scores["fid"] > 0
        assert 0 <= scores["precision"] <= 1 and scores["inception_score"] is None
