"""Per-slice presets of the pod configs (`--config configs/fitv2_xl.py:v5e-256`): what they set,
that they never change the model (a run moves between slices with its checkpoints), the note a
run on another slice gives (a dry run prints it: tests/test_tpu.py, whose TPU compile it
shares), and the TPU table's preset rows."""

import os
import types

import jax
import pytest

from fitv2_jax.benchmarks.tpu import markdown, preset_plan
from fitv2_jax.config.files import load_config
from fitv2_jax.config.slices import live_slice, slice_note, with_preset
from fitv2_jax.models.fit import COMPUTE_OPTIONS
from fitv2_jax.training.loop import check_resume_config
from fitv2_jax.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_CONFIGS = ["fitv2_b", "fitv2_xl", "fitv2_3b", "fitv2_hr_xl", "fitv2_hr_3b"]


def _config(name: str, overrides=()):
    return load_config(os.path.join(ROOT, "configs", name), list(overrides))


def test_a_preset_sets_the_tables_settings_for_its_slice_before_the_command_lines():
    xl = _config("fitv2_xl.py:v5e-256")
    assert tuple(xl.mesh.ici) == (2, -1, 1) and xl.model.remat_policy == "full"
    assert xl.model.scan_unroll == 1 and tuple(xl.mesh.slices) == ("v5e-256",)
    default = _config("fitv2_xl.py")
    assert tuple(default.mesh.ici) == (1, -1, 1) and default.model.remat_policy == "none"
    assert tuple(default.mesh.slices) == ("v5p-64",)
    assert tuple(default.mesh.slice_presets) == ("v5p-64", "v6e-64", "v5e-256")
    # --config.a.b=value still wins over the preset
    assert _config("fitv2_xl.py:v5e-256", ["model.remat_policy=dots"]).model.remat_policy == "dots"
    # a slice as libtpu names it is the same slice
    assert tuple(_config("fitv2_hr_3b.py:v5e:16x16").mesh.slices) == ("v5e-256",)


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_every_preset_changes_compute_options_and_the_mesh_only(name):
    """Checkpoints move between slices: a preset never changes what the model is."""
    default = _config(f"{name}.py")
    assert "v5p-64" in default.mesh.slices and "v5e-256" in default.mesh.slice_presets
    for preset in default.mesh.slice_presets:
        config = _config(f"{name}.py:{preset}")
        assert preset in config.mesh.slices
        changed = {k for k in config.model if config.model[k] != default.model[k]}
        assert changed <= set(COMPUTE_OPTIONS), (preset, changed)
        assert config.data == default.data and config.train == default.train
        check_resume_config(config, default, "workdir")  # resumes the default's run


def test_a_preset_naming_a_field_that_does_not_exist_is_an_error_not_a_new_field():
    config = _config("tiny.py")
    presets = {"v5p-64": {}, "v5e-256": {"model.remat_polcy": "dots"}}
    with pytest.raises(KeyError, match=r"model.remat_polcy \(a preset for v5e-256"):
        with_preset(config, presets, "v5e-256", default="v5p-64")
    assert "remat_polcy" not in config.model


def test_a_slice_without_a_preset_is_refused_naming_the_presets():
    for bad in ("v4-32", "v5p-65", "fast"):
        with pytest.raises(UserError, match=r"presets for v5p-64, v6e-64, v5e-256"):
            _config(f"fitv2_xl.py:{bad}")


def test_the_note_on_another_slice_names_its_preset_or_says_none_was_estimated():
    xl = _config("fitv2_xl.py")
    assert slice_note(xl, "v5p", 32) is None  # v5p-64: the config's own slice
    note = slice_note(xl, "v5e", 256)
    assert "settings are for v5p-64, not this v5e-256" in note
    assert "configs/fitv2_xl.py:v5e-256" in note
    assert "none was estimated for v4-32" in slice_note(xl, "v4", 16)
    assert slice_note(_config("fitv2_xl.py:v5e-256"), "v5e", 256) is None
    assert slice_note(_config("tiny.py"), "v5e", 256) is None  # no presets, no slice
    # HR XL's v6e-64 preset is its defaults: they suit both slices, and either name says so
    for name in ("fitv2_hr_xl.py", "fitv2_hr_xl.py:v6e-64"):
        hr = _config(name)
        assert set(hr.mesh.slices) == {"v5p-64", "v6e-64"}
        assert slice_note(hr, "v6e", 64) is None and slice_note(hr, "v5p", 32) is None
    assert "settings are for v5p-64 and v6e-64, not this v5e-256" in slice_note(hr, "v5e", 256)


def test_a_runs_slice_is_read_from_its_tpu_devices():
    def devices(kind, n, slices=1):
        return [types.SimpleNamespace(platform="tpu", device_kind=kind, slice_index=i % slices)
                for i in range(n)]  # fmt: skip

    assert live_slice(devices("TPU v5 lite", 256)) == ("v5e", 256)
    assert live_slice(devices("TPU v5", 64, slices=2)) == ("v5p", 32)  # v5p-64 x 2 slices
    assert live_slice(devices("TPU v6 lite", 64)) == ("v6e", 64)
    assert live_slice(devices("TPU v9", 8)) is None
    assert live_slice(jax.devices()) is None  # CPU


def test_the_tables_preset_rows_carry_each_presets_settings_and_name():
    path = os.path.join(ROOT, "configs", "fitv2_xl.py")
    plan = preset_plan([path])
    assert [row[1] for row in plan] == ["v5p-64", "v6e-64", "v5e-256"]
    # auto attention as it resolves there: the "short" kernels at 256 tokens with no remat
    # and with full remat
    assert plan[0] == (f"{path}:v5p-64", "v5p-64", "none", "short", 36, None)
    assert plan[2] == (f"{path}:v5e-256", "v5e-256", "full", "short", 1, (2, -1, 1))
    row = dict(config="fitv2_xl:v5e-256", topology="v5e-256", remat="full", attention="short",
               scan_unroll=1, ici=(2, -1, 1), depth=36, tokens=256,
               hbm_bytes_per_device=16 * 2**30, fits=True, peak_bytes=0.14 * 2**30,
               estimate_step_seconds=0.0332, estimate_mfu=0.140)  # fmt: skip
    assert markdown([row]).splitlines()[-1].startswith("| fitv2_xl:v5e-256, ici (2,-1,1) | 256 |")
