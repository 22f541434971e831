"""`hybridmim predict` and the original-grid evaluation on the real CT (../shared): a tiny model
fine-tuned for a few steps on it segments it again; outputs sit on the input's grid, in its
orientation; bad inputs fail with one clear line and write nothing."""
import dataclasses
import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import torch

from hybridmim.cli import main as cli_main
from hybridmim.data.layout import make_index, save_nifti, write_json
from hybridmim.dataset_catalog import CT_PRETRAIN_WINDOW, get_dataset
from conftest import REAL_CT
from test_finetune import CROP, TINY_UNET, finetune_spec, tracking_block

pytestmark = pytest.mark.skipif(not (REAL_CT / "example_ct_sm.nii.gz").is_file(),
                                reason=f"the real CT example is not at {REAL_CT}")
LABELS = {"0": "background", "1": "spleen", "2": "liver"}
# A coarse recipe keeps the test fast and makes the resampled grid differ from the 3 mm input.
RECIPE = {"orientation": "RAS", "spacing": [4.0, 4.0, 4.0], "normalize": "none",
          "foreground_threshold": -175.0}


def _real_ct_task(raw):
    """The TotalSegmentator example as a two-organ task: spleen (1 → 1), liver (5 → 2)."""
    seg = nib.load(REAL_CT / "example_seg.nii.gz")
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    values = np.asarray(seg.dataobj)
    label = np.where(values == 1, 1, np.where(values == 5, 2, 0)).astype(np.uint8)
    (raw / "imagesTr" / "ct_001.nii.gz").symlink_to(REAL_CT / "example_ct_sm.nii.gz")
    save_nifti(label, seg.affine, raw / "labelsTr" / "ct_001.nii.gz")
    write_json(raw / "dataset.json", make_index(
        name="real_ct", description="TotalSegmentator example, spleen and liver",
        reference="Wasserthal et al., Radiology: AI 2023", licence="CC-BY-4.0", channels=("CT",),
        labels={int(k): v for k, v in LABELS.items()},
        training=[{"image": "./imagesTr/ct_001.nii.gz", "label": "./labelsTr/ct_001.nii.gz"}],
        test=[]))
    return raw


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A tiny UNet fine-tuned for a few steps on the real CT (train = val = test: one case)."""
    from hybridmim.data.prepare.preprocess import preprocess_dataset
    from hybridmim.finetune.train import run_finetuning

    root = tmp_path_factory.mktemp("real")
    raw = _real_ct_task(root / "raw")
    base = get_dataset("msd_spleen")
    spec_ds = dataclasses.replace(
        base, name="real_ct", labels={int(k): v for k, v in LABELS.items()},
        preprocess=dataclasses.replace(base.preprocess, spacing=tuple(RECIPE["spacing"])))
    processed = preprocess_dataset(raw, root / "processed", spec_ds)
    (processed / "splits.json").write_text(json.dumps(
        {"seed": 0, "recipe": "test", "train": ["ct_001"], "val": ["ct_001"],
         "test": ["ct_001"]}))
    tracking = tracking_block(root)
    spec = finetune_spec(root, processed, tracking, **{
        "dataset.labels": LABELS, "dataset.raw_dir": str(raw), "dataset.preprocess": RECIPE,
        "dataset.name": "real_ct", "optim.steps": 4, "val_every": 4, "checkpoint_every": 4,
        "tracking.system_metrics_interval": 1, "provenance.wildcards.dataset": "real_ct"})
    result = run_finetuning(spec)
    return {"model": root / "finetune" / "model.pt", "raw": raw, "processed": processed,
            "spec": spec, "root": root, "run_id": result["run_id"]}


def _dice(pred, truth, value):
    a, b = pred == value, truth == value
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_predict_real_ct_on_its_own_grid_in_any_orientation(real_model, tmp_path):
    ct = nib.load(REAL_CT / "example_ct_sm.nii.gz")
    # The same voxels stored in LPS order: the prediction must follow the file's orientation.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [ct.shape[0] - 1, ct.shape[1] - 1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ras.nii.gz").symlink_to(REAL_CT / "example_ct_sm.nii.gz")
    save_nifti(np.asarray(ct.dataobj)[::-1, ::-1].copy(), ct.affine @ flip,
               inputs / "lps.nii.gz")
    cli_main(["predict", "--model", str(real_model["model"]), "--input", str(inputs),
              "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lps.nii.gz", "ras.nii.gz"]
    ras, lps = nib.load(tmp_path / "out" / "ras.nii.gz"), nib.load(tmp_path / "out" / "lps.nii.gz")
    assert ras.shape == ct.shape and np.allclose(ras.affine, ct.affine)
    assert lps.shape == ct.shape and np.allclose(lps.affine, ct.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert ras.get_data_dtype() == np.uint8
    pred_ras, pred_lps = np.asarray(ras.dataobj), np.asarray(lps.dataobj)
    assert set(np.unique(pred_ras).tolist()) <= {0, 1, 2}
    # Same anatomy, same answer: the LPS prediction is the RAS one stored flipped.
    assert (pred_lps[::-1, ::-1] != pred_ras).mean() < 0.01
    truth = np.asarray(nib.load(real_model["raw"] / "labelsTr" / "ct_001.nii.gz").dataobj)
    liver = _dice(pred_ras, truth, 2)
    assert 0.0 <= liver <= 1.0
    logging.getLogger(__name__).info("liver Dice after 4 steps: %.3f", liver)


@pytest.mark.parametrize("bad", ["unreadable", "2d", "nan", "channels"])
def test_bad_input_gets_one_clear_line_and_no_output(real_model, tmp_path, bad, capsys):
    ct = nib.load(REAL_CT / "example_ct_sm.nii.gz")
    path = tmp_path / f"{bad}.nii.gz"
    data = np.asarray(ct.dataobj).astype(np.float32)
    if bad == "unreadable":
        path.write_bytes(b"not a nifti file")
    elif bad == "2d":
        save_nifti(data[:, :, 10], ct.affine, path)
    elif bad == "nan":
        data[5, 5, 5] = np.nan
        save_nifti(data, ct.affine, path)
    else:
        save_nifti(np.stack([data, data], axis=-1), ct.affine, path)
    expected = {"unreadable": "cannot be read as NIfTI", "2d": "not a 3D volume",
                "nan": "NaN or infinite", "channels": "2 channel"}[bad]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--model", str(real_model["model"]), "--input", str(path),
                  "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(path) in errors[0] and expected in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_evaluation_scores_on_the_original_grid_by_default(real_model, tmp_path):
    from hybridmim.evaluate.run import run_evaluation

    spec = {"run_name": "eval-real", "out": str(tmp_path / "original" / "metrics.json"),
            "tracking": real_model["spec"]["tracking"], "dataset": real_model["spec"]["dataset"],
            "precision": "fp32", "threads": 1, "model": str(real_model["model"]),
            "split": "test", "sw_overlap": 0.25, "project_root": str(tmp_path)}
    original = run_evaluation(spec)
    case = original["per_case"][0]
    assert original["grid"] == "original" and case["case"] == "ct_001"
    prediction = nib.load(tmp_path / case["prediction"])
    label = nib.load(tmp_path / case["label"])
    assert prediction.shape == label.shape == (122, 101, 30)
    pred, truth = np.asarray(prediction.dataobj), np.asarray(label.dataobj)
    for name, value in (("spleen", 1), ("liver", 2)):
        assert case[name]["dice"] == pytest.approx(_dice(pred, truth, value))
    resampled = run_evaluation({**spec, "grid": "resampled",
                                "out": str(tmp_path / "resampled" / "metrics.json")})
    assert resampled["grid"] == "resampled"
    # Same network, same image: only the grid of the scoring differs.
    assert resampled["per_case"][0]["prediction_sha256"] == case["prediction_sha256"]
    assert resampled["per_case"][0]["liver"]["dice"] != case["liver"]["dice"]


def test_mlflow_run_has_source_dataset_system_metrics_and_registered_model(real_model, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = real_model["spec"]["tracking"]["uri"]
    client = MlflowClient(uri)
    run = client.get_run(real_model["run_id"])
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "workflow/Snakefile rule finetune"
    assert len(tags["mlflow.source.git.commit"]) == 40
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "processed"
    assert tags["data_hash.processed"].startswith(dataset.dataset.digest)
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    assert any(name.startswith("system/cpu") for name in run.data.metrics)
    experiment = client.get_experiment(run.info.experiment_id)
    assert "fine-tuning" in experiment.tags["mlflow.note.content"]
    # Registered per dataset × backbone × init; the version's model is the run's.
    # The logged model lives in the run's experiment, where the UI's runs list finds it.
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.source_run_id == real_model["run_id"]
    (version,) = client.search_model_versions("name='real_ct-unet-scratch'")
    assert version.run_id == real_model["run_id"]
    assert tags["model_uri"] == f"models:/real_ct-unet-scratch/{version.version}"
    # The registered model, the run id and the file segment identically.
    image = REAL_CT / "example_ct_sm.nii.gz"
    outputs = {}
    for name, reference in (("file", str(real_model["model"])), ("registry", tags["model_uri"]),
                            ("run", real_model["run_id"])):
        cli_main(["predict", "--model", reference, "--input", str(image), "--out",
                  str(tmp_path / name), "--tracking-uri", uri])
        outputs[name] = np.asarray(nib.load(tmp_path / name / "example_ct_sm.nii.gz").dataobj)
    assert (outputs["registry"] == outputs["file"]).all()
    assert (outputs["run"] == outputs["file"]).all()


def _start_bundle(bundle, images, out):
    """Stock MONAI's bundle runner, with hybridmim made unimportable."""
    code = ("import runpy, sys; sys.modules['hybridmim'] = None; "
            "sys.argv = ['monai.bundle'] + sys.argv[1:]; "
            "runpy.run_module('monai.bundle', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code, "run", "--config_file",
                             "configs/inference.json", "--dataset_dir", str(images),
                             "--output_dir", str(out)], cwd=bundle, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def test_bundle_export_runs_with_stock_monai_on_the_real_ct(real_model, tmp_path):
    from hybridmim.checkpoints import publish_model
    from hybridmim.models.backbones import build_segmentation_network
    from hybridmim.predict.pipeline import recorded_preprocess

    cli_main(["export", "--model", str(real_model["model"]), "--out", str(tmp_path / "seg"),
              "--tracking-uri", real_model["spec"]["tracking"]["uri"]])
    # A pretrained backbone exports too; its bundle reconstructs the image.
    torch.manual_seed(0)
    net, class_path, kwargs = build_segmentation_network(TINY_UNET, 1, CROP)
    meta = {"stage": "pretrain", "method": "hybridmim", "crop": CROP, "modality": "CT",
            "channels": 1, "labels": None, "spacing": RECIPE["spacing"],
            "window": CT_PRETRAIN_WINDOW, "preprocess": recorded_preprocess(
                real_model["processed"]), "mlflow_run_id": "pretrain-run"}
    publish_model(tmp_path / "pretrained.pt", class_path, kwargs, net.state_dict(), meta)
    cli_main(["export", "--model", str(tmp_path / "pretrained.pt"), "--out",
              str(tmp_path / "pre")])
    images = tmp_path / "images"
    images.mkdir()
    (images / "ct.nii.gz").symlink_to(REAL_CT / "example_ct_sm.nii.gz")
    runs = [_start_bundle(tmp_path / name, images, tmp_path / f"{name}_out")
            for name in ("seg", "pre")]

    card = json.loads((tmp_path / "seg" / "configs" / "metadata.json").read_text())
    assert card["label_classes"] == {"0": "background", "1": "spleen", "2": "liver"}
    assert card["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert card["network_data_format"]["inputs"]["image"]["spacing_mm"] == RECIPE["spacing"]
    training = card["hybridmim"]["training"]
    assert training["mlflow_run_id"] == real_model["run_id"] and training["data_hash"]
    assert card["hybridmim"]["metrics"]["validation"]["run_id"] == real_model["run_id"]
    assert "Self-supervised" in json.loads(
        (tmp_path / "pre" / "configs" / "metadata.json").read_text())["task"]
    cli_main(["predict", "--model", str(real_model["model"]), "--input",
              str(images / "ct.nii.gz"), "--out", str(tmp_path / "ours")])
    ours = np.asarray(nib.load(tmp_path / "ours" / "ct.nii.gz").dataobj)
    for run in runs:
        _finish(run)

    ct = nib.load(REAL_CT / "example_ct_sm.nii.gz")
    bundle_pred = nib.load(tmp_path / "seg_out" / "ct_seg.nii.gz")
    assert bundle_pred.shape == ct.shape and np.allclose(bundle_pred.affine, ct.affine)
    # Same network and recipe through stock MONAI: the same segmentation up to boundary voxels.
    assert (np.asarray(bundle_pred.dataobj) == ours).mean() > 0.99
    recon = nib.load(tmp_path / "pre_out" / "ct_recon.nii.gz")
    assert recon.shape == ct.shape and np.allclose(recon.affine, ct.affine)
