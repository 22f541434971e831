"""`hybridmim export`: a trained model as a MONAI bundle that runs with stock MONAI alone.

    <out>/configs/metadata.json   model card: task, labels, input channels and spacing, training
                                  data and its hash, metrics with their MLflow run ids
    <out>/configs/inference.json  MONAI transforms + sliding-window inference (no hybridmim)
    <out>/models/model.pt         the network's state dict
    <out>/docs/README.md          how to run it

``python -m monai.bundle run --config_file configs/inference.json --dataset_dir <images>``
segments every NIfTI in ``dataset_dir`` (or, for a pretrained backbone, reconstructs it) and
writes ``<output_dir>/<name>_seg.nii.gz`` on the input's grid. The preprocessing is the model's
recorded recipe written with the same MONAI transforms hybridmim uses; only the order differs in
one place that does not change the result (the CT window comes last, after the crop).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hybridmim.checkpoints import LoadedModel
from hybridmim.models.transfer import canonical_class
from hybridmim.predict.models import load_model
from hybridmim.predict.pipeline import check_preprocess, label_values, preprocessing_steps

log = logging.getLogger(__name__)

META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
               "0.8.1/meta_schema_20220324.json")


def preprocessing(meta: dict[str, Any]) -> list[dict[str, Any]]:
    window = meta["window"]
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True,
         "ensure_channel_first": True, "reader": "NibabelReader"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        *preprocessing_steps(meta["preprocess"]),
    ]
    if window["kind"] == "ct":
        steps.append({"_target_": "ScaleIntensityRanged", "keys": "image",
                      **{key: window[key] for key in ("a_min", "a_max", "b_min", "b_max")},
                      "clip": bool(window["clip"])})
    elif window["kind"] == "mri_pretrain":  # z-scores clipped and mapped; exact zeros stay b_min
        steps.append({"_target_": "Lambdad", "keys": "image", "func":
                      "$lambda x: torch.where(x == 0, torch.full_like(x, {b_min}), "
                      "(x.clamp({z_min}, {z_max}) - {z_min}) / ({z_max} - {z_min}) * "
                      "({b_max} - {b_min}) + {b_min})".format(**window)})
    return steps


def postprocessing(meta: dict[str, Any], segmentation: bool) -> list[dict[str, Any]]:
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
              "orig_keys": "image", "nearest_interp": False, "to_tensor": True}
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
            "output_postfix": "seg" if segmentation else "recon", "resample": False,
            "separate_folder": False, "squeeze_end_dims": True, "print_log": True}
    if not segmentation:  # a pretrained backbone reconstructs the (windowed) image
        return [invert, {**save, "output_dtype": "$numpy.float32"}]
    if meta.get("regions"):
        steps = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}, invert,
                 {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]
    else:
        values = label_values(meta["labels"])
        steps = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, invert,
                 {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
        if values != list(range(len(values))):  # class index → label value (BraTS 3 → 4)
            steps.append({"_target_": "MapLabelValued", "keys": "pred",
                          "orig_labels": list(range(len(values))), "target_labels": values})
    return steps + [{**save, "output_dtype": "$numpy.uint8"}]


def inference_config(network: dict[str, Any], meta: dict[str, Any], segmentation: bool,
                     overlap: float = 0.5) -> dict[str, Any]:
    crop = int(meta["crop"])
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'images')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # MONAI's config finds its own networks by class name (DynUNet).
        "network_def": {"_target_": canonical_class(network["class"]).removeprefix(
            "monai.networks.nets."), **network["kwargs"]},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(meta)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [crop] * 3,
                    "sw_batch_size": 4, "overlap": overlap, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": postprocessing(meta, segmentation)},
        # A plain loop instead of MONAI's SupervisedEvaluator: that one needs pytorch-ignite.
        "predict": "$lambda d: {**d, 'pred': @inferer(d['image'][None].to(@device), "
                   "@network)[0].cpu()}",
        "initialize": ["$torch.set_grad_enabled(False)",
                       "$@network.load_state_dict(torch.load(@checkpoint, "
                       "map_location=@device, weights_only=True))",
                       "$@network.eval()"],
        "run": ["$[@postprocessing(@predict(item)) for item in @dataset]"],
    }


def _evaluation_metrics(run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """Test metrics of the evaluate run(s) of this model, with their run ids (best effort)."""
    if not run_id:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        from hybridmim.tracking.store import resolve_tracking_uri, sqlite_path

        uri = resolve_tracking_uri(tracking_uri)
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            return {}  # no store here: do not create an empty one just to look
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("evaluate")
        if experiment is None:
            return {}
        runs = client.search_runs([experiment.experiment_id],
                                  f"tags.`upstream.run_id` = '{run_id}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as error:  # the card is still useful without them
        log.warning("no evaluation metrics for the model card (%s)", error)
        return {}
    if not runs:
        return {}
    run = runs[0]
    return {"run_id": run.info.run_id, "grid": run.data.tags.get("grid"),
            "split": run.data.tags.get("split"),
            "metrics": {k: v for k, v in sorted(run.data.metrics.items())
                        if k.startswith("test_")}}


def metadata(loaded: LoadedModel, meta: dict[str, Any], segmentation: bool,
             tracking_uri: str | None = None) -> dict[str, Any]:
    import monai
    import numpy

    from hybridmim import __version__

    channels, outputs = loaded.channels_in_out()
    names = meta.get("channel_names") or [meta.get("modality") or "image"] * channels
    crop = int(meta["crop"])
    if segmentation:
        classes = (list(meta["regions"]) if meta.get("regions")
                   else [meta["labels"][k] for k in sorted(meta["labels"], key=int)])
        task = (f"Segmentation of {', '.join(c for c in classes if c != 'background')} in "
                f"{meta.get('modality')} ({meta.get('method') or 'scratch'} initialisation)")
    else:
        classes = ["reconstruction"]
        task = (f"Self-supervised {meta.get('method')} pretrained backbone for "
                f"{meta.get('modality')}; inference reconstructs the input")
    class_def = {str(i): c for i, c in enumerate(classes)}
    training = {key: meta.get(key) for key in ("mlflow_run_id", "data_hash", "spec_hash",
                                               "steps", "git_commit", "init", "weights")}
    metrics: dict[str, Any] = {}
    if meta.get("best_val_dice") is not None:
        metrics["validation"] = {"run_id": meta.get("mlflow_run_id"),
                                 "best_val_dice_mean": meta["best_val_dice"],
                                 "best_step": meta.get("best_step")}
    evaluation = _evaluation_metrics(meta.get("mlflow_run_id"), tracking_uri)
    if evaluation:
        metrics["test"] = evaluation
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by hybridmim {__version__} from {loaded.source}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": {"nibabel": __import__("nibabel").__version__},
        "name": f"hybridmim {meta.get('stage')} model",
        "task": task,
        "description": task + ". Trained by the hybridmim workflow; see 'hybridmim' below for "
                       "its provenance.",
        "authors": "hybridmim",
        "copyright": "see the training data's licence",
        "data_source": meta.get("data_source") or "see hybridmim.training",
        "data_type": "nibabel",
        "image_classes": f"{channels} channel(s): {', '.join(names)}",
        "label_classes": class_def,
        "pred_classes": class_def,
        "eval_metrics": evaluation.get("metrics", {}),
        "intended_use": "Research reproduction only; not for clinical use.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if meta.get("modality") == "CT"
                else "magnitude", "modality": meta.get("modality"), "num_channels": channels,
                "spatial_shape": [crop] * 3, "dtype": "float32", "is_patch_data": True,
                "channel_def": {str(i): n for i, n in enumerate(names)},
                "spacing_mm": meta.get("spacing")}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation" if segmentation else "image",
                "num_channels": outputs, "spatial_shape": [crop] * 3, "dtype": "float32",
                "is_patch_data": True,
                "channel_def": class_def}}},
        "hybridmim": {**{key: meta.get(key) for key in ("stage", "labels", "regions", "window",
                                                        "preprocess", "spacing")},
                      "training": training, "metrics": metrics, "exported_from": loaded.source},
    }


def export_bundle(model: str, out: str | Path, tracking_uri: str | None = None,
                  overlap: float = 0.5) -> Path:
    """Write the bundle of ``model`` (model.pt, run id or MLflow model URI) to ``out``."""
    from hybridmim.atomic import write_json
    from hybridmim.data.layout import atomic_directory

    loaded = load_model(model, tracking_uri)
    meta, network = loaded.meta, loaded.network_record
    segmentation = meta.get("stage") == "finetune"
    if "crop" not in meta or not meta.get("window"):
        raise ValueError(f"--model {model}: records no crop or intensity window; export a "
                         "model.pt written by a hybridmim pretrain or finetune job")
    meta = {**meta, "preprocess": check_preprocess(meta.get("preprocess"), model)}
    card = metadata(loaded, meta, segmentation, tracking_uri)
    out = Path(out)
    with atomic_directory(out) as temp:
        for folder in ("configs", "models", "docs"):
            (temp / folder).mkdir()
        write_json(temp / "configs" / "inference.json",
                   inference_config(network, meta, segmentation, overlap))
        write_json(temp / "configs" / "metadata.json", card)
        torch.save(loaded.network.state_dict(), temp / "models" / "model.pt")
        (temp / "docs" / "README.md").write_text(
            f"# {card['task']}\n\n"
            "Run with stock MONAI (no hybridmim needed):\n\n"
            "    python -m monai.bundle run --config_file configs/inference.json \\\n"
            "        --dataset_dir <folder of .nii.gz images> --output_dir <folder>\n\n"
            "Outputs are written on each input's own grid. configs/metadata.json holds the "
            "model card (labels, input channels and spacing, training data hash, metrics with "
            "their MLflow run ids).\n")
    log.info("exported %s → %s", loaded.source, out)
    return out
