"""Image sources: random-access lists of (key, label, loader) items that `prepare` encodes.

- `ImageFolderSource`: any class-per-folder tree (`root/<class>/*.jpg`); labels follow the sorted
  folder names, so ImageNet's `train/<wnid>/` gives the standard 0..999 labels. Empty class
  folders keep their label (so the numbering never shifts) and are reported in `problems`.
- `imagenet_source(root, split)`: ImageNet in its standard layout: `train/<wnid>/*.JPEG`; `val/`
  either per-class folders or flat files plus a labels file (`<file> <wnid|int>` per line, or
  Kaggle's `LOC_val_solution.csv`).
- `TfdsSource`: `imagenet2012` (or any image dataset) prepared by the user for tensorflow-datasets
  in array_record format, read through `tfds.data_source` (no TensorFlow needed).
- `OfficialLatentSource`: the official pre-extracted ImageNet latents, converted as they are.
- `DemoSource`: the small real offline dataset of the CPU demo: crops at several aspect ratios
  and scales of scikit-image's bundled colour photos, one class per photo. Train crops come
  from the left 65% of each photo, held-out crops from the right 35%, so no held-out pixel is
  ever trained on.

Every item's `load()` returns an RGB PIL image or raises `images.BadImage` (counted, skipped).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from fitv2_jax.data.images import BadImage, load_rgb
from fitv2_jax.data.tokens import make_grid
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.utils.safetensors_io import read_safetensors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image: a unique key, its integer label and how to get its pixels."""

    key: str
    label: int
    payload: Any  # a path, encoded bytes or a uint8 array, as `load_rgb` accepts
    loader: Callable[[Any], Image.Image] = load_rgb

    def load(self) -> Image.Image:
        return self.loader(self.payload)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise MissingFileError(
            f"{what} not found: {path!r} does not exist or is not a directory; "
            "check the path (--root) or create it."
        )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderSource:
    """root/<class>/<image>: labels = index of the class folder in sorted order.

    class_names: fix the class list (e.g. ImageNet's wnids taken from train/ for val/); folders
    outside it are ignored and listed in `problems`.
    """

    def __init__(self, root: str, class_names: list[str] | None = None):
        _require_dir(root, "image folder root")
        self.root = root
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_names = list(class_names) if class_names is not None else found
        index = {c: i for i, c in enumerate(self.class_names)}
        self.problems: dict[str, list[str]] = {"empty_class_folder": [], "unknown_folder": []}
        self._files: list[tuple[str, int]] = []
        for c in found:
            if c not in index:
                self.problems["unknown_folder"].append(c)
                continue
            files = sorted(f for f in os.listdir(os.path.join(root, c)) if _is_image(f))
            if not files:
                self.problems["empty_class_folder"].append(c)
            self._files += [(os.path.join(c, f), index[c]) for f in files]
        if not self._files:
            raise UserError(
                f"no images found under {root!r}: expected class folders holding image files "
                f"({', '.join(IMAGE_EXTENSIONS)})."
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> Item:
        rel, label = self._files[i]
        return Item(rel, label, os.path.join(self.root, rel))


class LabeledFilesSource:
    """A flat folder of images plus a labels mapping {file name: label} (ImageNet val/)."""

    def __init__(self, root: str, labels: dict[str, int], class_names: list[str]):
        _require_dir(root, "image folder")
        self.root, self.class_names = root, class_names
        self.problems: dict[str, list[str]] = {"unlabeled_file": []}
        self._files = []
        for f in sorted(f for f in os.listdir(root) if _is_image(f)):
            stem = os.path.splitext(f)[0]
            if f in labels or stem in labels:
                self._files.append((f, labels.get(f, labels.get(stem))))
            else:
                self.problems["unlabeled_file"].append(f)
        if not self._files:
            raise UserError(f"no labelled images found in {root!r} (check the labels file).")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> Item:
        f, label = self._files[i]
        return Item(f, label, os.path.join(self.root, f))


def read_labels_file(path: str, class_names: list[str]) -> dict[str, int]:
    """`<file> <wnid or int>` lines, or Kaggle's LOC_val_solution.csv -> {file or stem: label}."""
    if not os.path.isfile(path):
        raise MissingFileError(f"labels file not found: {path!r} (flag --val_labels).")
    index = {c: i for i, c in enumerate(class_names)}
    out: dict[str, int] = {}

    def label_of(tok: str, lineno: int) -> int:
        if tok.isdigit():
            return int(tok)
        if tok in index:
            return index[tok]
        raise UserError(f"{path}:{lineno}: unknown class {tok!r} (not a train/ class folder)")

    with open(path, newline="") as f:
        if path.endswith(".csv"):  # ImageId,PredictionString ("n01751748 x y x y ...")
            for lineno, row in enumerate(csv.DictReader(f), start=2):
                out[row["ImageId"]] = label_of(row["PredictionString"].split()[0], lineno)
        else:
            for lineno, line in enumerate(f, start=1):
                parts = line.replace(",", " ").split()
                if len(parts) >= 2:
                    out[parts[0]] = label_of(parts[1], lineno)
    return out


def imagenet_source(root: str, split: str = "train", val_labels: str | None = None):
    """ImageNet folders: root/train/<wnid>/*.JPEG; root/val/<wnid>/ or root/val/ + labels file."""
    _require_dir(root, "ImageNet root")
    train_dir = os.path.join(root, "train")
    _require_dir(train_dir, "ImageNet train/ folder (class names come from it)")
    class_names = sorted(
        d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d))
    )
    if split == "train":
        return ImageFolderSource(train_dir, class_names)
    split_dir = os.path.join(root, split)
    _require_dir(split_dir, f"ImageNet {split}/ folder")
    if any(os.path.isdir(os.path.join(split_dir, d)) for d in os.listdir(split_dir)):
        return ImageFolderSource(split_dir, class_names)
    if val_labels is None:
        raise UserError(
            f"{split_dir!r} is flat (no class folders): pass --val_labels FILE with lines "
            "'<file> <wnid>' (or Kaggle's LOC_val_solution.csv)."
        )
    return LabeledFilesSource(split_dir, read_labels_file(val_labels, class_names), class_names)


class TfdsSource:
    """A tensorflow-datasets image dataset prepared in array_record format, via tfds.data_source."""

    def __init__(
        self, name: str = "imagenet2012", split: str = "train", data_dir: str | None = None
    ):
        data_dir = (
            data_dir
            or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets")
        )
        infos = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json"))
        if not infos:
            raise MissingFileError(
                f"tfds dataset {name!r} is not prepared under {data_dir!r} (--tfds_data_dir). "
                f"Prepare it once with: tfds build {name} --data_dir {data_dir} "
                "--file_format array_record --manual_dir <folder with the ImageNet tars>."
            )
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise UserError("--source tfds needs tensorflow-datasets: pip install "
                            "'fitv2_jax[tfds]'") from e  # fmt: skip
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        features = self._ds.dataset_info.features
        self.class_names = list(features["label"].names)
        self.problems: dict[str, list[str]] = {}
        self.name, self.split = name, split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Item:
        ex = self._ds[i]
        key = ex.get("file_name", f"{self.name}/{self.split}/{i}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        return Item(key, int(ex["label"]), np.asarray(ex["image"], np.uint8))


DEMO_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)
DEMO_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 1 / 2, 3.0, 1 / 3)  # width / height
DEMO_SCALES = (1.0, 0.8, 0.6, 0.45)
HELDOUT_FRACTION = 0.35  # right-hand part of each photo, never seen in training


def demo_crop_boxes(
    height: int, width: int, split: str, n: int, seed: int
) -> list[tuple[int, int, int, int]]:
    """Deterministic crop boxes (top, left, h, w) inside the split's region of one photo."""
    cut = int(round(width * (1 - HELDOUT_FRACTION)))
    x0, x1 = (0, cut) if split == "train" else (cut, width)
    rw, rh = x1 - x0, height
    rng = np.random.default_rng([seed, height, width, 0 if split == "train" else 1])
    boxes = []
    for i in range(n):
        r = DEMO_ASPECTS[i % len(DEMO_ASPECTS)]
        f = DEMO_SCALES[(i // len(DEMO_ASPECTS)) % len(DEMO_SCALES)]
        w = min(rw, rh * r) * f  # largest box of aspect r in the region, scaled by f
        h = w / r
        w, h = max(1, int(w)), max(1, int(h))
        top = int(rng.integers(0, rh - h + 1))
        left = x0 + int(rng.integers(0, rw - w + 1))
        boxes.append((top, left, h, w))
    return boxes


class DemoSource:
    """Crops of scikit-image's bundled photos; label = photo index in DEMO_PHOTOS.

    split: "train" or "heldout" (disjoint pixel regions); crops_per_photo crops of each photo.
    """

    def __init__(self, split: str = "train", crops_per_photo: int = 36, seed: int = 0):
        if split not in ("train", "heldout"):
            raise UserError(f"demo split must be 'train' or 'heldout', got {split!r}")
        try:
            import skimage.data
        except ImportError as e:
            raise UserError("the demo photos come from scikit-image: pip install "
                            "'fitv2_jax[demo]'") from e  # fmt: skip
        self.class_names = list(DEMO_PHOTOS)
        self.problems: dict[str, list[str]] = {}
        self._photos = [np.asarray(getattr(skimage.data, p)())[..., :3] for p in DEMO_PHOTOS]
        self._items = []
        for label, photo in enumerate(self._photos):
            for j, box in enumerate(
                demo_crop_boxes(*photo.shape[:2], split, crops_per_photo, seed)
            ):
                self._items.append((f"{DEMO_PHOTOS[label]}/{split}/{j:03d}", label, box))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Item:
        key, label, (top, left, h, w) = self._items[i]
        crop = self._photos[label][top : top + h, left : left + w]
        return Item(key, label, np.ascontiguousarray(crop))


class OfficialLatentSource:
    """The official pre-extracted ImageNet latents (tools/download_in1k_latents_256.sh of the
    official repository): ROOT/from_16_to_T/, ROOT/greater_than_T_resize/ and
    ROOT/greater_than_T_crop/ (a subset of the resize folder's names; less_than_16/ is not
    used), one .safetensors per image with `feature` (2, h, w, 16): both flips, already
    patchified (p = 2, 4 latent channels, scaled SD-VAE latents), `grid` (2, h*w), `size` (h, w)
    and `label`. An image's variants are its resize file and, when present, its crop file, as
    the official loader picks them. Items' `load()` returns ({variant: feature}, label).
    """

    pre_encoded = True
    patch_size = 2

    def __init__(self, root: str, target_len: int = 256, num_classes: int = 1000):
        _require_dir(root, "official latents --root")
        folders = {k: os.path.join(root, f) for k, f in (
            ("small", f"from_16_to_{target_len}"), ("resize", f"greater_than_{target_len}_resize"),
            ("crop", f"greater_than_{target_len}_crop"))}  # fmt: skip
        missing = [f for f in folders.values() if not os.path.isdir(f)]
        if missing:
            raise MissingFileError(f"--root {root}: no {', '.join(map(os.path.basename, missing))}"
                                   f" (the official latents for --max_tokens {target_len})")  # fmt: skip
        names = {k: sorted(n for n in os.listdir(f) if n.endswith(".safetensors"))
                 for k, f in folders.items()}  # fmt: skip
        crops = set(names["crop"])
        self._items = [(n, {"resize": os.path.join(folders["small"], n)}) for n in names["small"]]
        for n in names["resize"]:
            files = {"resize": os.path.join(folders["resize"], n)}
            if n in crops:
                files["crop"] = os.path.join(folders["crop"], n)
            self._items.append((n, files))
        self.num_classes, self.class_names = num_classes, [str(i) for i in range(num_classes)]
        self.problems = {"crop_without_resize": sorted(crops - set(names["resize"]))}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        name, files = self._items[i]
        return _LatentItem(name, files, self.num_classes)

    @staticmethod
    def encoder_description() -> dict:
        return {"kind": "latents", "downsample": 8, "channels": 4, "stored_as": "float",
                "vae": "official pre-extracted latents (sd-vae-ft-ema)",
                "scaling_factor": 0.18215}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _LatentItem:
    key: str
    files: dict[str, str]
    num_classes: int

    def load(self) -> tuple[dict[str, np.ndarray], int]:
        latents, label = {}, None
        for variant, path in self.files.items():
            try:
                data = read_safetensors(path)
                feature, grid, size = data["feature"], data["grid"], data["size"]
                lab = int(np.asarray(data["label"]).reshape(-1)[0])
            except (UserError, KeyError, IndexError) as e:
                raise BadImage("corrupt", f"{path}: {e}") from e
            h, w = (int(v) for v in np.asarray(size).reshape(-1)[:2])
            if feature.shape[:3] != (2, h, w) or not np.array_equal(grid, make_grid(h, w)):
                raise BadImage("corrupt", f"{path}: feature {feature.shape} / grid do not fit "
                                          f"size ({h}, {w})")  # fmt: skip
            if not 0 <= lab < self.num_classes or label not in (None, lab):
                raise BadImage("bad_label", f"{path}: label {lab}")
            latents[variant], label = feature, lab
        return latents, label


def open_source(
    kind: str,
    root: str | None = None,
    split: str = "train",
    val_labels: str | None = None,
    tfds_name: str = "imagenet2012",
    tfds_data_dir: str | None = None,
    demo_crops: int = 36,
    max_tokens: int = 256,
):
    """The source named by the prepare CLI flags (kind: imagenet | folder | tfds | demo |
    official_latents)."""
    if kind in ("imagenet", "folder", "official_latents") and not root:
        raise UserError(f"--source {kind} needs --root PATH (the dataset folder)")
    if kind == "imagenet":
        return imagenet_source(root, split, val_labels)
    if kind == "folder":
        return ImageFolderSource(root)
    if kind == "tfds":
        return TfdsSource(tfds_name, split, tfds_data_dir)
    if kind == "demo":
        return DemoSource("heldout" if split in ("heldout", "val", "test") else "train", demo_crops)
    if kind == "official_latents":
        return OfficialLatentSource(root, max_tokens)
    raise UserError(f"unknown --source {kind!r}: use imagenet, folder, tfds, demo or "
                    "official_latents")  # fmt: skip
