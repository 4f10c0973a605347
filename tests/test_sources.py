"""Sources and robust decoding: folder layouts, ImageNet val labels, tfds errors, the demo set,
and every kind of bad image file decoded or rejected with the right reason."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from fitv2_jax.data.images import BadImage, load_rgb
from fitv2_jax.data.sources import (
    HELDOUT_FRACTION,
    DemoSource,
    ImageFolderSource,
    TfdsSource,
    demo_crop_boxes,
    imagenet_source,
    open_source,
)


def _save(path, arr, mode=None, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path, fmt)


def test_image_folder_labels_follow_sorted_folders(tmp_path):
    px = np.zeros((20, 30, 3), np.uint8)
    _save(tmp_path / "zebra" / "1.png", px)
    _save(tmp_path / "apple" / "b.jpg", px)
    _save(tmp_path / "apple" / "a.JPEG", px)
    (tmp_path / "mango").mkdir()  # empty class: keeps label 1, reported
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(str(tmp_path))
    assert src.class_names == ["apple", "mango", "zebra"]
    assert [(src[i].key, src[i].label) for i in range(len(src))] == [
        ("apple/a.JPEG", 0),
        ("apple/b.jpg", 0),
        ("zebra/1.png", 2),
    ]
    assert src.problems["empty_class_folder"] == ["mango"]
    assert src[2].load().size == (30, 20)


def test_missing_root_and_empty_tree_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderSource(missing)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found under .*empty"):
        ImageFolderSource(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--root"):
        open_source("folder", None)


def test_imagenet_layouts(tmp_path):
    px = np.zeros((8, 8, 3), np.uint8)
    for wnid in ("n02", "n01"):
        _save(tmp_path / "train" / wnid / f"{wnid}_1.JPEG", px)
    for f in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
        _save(tmp_path / "val" / f, px)
    with pytest.raises(ValueError, match="--val_labels"):
        imagenet_source(str(tmp_path), "val")
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n02\nILSVRC2012_val_00000002.JPEG n01\n")
    val = imagenet_source(str(tmp_path), "val", str(labels))
    assert [val[i].label for i in range(2)] == [1, 0]  # n01 -> 0, n02 -> 1 (sorted wnids)
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01 1 2 3 4\nILSVRC2012_val_00000002,n02 5 6 7 8 n02 1 1 1 1\n"
    )
    val = imagenet_source(str(tmp_path), "val", str(kaggle))
    assert [val[i].label for i in range(2)] == [0, 1]
    train = imagenet_source(str(tmp_path), "train")
    assert [(train[i].key, train[i].label) for i in range(2)] == [
        ("n01/n01_1.JPEG", 0),
        ("n02/n02_1.JPEG", 1),
    ]
    with pytest.raises(FileNotFoundError, match="train"):
        imagenet_source(str(tmp_path / "val"), "train")


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet2012.*not prepared.*tfds build"):
        TfdsSource("imagenet2012", "train", str(tmp_path))


def test_demo_set_is_deterministic_and_heldout_is_never_trained_on():
    tr, tr2, ho = DemoSource("train", 9), DemoSource("train", 9), DemoSource("heldout", 9)
    assert tr.num_classes == 7 and len(tr) == 63 and len(ho) == 63
    np.testing.assert_array_equal(np.asarray(tr[10].load()), np.asarray(tr2[10].load()))
    aspects = {round(tr[i].load().size[0] / tr[i].load().size[1], 1) for i in range(9)}
    assert len(aspects) >= 6  # several aspect ratios
    for h, w in [(512, 512), (300, 451), (1411, 1411)]:
        seen = np.zeros((h, w), bool)
        for t, x0, bh, bw in demo_crop_boxes(h, w, "train", 40, 0):
            assert 0 <= t and t + bh <= h and 0 <= x0 and x0 + bw <= w
            seen[t : t + bh, x0 : x0 + bw] = True
        for t, x0, bh, bw in demo_crop_boxes(h, w, "heldout", 40, 0):
            assert not seen[t : t + bh, x0 : x0 + bw].any()
        assert seen[:, : int(w * (1 - HELDOUT_FRACTION)) - 1].any()


def _png(arr, mode=None, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG", **kw)
    return buf.getvalue()


def test_odd_modes_decode_to_rgb():
    gray = load_rgb(_png(np.full((4, 5), 77, np.uint8)))
    assert gray.mode == "RGB" and np.asarray(gray).tolist()[0][0] == [77, 77, 77]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red, transparent -> white
    out = np.asarray(load_rgb(_png(rgba)))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
    out = np.asarray(load_rgb(_png(sixteen)))
    assert out[0, :, 0].tolist() == [0, 100, 255]  # 16-bit scaled, not clipped
    buf = io.BytesIO()
    Image.new("CMYK", (3, 3), (0, 0, 0, 0)).save(buf, "JPEG")
    out = np.asarray(load_rgb(buf.getvalue()))
    assert out.shape == (3, 3, 3) and out.min() > 240  # no ink = white
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255] * 256)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert np.asarray(load_rgb(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]


def test_corrupt_and_truncated_files_raise_bad_image(tmp_path):
    with pytest.raises(BadImage) as e:
        load_rgb(b"this is not an image at all")
    assert e.value.reason == "corrupt"
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    with pytest.raises(BadImage) as e:
        load_rgb(data[: len(data) * 2 // 3])
    assert e.value.reason == "truncated"
    with pytest.raises(FileNotFoundError):
        load_rgb(str(tmp_path / "gone.jpg"))
