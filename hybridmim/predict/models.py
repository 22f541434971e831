"""Find a trained model from what a user types: a model.pt file, an MLflow run id, or an MLflow
model URI (``models:/<name>/<version>``, ``runs:/<run id>/model``).

Every form gives the same pair: the stock MONAI network and the model's metadata (crop, labels,
window, preprocessing…), which `hybridmim predict` and `hybridmim export` need. MLflow models
carry that metadata in their MLmodel file (hybridmim.tracking.catalog logs it there).
"""
from __future__ import annotations

import re
from pathlib import Path

from hybridmim.checkpoints import LoadedModel

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_model(reference: str, tracking_uri: str | None = None) -> LoadedModel:
    """Resolve ``reference`` (file, run id, models:/ or runs:/ URI) to a network and its meta."""
    if Path(reference).is_file():
        return LoadedModel.from_file(reference)
    if reference.startswith(("models:/", "runs:/")):
        return _load_mlflow(reference, tracking_uri)
    if RUN_ID.match(reference):
        # MLflow 3 resolves runs:/<id>/model to the LoggedModel "model" the run logged.
        return _load_mlflow(f"runs:/{reference}/model", tracking_uri)
    raise FileNotFoundError(f"--model {reference!r}: no such file, and not an MLflow run id "
                            "(32 hex digits) or model URI (models:/<name>/<version>)")


def _load_mlflow(uri: str, tracking_uri: str | None) -> LoadedModel:
    import mlflow
    import mlflow.pytorch

    from hybridmim.tracking.catalog import using_tracking_uri
    from hybridmim.tracking.store import resolve_tracking_uri

    with using_tracking_uri(resolve_tracking_uri(tracking_uri)):
        try:
            info = mlflow.models.get_model_info(uri)
        except Exception as error:  # MlflowException, OSError: one message for the user
            raise FileNotFoundError(f"--model {uri}: not found in the MLflow store "
                                    f"{mlflow.get_tracking_uri()} ({str(error)[:200]}); pass "
                                    "--tracking-uri or the model.pt path (only fine-tuning and "
                                    "pretraining runs log a model)") from None
        meta = dict((info.metadata or {}).get("hybridmim") or {})
        record = dict((info.metadata or {}).get("network") or {})
        if not meta:
            raise ValueError(f"--model {uri}: the MLflow model records no hybridmim metadata "
                             "(crop, labels, preprocessing); it was not logged by hybridmim")
        network = mlflow.pytorch.load_model(uri, map_location="cpu")
    return LoadedModel(network, meta, uri, record)
