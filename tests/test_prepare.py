"""prepare: bad-input counts, stored pixels vs PIL, flips, resumability, per-host shards, latents."""

import io
import os

import grain
import jax
import numpy as np
import pytest
from cli import error_line, run_cli
from PIL import Image

from fitv2_jax.config.defaults import data_defaults
from fitv2_jax.data.encoders import PixelEncoder, VaeEncoder
from fitv2_jax.data.pipeline import make_train_iterator
from fitv2_jax.data.records import PreparedDataset, decode_record
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source
from fitv2_jax.models.vae import random_vae

PX = ["--max_tokens", "64", "--patch_size", "2", "--noprogress"]
HOST0 = ["--process_index", "0", "--process_count", "1"]


def _img(path, arr, mode=None, fmt=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path, fmt, **kw)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """12 files: 9 usable (odd modes included; the sliver's 1 px side is scaled up to one
    patch, as the official resize does), 1 too small, 1 corrupt, 1 truncated."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    a = str(root / "a")
    _img(f"{a}/good.jpg", rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    _img(f"{a}/gray.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    Image.new("CMYK", (48, 32), (10, 200, 30, 0)).save(f"{a}/cmyk.jpg")
    _img(f"{a}/rgba.png", rng.integers(0, 255, (30, 50, 4), dtype=np.uint8))
    _img(f"{a}/sixteen.png", rng.integers(0, 65535, (24, 24), dtype=np.uint16))
    pal = Image.new("P", (36, 20))
    pal.putpalette(list(range(256)) * 3)
    pal.save(f"{a}/pal.gif", transparency=3)
    _img(f"{a}/extreme.png", rng.integers(0, 255, (10, 200, 3), dtype=np.uint8))  # 1:20
    _img(f"{a}/tiny.png", np.zeros((6, 6, 3), np.uint8))  # 9 tokens < 16
    _img(f"{a}/sliver.png", np.zeros((1, 40, 3), np.uint8))  # 1 px: scaled up to 2 x 80
    with open(f"{a}/corrupt.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff garbage" * 10)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(f"{a}/truncated.jpg", "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _img(str(root / "b" / "good2.png"), rng.integers(0, 255, (100, 100, 3), dtype=np.uint8))
    (root / "c").mkdir()  # empty class folder
    return str(root)


def _prepare(root, out, encoder=None, **kw):
    """The library call the command makes: 64 tokens of 2x2 pixel patches on host 0 of 1."""
    settings = dict(out=out, max_tokens=64, patch_size=2, progress=False, process_index=0,
                    process_count=1, source_kind="folder", source_root=root)  # fmt: skip
    settings.update(kw)
    return prepare_split(open_source("folder", root), encoder or PixelEncoder(),
                         PrepareSettings(**settings))  # fmt: skip


def test_bad_inputs_are_counted_and_the_pipeline_sees_exactly_the_written_ones(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    s = _prepare(bad_tree, out)
    a = s["all_shards_this_host"]
    assert (a["read"], a["written"], a["skipped"]) == (12, 9, 3)
    assert a["skipped_by_reason"] == {"too_small": 1, "corrupt": 1, "truncated": 1}
    assert s["source_problems"] == {"empty_class_folder": ["c"]}

    ds = PreparedDataset(out)
    assert len(ds) == 9 and ds.meta["num_classes"] == 3
    cfg = data_defaults()
    cfg.update(path=out, global_batch_size=1, num_epochs=1)
    it = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
    seen = [(int(b["index"][0]), int(b["y"][0])) for b in it]
    assert sorted(i for i, _ in seen) == list(range(9))  # one epoch: every record once
    assert sorted(y for _, y in seen) == [0] * 8 + [1]


def test_stored_pixels_match_pil_resize_and_both_flips(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    _prepare(bad_tree, out)
    src = grain.sources.ArrayRecordDataSource(PreparedDataset(out).shards)
    recs = {r["key"]: r for r in (decode_record(src[i]) for i in range(len(src)))}
    r = recs["a/good.jpg"]
    # 60x80 px, 64 tokens of 2x2 (the official rule): 18.5 x 13.9 px -> 9x6 patches; crop 16
    assert r["variants"] == ["resize", "crop"]
    assert r["size"].tolist() == [[6, 9], [8, 8]] and r["tokens"].tolist() == [54, 64]
    want = np.asarray(
        Image.open(os.path.join(bad_tree, "a/good.jpg"))
        .convert("RGB")
        .resize((18, 12), Image.Resampling.BICUBIC)
    )
    np.testing.assert_array_equal(r["x_resize_0"], want)
    np.testing.assert_array_equal(r["x_resize_1"], want[:, ::-1])
    np.testing.assert_array_equal(r["x_crop_1"], r["x_crop_0"][:, ::-1])
    assert r["label"] == 0 and recs["b/good2.png"]["label"] == 1
    assert recs["a/extreme.png"]["variants"] == ["resize"]  # 10 px side: no crop variant


def test_resume_redoes_only_half_written_shards(bad_tree, tmp_path):
    """Through the command: a rerun rewrites only the shard whose marker file is missing."""
    out = str(tmp_path / "ds")
    argv = ["--source", "folder", "--root", bad_tree, "--out", out, "--num_shards", "3"]
    first = run_cli("prepare", *argv, *PX, *HOST0).stdout
    assert "3 written now, 0 already done" in first
    stem = os.path.join(out, "train-00001-of-00003")
    os.remove(stem + ".json")  # as if killed while writing shard 1
    with open(stem + ".array_record", "wb") as f:
        f.write(b"half")
    with open(stem + ".array_record.tmp", "wb") as f:
        f.write(b"stale")
    with pytest.raises(ValueError, match="unfinished.*train-00001-of-00003"):
        PreparedDataset(out)
    again = run_cli("prepare", *argv, *PX, *HOST0).stdout
    assert "1 written now, 2 already done" in again
    assert not os.path.exists(stem + ".array_record.tmp")
    assert len(PreparedDataset(out)) == 9
    assert "images read 12, written 9, skipped 3" in again
    assert again.strip().splitlines()[-1] == f"prepared dataset: {out} (split train)"


def test_hosts_write_disjoint_shards(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    h0 = _prepare(bad_tree, out, num_shards=3, process_index=0, process_count=2)
    assert h0["shards_this_host"] == 2  # shards 0 and 2
    with pytest.raises(ValueError, match="1 of 3 train shards are unfinished"):
        PreparedDataset(out)
    h1 = _prepare(bad_tree, out, num_shards=3, process_index=1, process_count=2)
    assert h1["shards_this_host"] == 1
    assert h0["all_shards_this_host"]["read"] + h1["all_shards_this_host"]["read"] == 12
    assert len(PreparedDataset(out)) == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "folder", "--root", "{tmp}/missing"], "missing"),
        (["--source", "demo", "--max-tokens", "64"], "--max-tokens was renamed: use --max_tokens"),
        (["--source", "demo", "--patch_size", "0"], "--patch_size 0: give a positive number"),
        (["--source", "demo", "--vae", "{tmp}/w"], "w: VAE weights not found"),
    ],
    ids=["root", "renamed", "patch", "vae"],
)
def test_cli_errors_name_the_flag_or_path(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli("prepare", *args, "--out", tmp_path / "o", *HOST0, check=False)
    assert message in error_line(proc)
    assert not (tmp_path / "o").exists()  # nothing written by a failed start


def test_help_lists_the_flags():
    proc = run_cli("prepare", "--help")
    assert proc.returncode == 0 and "--max_tokens" in proc.stdout and "--source" in proc.stdout


def test_latent_records_encode_each_flip_separately(tmp_path):
    vae = random_vae(jax.random.key(0))
    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for name in ("x", "y"):  # same size: both images and both flips share one encoder call
        _img(str(root / "k" / f"{name}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = str(tmp_path / "lat")
    _prepare(str(root), out, encoder=VaeEncoder(vae), max_tokens=16)
    ds = PreparedDataset(out)
    assert ds.meta["encoder"]["kind"] == "latents" and ds.meta["encoder"]["downsample"] == 8
    src = grain.sources.ArrayRecordDataSource(ds.shards)
    for i, name in enumerate(("x", "y")):
        r = decode_record(src[i])
        px = np.asarray(Image.open(root / "k" / f"{name}.png")).astype(np.float32) / 127.5 - 1
        # oracle: the VAE on this image alone, and on the flipped image (not a flipped latent)
        one = np.asarray(vae.encode(np.stack([px, px[:, ::-1]])))
        np.testing.assert_allclose(r["x_resize_0"], one[0], atol=1e-5)
        np.testing.assert_allclose(r["x_resize_1"], one[1], atol=1e-5)
        assert not np.allclose(r["x_resize_1"], r["x_resize_0"][:, ::-1], atol=1e-3)
        assert r["x_resize_0"].shape == (8, 8, 4) and r["size"].tolist() == [[4, 4]]


def test_decode_threads_do_not_change_the_records(bad_tree, tmp_path):
    outs = []
    for workers in (1, 3):
        out = str(tmp_path / f"w{workers}")
        _prepare(bad_tree, out, workers=workers)
        src = grain.sources.ArrayRecordDataSource(PreparedDataset(out).shards)
        outs.append([src[i] for i in range(len(src))])
    assert outs[0] == outs[1] and len(outs[0]) == 9
