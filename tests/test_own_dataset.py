"""A user's own dataset, exactly as config/README.md tells a user to declare it: the README's block
(with `modality: MRI` and the folder changed) runs the whole workflow on a generated single-channel
2 mm MRI folder whose dataset.json has only the fields the code reads. DVC versions it without any
edit of dvc.yaml, the recipe comes from the data's fingerprint, and the audit passes."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import ROOT, copy_project, search_runs

pytestmark = pytest.mark.slow

SPACING_MM = 2.0


def make_mri_folder(folder: Path, cases: int = 6, shape=(36, 36, 32), seed: int = 0) -> Path:
    """A canonical-layout folder of single-channel "brains" at 2 mm with a two-class lesion; its
    dataset.json has only modality, labels and training (what the code reads)."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    grid = np.indices(shape)
    training = []
    for i in range(cases):
        image = np.zeros(shape, np.float32)
        label = np.zeros(shape, np.uint8)
        image[3:-3, 3:-3, 3:-3] = rng.normal(100.0, 10.0, [s - 6 for s in shape])
        centre = rng.integers(12, 22, 3)
        distance = sum((grid[k] - centre[k]) ** 2 for k in range(3))
        label[distance < 36] = 1
        label[distance < 9] = 2
        image[label == 1] += 60.0
        image[label == 2] += 120.0
        name = f"brain_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (folder / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1"}, "labels": {"0": "background", "1": "kidney", "2": "tumour"},
        "training": training}, indent=1))
    return folder


def readme_block() -> str:
    """The own-dataset YAML block of config/README.md, as a user copies it."""
    text = (ROOT / "config" / "README.md").read_text()
    section = text[text.index("**Your own dataset**"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_readme_own_dataset_block_runs_the_whole_workflow(tmp_path):
    folder = make_mri_folder(tmp_path / "my_brains")
    block = readme_block()
    assert "modality: CT" in block and "/data/my_kidneys" in block
    block = block.replace("modality: CT", "modality: MRI").replace("/data/my_kidneys", str(folder))
    name = next(iter(yaml.safe_load(block)["datasets"]))
    project = copy_project(tmp_path / "project")
    (project / "my_dataset.yaml").write_text(block)
    dvc_yaml = (project / "dvc.yaml").read_text()

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                           "config/config.yaml", "tests/data/demo_fast.yaml", "my_dataset.yaml"],
                          cwd=project, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"own-dataset workflow on the demo_fast budgets: {wall:.0f} s")

    # Only this dataset was built (the demo datasets are declared but unused).
    assert sorted(p.name for p in (project / "data" / "processed").iterdir()) == [name]
    audit = json.loads((project / "results" / "audit.json").read_text())
    assert audit["summary"]["fail"] == 0 and audit["summary"]["pass"] > 10

    # Versioned by DVC through datasets/dvc.yaml; the tracked dvc.yaml is untouched, so the runs
    # are not "dirty".
    assert (project / "dvc.yaml").read_text() == dvc_yaml
    lock = yaml.safe_load((project / "datasets" / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st["outs"]}
    assert set(outs) == {f"data/raw/{name}", f"data/processed/{name}"}
    status = subprocess.run(["dvc", "status", "datasets/dvc.yaml"], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
    uri = f"sqlite:///{project}/results/mlflow/mlflow.db"
    runs = search_runs(uri, "finetune")
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.git_dirty"]) == {"false"}
    assert set(runs[f"tags.data_hash.{name}"]) == {outs[f"data/processed/{name}"]}

    # The recipe came from the data: 2 mm stays 2 mm (no silent resampling to 1 mm), MRI is
    # z-scored, and the fingerprint is recorded and printed.
    processed = json.loads((project / "data" / "processed" / name / "dataset.json").read_text())
    assert processed["recipe"]["spacing"] == [SPACING_MM] * 3
    assert processed["recipe"]["normalize"] == "zscore_nonzero_channelwise"
    assert processed["channels"] == ["MRI"]
    fingerprint = processed["fingerprint"]
    assert fingerprint["median_spacing"] == [SPACING_MM] * 3
    assert fingerprint["foreground_intensity"]["p99.5"] > fingerprint["foreground_intensity"]["p0.5"]
    log = (project / "logs" / "data" / f"preprocess_{name}.log").read_text()
    assert "recipe spacing [2.0, 2.0, 2.0] mm (median of the dataset" in log


def test_ct_foreground_window_comes_from_the_fingerprint():
    from hybridmim.data.intensity import apply_window, resolve_window
    from hybridmim.dataset_catalog import dataset_from_config, validate_window

    spec = dataset_from_config("head_ct", {"modality": "CT", "labels": {0: "bg", 1: "bleed"},
                                           "folder": "/x"})
    window = spec.windows["finetune"]
    index = {"fingerprint": {"foreground_intensity": {"p0.5": 20.0, "p50": 50.0,
                                                      "p99.5": 80.0}}}
    resolved = validate_window(resolve_window(window, index), "w")
    assert (resolved["kind"], resolved["a_min"], resolved["a_max"]) == ("ct", 20.0, 80.0)
    assert apply_window(np.array([20.0, 50.0, 80.0, 500.0]), resolved).tolist() == [0, 0.5, 1, 1]
    with pytest.raises(ValueError, match="re-run the preprocess step"):
        resolve_window(window, {"fingerprint": {}}, "head_ct window")
    # An explicit window in the block wins.
    explicit = {"kind": "ct", "a_min": -100.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0,
                "clip": True}
    spec = dataset_from_config("head_ct", {"modality": "CT", "labels": {0: "bg", 1: "bleed"},
                                           "folder": "/x", "windows": {"finetune": explicit}})
    assert resolve_window(spec.windows["finetune"], index) == explicit
