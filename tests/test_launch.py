"""The launch scripts parse, and CI runs the README's test command."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))) + [
    os.path.join(ROOT, ".ci", "run")
]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_and_readme_use_the_two_commands():
    assert "bash launch/test.sh" in open(os.path.join(ROOT, ".ci", "run")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "bash launch/demo.sh" in readme and "bash launch/test.sh" in readme


def test_launchers_print_usage_without_arguments():
    env = dict(os.environ, TPU_NAME="x", ZONE="y")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "usage: bash launch/tpu_pod.sh CONFIG WORKDIR" in proc.stderr


def test_pod_launcher_passes_each_flag_to_the_workers_as_one_word(tmp_path):
    """A mesh flag's parentheses, a config's preset and a path with a space reach the workers'
    shell quoted: `tpu_pod.sh` hands gcloud one remote command, which the workers' bash parses
    again."""
    gcloud = tmp_path / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nprintf "%s" "${@: -1}" > "$(dirname "$0")/cmd"\n')
    gcloud.chmod(0o755)
    env = dict(os.environ, TPU_NAME="x", ZONE="y", PATH=f"{tmp_path}:{os.environ['PATH']}")
    flags = ["--config.mesh.ici=(2,-1,1)", "--config.data.path=/mnt/my bucket/in1k"]
    subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"),
                    "configs/fitv2_xl.py:v5e-256", "/mnt/my runs/xl", *flags], check=True,
                   env=env)  # fmt: skip
    remote = (tmp_path / "cmd").read_text()
    assert "--distributed=on" in remote
    # the workers' shell, with the training command replaced by one that prints its arguments
    remote = remote.replace("cd fitv2-jax && ", "").replace("| tee -a /tmp/fitv2_train.log", "")
    remote = remote.replace(".venv/bin/python -m fitv2_jax.train", "printf '%s\\n'")
    words = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, check=True)
    assert words.stdout.splitlines() == [
        "--config", "configs/fitv2_xl.py:v5e-256", "--workdir", "/mnt/my runs/xl", *flags,
        "--distributed=on"]  # fmt: skip
