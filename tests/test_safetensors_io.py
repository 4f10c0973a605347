"""Reading .safetensors without safetensors.numpy: bfloat16 included, damaged files named."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.safetensors_io import read_safetensors


def test_every_dtype_reads_back_as_torch_wrote_it(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "f32": torch.randn(2, 2, 2),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(7),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    got = read_safetensors(path)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(np.asarray(got[name], np.float64), want.double().numpy())
        assert got[name].shape == tuple(want.shape)


@pytest.mark.parametrize("content", [b"", b"\x00" * 40, b"\xff" * 4096, b"\x10\x00\x00\x00"
                                     b"\x00\x00\x00\x00{not json]}"], ids=["empty", "zeros",
                                     "random", "bad-json"])  # fmt: skip
def test_damaged_files_are_user_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="bad.safetensors"):
        read_safetensors(str(path))


def test_a_truncated_tensor_is_named(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(64)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-16])
    with pytest.raises(UserError, match="tensor 'w' is malformed"):
        read_safetensors(path)
