"""DVC versions the data: `dvc repro` runs the same CLI as the Snakemake data rules, dvc.lock
records every dataset's raw and processed hash, and a second clone that pulls from the (local)
remote gets byte-identical data. Real DVC commands in real git repositories."""
import subprocess

import pytest

from hybridmim.hashing import tree_hash

pytestmark = pytest.mark.slow

STAGES = ["acquire@demo_spleen", "preprocess@demo_spleen"]


def sh(cmd, cwd, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_two_clones_share_identical_data_through_the_remote(project_copy, tmp_path):
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], project_copy)
    sh(["dvc", "repro", "preprocess@demo_spleen"], project_copy)
    import yaml

    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for s in STAGES for o in lock["stages"][s]["outs"]}
    assert set(outs) == {"data/raw/demo_spleen", "data/processed/demo_spleen"}
    assert all(v.endswith(".dir") for v in outs.values())
    assert "splits.json" in sh(["dvc", "ls", ".", "data/processed/demo_spleen"], project_copy)
    status = sh(["dvc", "status", *STAGES], project_copy)
    assert "changed" not in status, status
    sh(["dvc", "push", *STAGES], project_copy)
    sh(["git", "add", "-A"], project_copy)
    sh(["git", "commit", "-qm", "data versions"], project_copy)

    clone = tmp_path / "second_machine"
    sh(["git", "clone", "-q", str(project_copy), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    sh(["dvc", "pull", *STAGES], clone)
    for path in outs:
        assert tree_hash(clone / path) == tree_hash(project_copy / path), path
    status = sh(["dvc", "status", *STAGES], clone)
    assert "changed" not in status, status

    # A changed dataset config changes the stage: DVC notices and repro rebuilds it.
    cfg = clone / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("demo_spleen: {num_cases: 10, num_test: 2, seed: 3}",
                                           "demo_spleen: {num_cases: 10, num_test: 2, seed: 4}"))
    assert "changed" in sh(["dvc", "status", *STAGES], clone)
    sh(["dvc", "repro", "preprocess@demo_spleen"], clone)
    lock2 = yaml.safe_load((clone / "dvc.lock").read_text())
    new = {o["path"]: o["md5"] for s in STAGES for o in lock2["stages"][s]["outs"]}
    assert new["data/raw/demo_spleen"] != outs["data/raw/demo_spleen"]
