"""prepare: bad-input counts, stored pixels vs PIL, flips, resumability, per-host shards, latents."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from fitv2_jax.data.encoders import VaeEncoder
from fitv2_jax.data.pipeline import default_config, make_train_iterator
from fitv2_jax.data.records import PreparedDataset, decode_record
from fitv2_jax.prepare import build_parser, main, prepare

PX = ["--max-tokens", "64", "--patch-size", "2", "--no-progress"]
HOST0 = ["--process-index", "0", "--process-count", "1"]


def _img(path, arr, mode=None, fmt=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path, fmt, **kw)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """12 files: 8 usable (odd modes included), 2 too small, 1 corrupt, 1 truncated."""
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
    _img(f"{a}/sliver.png", np.zeros((1, 40, 3), np.uint8))  # side under one patch
    with open(f"{a}/corrupt.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff garbage" * 10)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(f"{a}/truncated.jpg", "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _img(str(root / "b" / "good2.png"), rng.integers(0, 255, (100, 100, 3), dtype=np.uint8))
    (root / "c").mkdir()  # empty class folder
    return str(root)


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_bad_inputs_are_counted_and_the_pipeline_sees_exactly_the_written_ones(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    s = prepare(_args("--source", "folder", "--root", bad_tree, "--out", out, *PX, *HOST0))
    a = s["all_shards_this_host"]
    assert (a["read"], a["written"], a["skipped"]) == (12, 8, 4)
    assert a["skipped_by_reason"] == {"too_small": 2, "corrupt": 1, "truncated": 1}
    assert s["source_problems"] == {"empty_class_folder": ["c"]}

    ds = PreparedDataset(out)
    assert len(ds) == 8 and ds.meta["num_classes"] == 3
    cfg = default_config()
    cfg.update(path=out, global_batch_size=1, num_epochs=1)
    it = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
    seen = [(int(b["index"][0]), int(b["y"][0])) for b in it]
    assert sorted(i for i, _ in seen) == list(range(8))  # one epoch: every record once
    assert sorted(y for _, y in seen) == [0] * 7 + [1]


def test_stored_pixels_match_pil_resize_and_both_flips(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    prepare(_args("--source", "folder", "--root", bad_tree, "--out", out, *PX, *HOST0))
    import grain

    src = grain.sources.ArrayRecordDataSource(PreparedDataset(out).shards)
    recs = {r["key"]: r for r in (decode_record(src[i]) for i in range(len(src)))}
    r = recs["a/good.jpg"]
    # 60x80 px, 64 tokens of 2x2: a=6.93, b=9.24 -> 7x9 patches = 14x18 px; crop S = 16
    assert r["variants"] == ["resize", "crop"]
    assert r["size"].tolist() == [[7, 9], [8, 8]] and r["tokens"].tolist() == [63, 64]
    want = np.asarray(
        Image.open(os.path.join(bad_tree, "a/good.jpg"))
        .convert("RGB")
        .resize((18, 14), Image.Resampling.BICUBIC)
    )
    np.testing.assert_array_equal(r["x_resize_0"], want)
    np.testing.assert_array_equal(r["x_resize_1"], want[:, ::-1])
    np.testing.assert_array_equal(r["x_crop_1"], r["x_crop_0"][:, ::-1])
    assert r["label"] == 0 and recs["b/good2.png"]["label"] == 1
    assert recs["a/extreme.png"]["variants"] == ["resize"]  # 10 px side: no crop variant


def test_resume_redoes_only_half_written_shards(bad_tree, tmp_path, capsys):
    out = str(tmp_path / "ds")
    argv = ["--source", "folder", "--root", bad_tree, "--out", out, "--num-shards", "3"]
    first = main([*argv, *PX, *HOST0])
    assert first["shards_written_now"] == 3
    stem = os.path.join(out, "train-00001-of-00003")
    os.remove(stem + ".json")  # as if killed while writing shard 1
    with open(stem + ".array_record", "wb") as f:
        f.write(b"half")
    with open(stem + ".array_record.tmp", "wb") as f:
        f.write(b"stale")
    with pytest.raises(ValueError, match="unfinished.*train-00001-of-00003"):
        PreparedDataset(out)
    again = main([*argv, *PX, *HOST0])
    assert (again["shards_written_now"], again["shards_already_done"]) == (1, 2)
    assert again["all_shards_this_host"] == first["all_shards_this_host"]
    assert not os.path.exists(stem + ".array_record.tmp")
    assert len(PreparedDataset(out)) == 8
    text = capsys.readouterr().out
    assert "images read 12, written 8, skipped 4" in text
    assert text.strip().splitlines()[-1] == f"prepared dataset: {out} (split train)"


def test_hosts_write_disjoint_shards(bad_tree, tmp_path):
    out = str(tmp_path / "ds")
    argv = ["--source", "folder", "--root", bad_tree, "--out", out, "--num-shards", "3", *PX]
    h0 = main([*argv, "--process-index", "0", "--process-count", "2"])
    assert h0["shards_this_host"] == 2  # shards 0 and 2
    with pytest.raises(ValueError, match="1 of 3 train shards are unfinished"):
        PreparedDataset(out)
    h1 = main([*argv, "--process-index", "1", "--process-count", "2"])
    assert h1["shards_this_host"] == 1
    assert h0["all_shards_this_host"]["read"] + h1["all_shards_this_host"]["read"] == 12
    assert len(PreparedDataset(out)) == 8


def test_cli_errors_name_the_flag_or_path(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--source", "folder", "--root", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert "missing" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--source" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "fitv2_jax.models.vae", None)  # not importable
    with pytest.raises(SystemExit, match="--vae needs fitv2_jax.models.vae"):
        main(["--source", "demo", "--out", str(tmp_path / "o"), "--vae", "w", *HOST0])


def test_latent_records_encode_each_flip_separately(tmp_path):
    import grain
    import jax

    from fitv2_jax.models.vae import random_vae

    vae = random_vae(jax.random.key(0))
    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for name in ("x", "y"):  # same size: both images and both flips share one encoder call
        _img(str(root / "k" / f"{name}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = str(tmp_path / "lat")
    args = _args("--source", "folder", "--root", str(root), "--out", out, "--max-tokens", "16")
    args.process_index, args.process_count, args.progress = 0, 1, False
    prepare(args, encoder=VaeEncoder(vae=vae))
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
    import grain

    outs = []
    for workers in ("1", "3"):
        out = str(tmp_path / f"w{workers}")
        argv = ["--source", "folder", "--root", bad_tree, "--out", out, "--workers", workers]
        prepare(_args(*argv, *PX, *HOST0))
        src = grain.sources.ArrayRecordDataSource(PreparedDataset(out).shards)
        outs.append([src[i] for i in range(len(src))])
    assert outs[0] == outs[1] and len(outs[0]) == 8
