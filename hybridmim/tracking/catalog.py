"""What makes the MLflow store browsable the way MLflow users expect: experiment descriptions,
source tags, the data each run read as MLflow datasets (digest = the DVC hash), system metrics
for training runs, and trained networks as MLflow models (PyTorch flavour, with a signature and
the model's metadata), fine-tuned ones registered under one name per dataset × backbone × init.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

EXPERIMENT_DESCRIPTIONS = {
    "pretrain": "Self-supervised pretraining (HybridMIM / SimMIM) of one backbone on one corpus. "
                "Each run: losses per step, the corpus datasets it read (digest = DVC hash), "
                "the backbone as an MLflow model.",
    "finetune": "Segmentation fine-tuning, from scratch or from a pretrained backbone. Each run: "
                "losses, validation Dice, the dataset it read (digest = DVC hash), the model "
                "(registered as dataset-backbone-init, e.g. demo_btcv-unet-hybridmim).",
    "evaluate": "Test-split evaluation of one fine-tuned model: Dice and HD95 per class on the "
                "grid named by the run's 'grid' tag; per-case values in metrics.json / "
                "per_case.csv.",
}
TRAINING_STAGES = ("pretrain", "finetune")
# MLflow's SQL store keeps a dataset digest in 36 characters: a DVC directory hash
# ("<md5>.dir") fits exactly; a computed sha256 is cut to its first 36 hex digits.
DIGEST_LENGTH = 36


def source_tags(spec: dict[str, Any], stage: str, git: dict[str, str]) -> dict[str, str]:
    """MLflow's own source tags: the UI's "Source" column and the commit link."""
    rule = (spec.get("provenance") or {}).get("rule")
    tags = {"mlflow.source.name": f"workflow/Snakefile rule {rule}" if rule
            else f"hybridmim {stage}",
            "mlflow.source.type": "JOB" if rule else "LOCAL"}
    if git.get("git_commit") not in (None, "", "unknown"):
        tags["mlflow.source.git.commit"] = git["git_commit"]
    return tags


def log_datasets(client: Any, run_id: str, data_dirs: list[str], tags: dict[str, str],
                 context: str) -> None:
    """One MLflow dataset per data folder, with the hash the provenance tags recorded."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for folder in data_dirs:
        name = Path(folder).name
        digest = tags.get(f"data_hash.{name}") or "unknown"
        with warnings.catch_warnings():  # a local path matches MLflow's source kind twice
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(folder).resolve()))
        dataset = MetaDataset(source=source, name=name, digest=digest[:DIGEST_LENGTH])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", context),
            InputTag("hash_source", tags.get(f"data_hash_source.{name}", "unknown")),
            InputTag("full_hash", digest)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, interval: float) -> Iterator[None]:
    """CPU/GPU memory and utilisation as ``system/*`` metrics while a training run is open."""
    if not interval or interval <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=float(interval),
                                       tracking_uri=tracking_uri)
        monitor.start()
    except Exception as error:  # monitoring must never stop a training job
        log.warning("system metrics are off for run %s: %s", run_id, error)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
            try:  # MLflow drops the samples taken since its last log: keep them (short runs)
                last = monitor.aggregate_metrics()
                if last:
                    monitor.publish_metrics(last)
                    monitor.mlflow_logger.flush()
            except Exception as error:
                log.debug("last system metrics sample not logged: %s", error)


def registered_name(spec: dict[str, Any]) -> str:
    """One registry entry per dataset × backbone × init (fractions and seeds are versions)."""
    wildcards = (spec.get("provenance") or {}).get("wildcards") or {}
    return "-".join(wildcards.get(key) or spec[key]["name"]
                    for key in ("dataset", "backbone", "init"))


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent model API reads the process-wide tracking URI (the registry follows it):
    point it at ``uri`` for the block and put back exactly what was there, also
    $MLFLOW_TRACKING_URI, which setting the URI exports."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_network_model(run: Any, model_path: str | os.PathLike,
                      registered_model_name: str | None = None) -> str | None:
    """Log the network of a published model.pt as the run's MLflow model ``model``; returns its
    model URI (``models:/<name>/<version>`` when registered)."""
    if getattr(run, "client", None) is None:  # NullRun (DDP rank > 0)
        return None
    import mlflow.pytorch
    import monai
    import numpy as np
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from hybridmim.checkpoints import LoadedModel

    loaded = LoadedModel.from_file(model_path)
    network = loaded.network.eval()
    # JSON-safe copies: MLflow writes the metadata into the MLmodel file, and
    # predict.models.load_model reads these two keys back.
    metadata = json.loads(json.dumps({"hybridmim": loaded.meta, "network": loaded.network_record},
                                     default=str))
    channels, outputs = loaded.channels_in_out()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs, -1, -1, -1), "logits")]))
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    with using_tracking_uri(run.client.tracking_uri):
        # Created in the run's experiment (Model.log alone would use the default experiment,
        # where the UI's runs list does not look for a run's models).
        logged = mlflow.initialize_logged_model(name="model", source_run_id=run.run_id,
                                                experiment_id=experiment_id)
        info = Model.log(artifact_path=None, name="model", flavor=mlflow.pytorch,
                         run_id=run.run_id, model_id=logged.model_id,
                         pytorch_model=network, signature=signature, metadata=metadata,
                         registered_model_name=registered_model_name,
                         serialization_format="pickle",  # pt2 needs an example to trace
                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                           f"monai=={monai.__version__}"])
    if registered_model_name and info.registered_model_version:
        model_uri = f"models:/{registered_model_name}/{info.registered_model_version}"
    else:
        model_uri = info.model_uri
    run.set_tags({"model_uri": model_uri})
    return model_uri
