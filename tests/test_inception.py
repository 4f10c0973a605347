"""FID Inception: TF1 legacy resize, torch-free weight reading, parity with torch on the same weights."""

import io
import os
import pickle

import numpy as np
import pytest
import torch
from skimage import data

from fitv2_jax.eval.features import Inception, load_inception
from fitv2_jax.models.inception import tf1_resize_bilinear
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.inception import default_weights_path, load_inception_params
from fitv2_jax.weights.torch_files import load_torch_file


@pytest.fixture(scope="module")
def model():
    return load_inception(batch_size=2)


@pytest.fixture(scope="module")
def torch_model():
    torch.set_num_threads(2)
    return torch.jit.load(default_weights_path(), map_location="cpu").eval()


# ----------------------------------------------------------------------------- resize


def test_tf1_resize_matches_hand_computed_tables():
    # 2x2 -> 3x3: source coordinate = dst * 2/3 (no half-pixel offset), clamped at the edge.
    img = np.array([[0.0, 30.0], [60.0, 90.0]])[None, :, :, None]
    want = [[0, 20, 30], [40, 60, 70], [60, 80, 90]]
    got = np.asarray(tf1_resize_bilinear(img, (3, 3)))[0, :, :, 0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    # 1x2 -> 1x4: sources 0, 0.5, 1, 1.5 -> [a, (a+b)/2, b, b]; a half-pixel resize would
    # give [0, 2, 6, 8] instead.
    row = np.array([[0.0, 8.0]])[None, :, :, None]
    np.testing.assert_allclose(
        np.asarray(tf1_resize_bilinear(row, (1, 4)))[0, 0, :, 0], [0, 4, 8, 8]
    )
    # 1x4 -> 1x3: sources 0, 4/3, 8/3.
    row = np.array([[0.0, 10.0, 20.0, 30.0]])[None, :, :, None]
    np.testing.assert_allclose(
        np.asarray(tf1_resize_bilinear(row, (1, 3)))[0, 0, :, 0], [0, 40 / 3, 80 / 3], rtol=1e-6
    )


def _reference_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 legacy bilinear, written pixel-row by pixel-row from the definition (float32)."""
    h, w = img.shape[:2]
    x = img.astype(np.float32)

    def taps(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        res = []
        for i in range(n_out):
            s = np.float32(i) * scale
            lo = int(np.floor(s))
            res.append((lo, min(lo + 1, n_in - 1), np.float32(s - lo)))
        return res

    xt, out = taps(w, out_w), np.zeros((out_h, out_w, x.shape[2]), np.float32)
    cols_lo = np.array([t[0] for t in xt])
    cols_hi = np.array([t[1] for t in xt])
    fx = np.array([t[2] for t in xt], np.float32)[:, None]
    for i, (y0, y1, fy) in enumerate(taps(h, out_h)):
        top = x[y0, cols_lo] + (x[y0, cols_hi] - x[y0, cols_lo]) * fx
        bottom = x[y1, cols_lo] + (x[y1, cols_hi] - x[y1, cols_lo]) * fx
        out[i] = top + (bottom - top) * fy
    return out


def _photos(h: int, w: int) -> np.ndarray:
    """Two real photos cropped to (h, w): (2, h, w, 3) uint8."""
    out = []
    for photo in (data.astronaut(), data.immunohistochemistry(), data.rocket()):
        if photo.shape[0] >= h and photo.shape[1] >= w:
            out.append(photo[:h, :w])
    return np.stack(out[:2])


# ----------------------------------------------------------------------------- parity


def _torch_features(torch_model, images: np.ndarray) -> dict[str, np.ndarray]:
    """pool_3 and mixed_6/conv[:7] of the TorchScript model, on our independent resize."""
    x = np.stack([_reference_resize(im, 299, 299) for im in images])
    x = torch.from_numpy((x - 128.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    layers = torch_model.net.layers
    with torch.no_grad():
        pool = torch_model(x).numpy()
        h = x
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"):
            h = getattr(layers, name)(h)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).numpy()
    return {"pool": pool, "spatial": spatial}


@pytest.mark.parametrize("size", [(256, 256), (160, 480), (512, 512)])
def test_features_match_torchscript_on_same_weights(model, torch_model, size):
    images = _photos(*size)
    ours = model(images)
    ref = _torch_features(torch_model, images)
    assert ours["logits"] is None  # default_1.pt has no 1008-way layer
    for key, dim in (("pool", 2048), ("spatial", 2023)):
        assert ours[key].shape == (2, dim)
        err = np.abs(ours[key] - ref[key]).max() / np.abs(ref[key]).max()
        assert err < 1e-4, (key, size, err)
    # The two photos give different features (the check above is not trivially satisfied).
    assert np.abs(ref["pool"][0] - ref["pool"][1]).max() > 0.1


def test_uint8_and_float_inputs_agree(model):
    images = _photos(256, 256)
    a = model(images)["pool"]
    b = model(images.astype(np.float32))["pool"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_file_reader_matches_torch(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "w": torch.randn(3, 4, 5),
        "transposed": base.t(),  # non-contiguous strides
        "slice": base[1:3, 2:],  # storage offset, shared storage
        "half": torch.randn(7).half(),
        "long": torch.arange(5),
        "double": torch.randn(2, 2, dtype=torch.float64),
        "nested": {"b": torch.ones(2, dtype=torch.uint8)},
    }
    path = str(tmp_path / "w.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    got = load_torch_file(path)
    for k in ("w", "transposed", "slice", "half", "long", "double"):
        assert got[k].dtype == state[k].numpy().dtype
        np.testing.assert_array_equal(got[k], state[k].numpy())
    np.testing.assert_array_equal(got["nested"]["b"], [1, 1])


def test_torch_file_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pt")
    buf = io.BytesIO()
    pickle.dump({"x": Evil()}, buf, protocol=2)
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(UserError, match="evil.pt: not a readable torch weights file.*refusing"):
        load_torch_file(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_file_storages_of_every_float_dtype(tmp_path, dtype):
    """torch.save of float32 / float16 / bfloat16 tensors reads back without torch, equal to
    torch's own float32 conversion (a transposed view keeps its strides)."""
    w = torch.randn(3, 5).to(dtype)
    path = str(tmp_path / "w.bin")
    torch.save({"a.weight": w, "a.t": w.t(), "step": 7}, path)
    tree = load_torch_file(path)
    for name, want in (("a.weight", w), ("a.t", w.t())):
        np.testing.assert_array_equal(np.asarray(tree[name], np.float32), want.float().numpy())
    assert tree["step"] == 7


class _ConvBN(torch.nn.Module):
    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=1e-3, momentum=None)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _TorchvisionFIDInception(torch.nn.Module):
    """torchvision's Inception3 layout with pytorch-fid's FID patches (TF average pools that
    skip padding, max pool in Mixed_7c), written from their published structure: the oracle for
    reading a pytorch-fid .pth (names, branch order, 1008-way fc)."""

    def __init__(self):
        super().__init__()
        C = _ConvBN
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = C(3, 32, 3, 2), C(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = C(32, 64, 3, 1, 1), C(64, 80, 1)
        self.Conv2d_4a_3x3 = C(80, 192, 3)
        for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
            m = torch.nn.Module()
            m.branch1x1, m.branch5x5_1, m.branch5x5_2 = (
                C(cin, 64, 1),
                C(cin, 48, 1),
                C(48, 64, 5, 1, 2),
            )
            m.branch3x3dbl_1, m.branch3x3dbl_2 = C(cin, 64, 1), C(64, 96, 3, 1, 1)
            m.branch3x3dbl_3, m.branch_pool = C(96, 96, 3, 1, 1), C(cin, pf, 1)
            setattr(self, name, m)
        m = self.Mixed_6a = torch.nn.Module()
        m.branch3x3, m.branch3x3dbl_1 = C(288, 384, 3, 2), C(288, 64, 1)
        m.branch3x3dbl_2, m.branch3x3dbl_3 = C(64, 96, 3, 1, 1), C(96, 96, 3, 2)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            m = torch.nn.Module()
            m.branch1x1, m.branch7x7_1 = C(768, 192, 1), C(768, c7, 1)
            m.branch7x7_2, m.branch7x7_3 = (
                C(c7, c7, (1, 7), 1, (0, 3)),
                C(c7, 192, (7, 1), 1, (3, 0)),
            )
            m.branch7x7dbl_1 = C(768, c7, 1)
            m.branch7x7dbl_2 = C(c7, c7, (7, 1), 1, (3, 0))
            m.branch7x7dbl_3 = C(c7, c7, (1, 7), 1, (0, 3))
            m.branch7x7dbl_4 = C(c7, c7, (7, 1), 1, (3, 0))
            m.branch7x7dbl_5 = C(c7, 192, (1, 7), 1, (0, 3))
            m.branch_pool = C(768, 192, 1)
            setattr(self, name, m)
        m = self.Mixed_7a = torch.nn.Module()
        m.branch3x3_1, m.branch3x3_2 = C(768, 192, 1), C(192, 320, 3, 2)
        m.branch7x7x3_1, m.branch7x7x3_2 = C(768, 192, 1), C(192, 192, (1, 7), 1, (0, 3))
        m.branch7x7x3_3, m.branch7x7x3_4 = C(192, 192, (7, 1), 1, (3, 0)), C(192, 192, 3, 2)
        for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
            m = torch.nn.Module()
            m.branch1x1, m.branch3x3_1 = C(cin, 320, 1), C(cin, 384, 1)
            m.branch3x3_2a, m.branch3x3_2b = (
                C(384, 384, (1, 3), 1, (0, 1)),
                C(384, 384, (3, 1), 1, (1, 0)),
            )
            m.branch3x3dbl_1, m.branch3x3dbl_2 = C(cin, 448, 1), C(448, 384, 3, 1, 1)
            m.branch3x3dbl_3a = C(384, 384, (1, 3), 1, (0, 1))
            m.branch3x3dbl_3b = C(384, 384, (3, 1), 1, (1, 0))
            m.branch_pool = C(cin, 192, 1)
            setattr(self, name, m)
        self.fc = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        F = torch.nn.functional
        avg = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            b5 = m.branch5x5_2(m.branch5x5_1(x))
            b3 = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
            x = torch.cat([m.branch1x1(x), b5, b3, m.branch_pool(avg(x))], 1)
        m = self.Mixed_6a
        b3 = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
        x = torch.cat([m.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)
        for m in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            head = m.branch1x1(x)
            if m is self.Mixed_6d:
                spatial = head[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
            b7 = m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(m, f"branch7x7dbl_{i}")(d)
            x = torch.cat([head, b7, d, m.branch_pool(avg(x))], 1)
        m = self.Mixed_7a
        b3 = m.branch3x3_2(m.branch3x3_1(x))
        b7 = m.branch7x7x3_4(m.branch7x7x3_3(m.branch7x7x3_2(m.branch7x7x3_1(x))))
        x = torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)
        for m, pool in ((self.Mixed_7b, avg), (self.Mixed_7c, lambda t: F.max_pool2d(t, 3, 1, 1))):
            a = m.branch3x3_1(x)
            b = m.branch3x3dbl_2(m.branch3x3dbl_1(x))
            x = torch.cat(
                [
                    m.branch1x1(x),
                    m.branch3x3_2a(a),
                    m.branch3x3_2b(a),
                    m.branch3x3dbl_3a(b),
                    m.branch3x3dbl_3b(b),
                    m.branch_pool(pool(x)),
                ],
                1,
            )
        pool = x.mean((2, 3))
        return pool, spatial, self.fc(pool)


def test_pytorch_fid_pth_layout_gives_same_features_and_logits(tmp_path):
    torch.manual_seed(0)
    net = _TorchvisionFIDInception()
    x = torch.from_numpy((_reference_resize(_photos(256, 256)[0], 299, 299) - 128.0) / 128.0)
    x = x.permute(2, 0, 1)[None].contiguous().repeat(2, 1, 1, 1)
    x[1] = x[1].flip(2)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)  # gamma: pytorch-fid files carry it
                mod.bias.uniform_(-0.1, 0.1)
        # One pass in training mode sets every BN's running statistics to the batch's, so random
        # weights give well-scaled activations in eval mode.
        net.train()
        net(x)
        net.eval()
        pool, spatial, logits = (t.numpy() for t in net(x))
    path = str(tmp_path / "pt_inception-test.pth")
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)

    params, has_logits = load_inception_params(path)
    assert has_logits
    ours = Inception(params, has_logits, batch_size=2)(
        x.permute(0, 2, 3, 1).numpy() * 128.0 + 128.0
    )
    # Random weights with batch-of-2 BN statistics are less well conditioned than the real
    # ones (~1e-4 float32 drift); a wrong name or branch order gives errors of order 1.
    for got, want in ((ours["pool"], pool), (ours["spatial"], spatial)):
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
    # ADM's logits: pool_3 @ W, without the layer's bias.
    want = logits - net.fc.bias.detach().numpy()
    assert np.abs(ours["logits"] - want).max() / np.abs(want).max() < 1e-3


def test_bad_weights_file_is_named(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="other.pth"):
        load_inception_params(path)
