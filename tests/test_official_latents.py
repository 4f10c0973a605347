"""The official pre-extracted latents: a small folder written in that layout by the test, converted
by prepare (resumable, bad files counted), and the pipeline serving exactly the files' tokens
with the official choice of variant (resize, or crop when the image has one) and flip."""

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from fitv2_jax.config.defaults import data_defaults
from fitv2_jax.data.pipeline import make_train_iterator
from fitv2_jax.data.records import PreparedDataset
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source
from fitv2_jax.data.tokens import make_grid

# name -> (h, w) in patches of each folder it is in
LAYOUT = {
    "from_16_to_256": {"a.safetensors": (4, 6), "b.safetensors": (8, 2)},
    "greater_than_256_resize": {"c.safetensors": (12, 16), "d.safetensors": (16, 16),
                                "e.safetensors": (10, 20)},
    "greater_than_256_crop": {"c.safetensors": (16, 16), "d.safetensors": (16, 16)},
    "less_than_16": {"f.safetensors": (2, 3)},
}  # fmt: skip


def _write(root):
    rng = np.random.default_rng(0)
    features = {}
    for folder, files in LAYOUT.items():
        os.makedirs(root / folder)
        for name, (h, w) in files.items():
            feature = rng.standard_normal((2, h, w, 16)).astype(np.float16)
            label = np.asarray(ord(name[0]) - ord("a"), np.int64)
            save_file(dict(feature=feature, grid=make_grid(h, w).astype(np.int64),
                           size=np.asarray([h, w], np.int64), label=label),
                      str(root / folder / name))  # fmt: skip
            features[(folder, name)] = feature
    with open(root / "from_16_to_256" / "z.safetensors", "wb") as f:
        f.write(b"\x00" * 40)  # a damaged file: skipped and counted
    return features


def test_official_latents_become_records_the_pipeline_serves_exactly(tmp_path):
    features = _write(tmp_path / "official")
    source = open_source("official_latents", str(tmp_path / "official"), max_tokens=256)
    settings = PrepareSettings(out=str(tmp_path / "ds"), max_tokens=256, patch_size=2,
                               progress=False, process_index=0, process_count=1,
                               source_kind="official_latents")  # fmt: skip
    summary = prepare_split(source, None, settings)
    a = summary["all_shards_this_host"]
    assert (a["read"], a["written"], a["skipped_by_reason"]) == (6, 5, {"corrupt": 1})
    assert prepare_split(source, None, settings)["shards_written_now"] == 0  # resumable
    ds = PreparedDataset(str(tmp_path / "ds"))
    assert ds.meta["encoder"]["kind"] == "latents" and ds.meta["num_classes"] == 1000

    cfg = data_defaults()
    cfg.update(path=str(tmp_path / "ds"), global_batch_size=1, num_epochs=40, buckets=(256,),
               read_threads=1, prefetch=1)  # fmt: skip
    seen = {}
    for batch in make_train_iterator(cfg, process_index=0, process_count=1, seed=0):
        name = "abcde"[int(batch["y"][0])] + ".safetensors"
        variant, flip = int(batch["variant"][0]), int(batch["flip"][0])
        if variant == 1:  # crop
            folder = "greater_than_256_crop"
        else:
            folder = (
                "from_16_to_256" if name in LAYOUT["from_16_to_256"] else "greater_than_256_resize"
            )
        h, w = LAYOUT[folder][name]
        want = features[(folder, name)][flip].reshape(h * w, 16).astype(np.float32)
        np.testing.assert_array_equal(batch["x"][0, : h * w], want)
        assert batch["mask"][0].sum() == h * w and tuple(batch["size"][0]) == (h, w)
        np.testing.assert_array_equal(batch["grid"][0, :, : h * w], make_grid(h, w))
        seen.setdefault(name, set()).add((variant, flip))
    assert sorted(seen) == [f"{c}.safetensors" for c in "abcde"]
    assert {v for v, _ in seen["c.safetensors"]} == {0, 1}  # resize and crop both drawn
    assert {v for v, _ in seen["e.safetensors"]} == {0}  # no crop file: resize only
    assert {f for _, f in seen["a.safetensors"]} == {0, 1}  # both flips drawn


def test_official_latents_need_their_folders_and_patch_size(tmp_path):
    with pytest.raises(FileNotFoundError, match="from_16_to_256"):
        open_source("official_latents", str(tmp_path), max_tokens=256)
    _write(tmp_path / "o")
    source = open_source("official_latents", str(tmp_path / "o"), max_tokens=256)
    with pytest.raises(ValueError, match="patchified with p = 2"):
        prepare_split(source, None, PrepareSettings(out=str(tmp_path / "ds"), patch_size=4,
                                                    max_tokens=256, progress=False))  # fmt: skip
