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
