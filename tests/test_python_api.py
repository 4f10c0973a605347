"""The README's "Python API" block, run as written on a random demo-sized checkpoint."""

import os
import re

import numpy as np
from safetensors.numpy import save_file

from fitv2_jax.config.files import load_config
from fitv2_jax.models.convert import to_torch_state_dict
from fitv2_jax.weights.fit import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_samples_two_sizes_and_scores_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the block names configs/ relative to the repository
    config = load_config("configs/demo_cpu.py")
    ckpt = str(tmp_path / "official.safetensors")
    save_file(to_torch_state_dict(random_params(config.model, seed=1), config.model), ckpt)
    code = _readme_block()
    assert '"demo_out/train"' in code and '"/tmp/fitv2_reference"' in code
    code = code.replace('"demo_out/train"', repr(ckpt))
    code = code.replace('"/tmp/fitv2_reference"', repr(str(tmp_path / "ref")))
    exec(compile(code, "README.md (Python API)", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[:2] for ln in lines] == [["32x32", "none"],
                                                ["16x64", "none"]]  # fmt: skip
    for line in lines:
        scores = eval(line.split(" ", 2)[2])  # the printed dict of scores
        assert np.isfinite(scores["fid"]) and scores["fid"] > 0
        assert 0 <= scores["precision"] <= 1 and scores["inception_score"] is None
