"""The deploy manifests in cluster/deploy/ (the Ray cluster launcher config, the KubeRay RayCluster and RayJob,
the runtime env): each parses as YAML with the fields its kind needs, and every `stages/pretrain.py` command in
them and in cluster/README.md names only flags that `stages/pretrain.py --help` lists."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "cluster" / "deploy"


# ---------------------------------------------------------------------------------------------------------
# Manifests: they parse and name real flags.

MANIFESTS = ["ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml"]


def pretrain_flags() -> set[str]:
    help_text = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "pretrain.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def pretrain_commands(text: str) -> list[str]:
    """Every `stages/pretrain.py ...` command line in a manifest or the README (shell continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"stages/pretrain\.py[^\n\"'`]*", joined)]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_parses(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    if name == "runtime_env.yaml":
        assert {"working_dir", "pip"} <= set(docs[0])
    if name.startswith("kuberay"):
        assert docs[0]["apiVersion"].startswith("ray.io/")
        assert docs[0]["kind"] == ("RayJob" if "rayjob" in name else "RayCluster")
    if name == "ray-cluster.yaml":
        types = docs[0]["available_node_types"]
        head = types[docs[0]["head_node_type"]]
        assert head["resources"].get("GPU", 0) == 0
        assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())


def test_manifests_and_readme_use_only_real_flags():
    known = pretrain_flags()
    used = set()
    for path in [*(DEPLOY / n for n in MANIFESTS), REPO_ROOT / "cluster" / "README.md"]:
        commands = pretrain_commands(path.read_text())
        for cmd in commands:
            used |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd))
    assert used, "no `stages/pretrain.py` command found in the manifests"
    assert "--storage-path" in used
    assert used <= known, f"flags not in stages/pretrain.py --help: {sorted(used - known)}"
    rayjob = (DEPLOY / "kuberay-rayjob.yaml").read_text()
    assert pretrain_commands(rayjob), "the RayJob must run stages/pretrain.py"
