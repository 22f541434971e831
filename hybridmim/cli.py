"""The `hybridmim` command: one entry point, one sub-command per workflow step.

Every Snakemake rule and DVC stage calls a sub-command here. Training and evaluation commands take
a job spec (JSON, built by hybridmim.config from the validated config); data commands take the
config file (as DVC does) or the dataset's config block as JSON (as Snakemake does). Heavy
libraries are imported inside the commands so that `hybridmim --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("hybridmim")

# Sub-commands that call one library function; "module:function", imported only when it runs.
DATA_STEPS = [  # (step, functions run in turn on the dataset's config, help)
    ("acquire", ["hybridmim.data.pipeline:acquire_dataset"],
     "download/locate/generate, convert and check → data/raw/<ds>"),
    ("preprocess", ["hybridmim.data.pipeline:preprocess_and_split"],
     "preprocess and split → data/processed/<ds>"),
    ("prepare", ["hybridmim.data.pipeline:acquire_dataset",
                 "hybridmim.data.pipeline:preprocess_and_split"], "acquire + preprocess"),
    ("preprocess-pretrain", ["hybridmim.data.prepare.pretrain_cache:build_native_cache"],
     "native-spacing pretraining cache (RAS, no resampling, whole volumes) → data/pretrain/<ds>; "
     "needs data/raw/<ds> and the split of data/processed/<ds>"),
]
JOBS = [  # (command, function that runs a job spec, help)
    ("pretrain", "hybridmim.pretrain.train:run_pretraining",
     "HybridMIM / SimMIM pretraining of one backbone on a corpus"),
    ("finetune", "hybridmim.finetune.train:run_finetuning",
     "segmentation fine-tuning from scratch or a pretrained model"),
    ("evaluate", "hybridmim.evaluate.run:run_evaluation",
     "test-split evaluation (Dice, HD95) with sliding windows"),
]


def _function(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _read_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.spec_file:
        path = Path(args.spec_file)
        if not path.exists():
            raise SystemExit(f"error: spec file {path} does not exist")
        spec = json.loads(path.read_text())
        # The console shows only the file name: the job's log keeps the whole spec.
        log.info("job spec %s: %s", path, json.dumps(spec, sort_keys=True))
        return spec
    if args.spec:
        try:
            return json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --spec is not valid JSON ({exc})") from exc
    raise SystemExit("error: give the job spec with --spec JSON or --spec-file PATH "
                     "(`hybridmim spec ...` prints one from a config)")


def _dataset_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """A config dict holding at least this dataset's block, and the dataset name."""
    if args.dataset_json:
        return {"datasets": {args.dataset: json.loads(args.dataset_json)}}, args.dataset
    if not args.config:
        raise SystemExit("error: give --config FILE (or --dataset-json) with --dataset")
    from hybridmim.config import load_config

    config = load_config(args.config)
    if args.dataset not in config["datasets"]:
        raise SystemExit(f"error: dataset {args.dataset!r} is not under datasets: in "
                         f"{args.config} (known: {sorted(config['datasets'])})")
    return config, args.dataset


# ------------------------------------------------------------------------------------------------
# Commands
def cmd_data_step(args: argparse.Namespace) -> None:
    config, name = _dataset_config(args)
    for target in args.steps:
        result = _function(target)(config, name, data_root=args.data_root)
    print(result)  # the folder the last step wrote


def cmd_data_version(args: argparse.Namespace) -> None:
    from hybridmim.data.versioning import version_dataset, version_pretrain_cache

    if args.pretrain:
        result = version_pretrain_cache(args.dataset, args.out, args.project_root)
    else:
        block = json.loads(args.dataset_json) if args.dataset_json else None
        result = version_dataset(args.dataset, args.out, args.project_root, block)
    print(json.dumps(result, indent=2))


def cmd_tracking_init(args: argparse.Namespace) -> None:
    from hybridmim.tracking.store import init_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.uri)
    init_store(uri, args.artifact_root)
    if args.marker:
        from hybridmim.atomic import write_json

        write_json(args.marker, {"tracking_uri": uri, "artifact_root": args.artifact_root})
    print(uri)


def cmd_job(args: argparse.Namespace) -> None:
    print(json.dumps(_function(args.runner)(_read_spec(args)), indent=2, default=str))


def cmd_report(args: argparse.Namespace) -> None:
    from hybridmim.report import build_report
    from hybridmim.tracking.store import resolve_tracking_uri

    written = build_report(resolve_tracking_uri(args.tracking_uri), args.metrics,
                           args.pretrain_metrics or [], args.out)
    for path in written.values():
        print(path)


def cmd_audit(args: argparse.Namespace) -> None:
    from hybridmim.report.audit import main as audit_main

    code = audit_main(results_dir=args.results, tracking_uri=args.tracking_uri,
                      project_root=args.project_root, strict=args.strict,
                      recompute=args.recompute, sample=args.sample,
                      sample_seed=args.sample_seed, html=args.html)
    summary = Path(args.results) / "audit.md"
    if code and summary.exists():
        # Snakemake deletes a failed job's outputs: keep the findings in the job's log.
        sys.stderr.write(summary.read_text())
    sys.exit(code)


def cmd_spec(args: argparse.Namespace) -> None:
    from hybridmim import config as cfg

    config = cfg.load_config(args.config)
    if args.stage == "pretrain":
        spec = cfg.pretrain_spec(config, args.backbone, args.method, args.corpus)
    else:  # a fine-tuning job and its evaluation are named alike
        build = cfg.finetune_spec if args.stage == "finetune" else cfg.evaluate_spec
        spec = build(config, args.dataset, args.backbone, args.init, args.fraction, args.seed)
    print(json.dumps(spec, indent=2, sort_keys=True))


def cmd_predict(args: argparse.Namespace) -> None:
    from hybridmim.predict.run import predict_inputs

    for path in predict_inputs(args.model, args.input, args.out, tracking_uri=args.tracking_uri,
                               overlap=args.overlap, precision=args.precision):
        print(path)


def cmd_export(args: argparse.Namespace) -> None:
    from hybridmim.export.bundle import export_bundle

    print(export_bundle(args.model, args.out, tracking_uri=args.tracking_uri,
                        overlap=args.overlap))


# ------------------------------------------------------------------------------------------------
# Options shared by several commands
def _add_tracking_uri(p: argparse.ArgumentParser, what: str = "MLflow store") -> None:
    p.add_argument("--tracking-uri", default=None,
                   help=f"{what} (None: $MLFLOW_TRACKING_URI, else the results DB "
                        "sqlite:///results/mlflow/mlflow.db)")


def _add_dataset_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (a key under datasets:)")


def _add_data_commands(sub: Any) -> None:
    data = sub.add_parser("data", help="acquire, preprocess and split datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="STEP")
    for name, steps, text in DATA_STEPS:
        p = data_sub.add_parser(name, help=text, description=text)
        _add_dataset_name(p)
        p.add_argument("--config", help="experiment config YAML (e.g. config/config.yaml)")
        p.add_argument("--dataset-json", help="the dataset's config block as JSON")
        p.add_argument("--data-root", default="data",
                       help="root of raw/, processed/ and pretrain/")
        p.set_defaults(func=cmd_data_step, steps=steps)
    for name, pretrain, text in [
        ("version", False, "record the dataset's hashes in dvc.lock (dvc commit)"),
        ("version-pretrain", True, "record data/pretrain/<ds>'s hash in dvc.lock (dvc commit)"),
    ]:
        p = data_sub.add_parser(name, help=text, description=text)
        _add_dataset_name(p)
        p.add_argument("--out", required=True, help="JSON file that receives the recorded hashes")
        p.add_argument("--project-root", default=".", help="the DVC project (repository) root")
        if not pretrain:
            p.add_argument("--dataset-json", help="the dataset's config block as JSON: versions "
                           "a dataset that dvc.yaml does not list through datasets/dvc.yaml")
        p.set_defaults(func=cmd_data_version, pretrain=pretrain)


def _add_predict_and_export(sub: Any) -> None:
    text = "segment NIfTI images with a trained model (label maps on the inputs' own grids)"
    p = sub.add_parser("predict", help=text, description=text)
    p.add_argument("--model", required=True,
                   help="a fine-tuned model.pt, an MLflow run id, or an MLflow model URI "
                        "(models:/<name>/<version>, runs:/<run id>/model)")
    p.add_argument("--input", required=True,
                   help="a NIfTI file or a folder of them; multi-channel models take one 4D "
                        "file per case or <case>_<channel>.nii.gz files")
    p.add_argument("--out", required=True, help="folder receiving <case>.nii.gz label maps")
    _add_tracking_uri(p, "MLflow store for run ids / model URIs")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="inference precision (auto: as the evaluation job; bf16 where the GPU "
                        "or CPU has it natively, fp16 on a GPU without it, else fp32)")
    p.set_defaults(func=cmd_predict)

    text = ("write a trained (fine-tuned or pretrained) model as a MONAI bundle that runs with "
            "stock MONAI: python -m monai.bundle run --config_file configs/inference.json")
    p = sub.add_parser("export", help="a trained model as a MONAI bundle", description=text)
    p.add_argument("--model", required=True,
                   help="a model.pt, an MLflow run id, or an MLflow model URI "
                        "(models:/<name>/<version>)")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    _add_tracking_uri(p, "MLflow store for run ids / model URIs and for the model card's test "
                         "metrics")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="sliding-window overlap written into configs/inference.json")
    p.set_defaults(func=cmd_export)


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command's help lists each option's default (sub-parsers are of this class)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from hybridmim import __version__
    from hybridmim.report.recompute import DEFAULT_SAMPLE

    parser = _Parser(
        prog="hybridmim",
        description="HybridMIM reproduction: data, pretraining, fine-tuning, evaluation, report "
                    "and audit. The Snakemake workflow (workflow/Snakefile) calls these.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: HYBRIDMIM_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"hybridmim {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)

    track = sub.add_parser("tracking", help="MLflow store management")
    track_sub = track.add_subparsers(dest="tracking_command", required=True, metavar="STEP")
    p = track_sub.add_parser("init", help="create the MLflow store and experiments once")
    p.add_argument("--uri", default=None, help="tracking URI (default: env or sqlite results DB)")
    p.add_argument("--artifact-root", default="results/mlflow/artifacts",
                   help="where run artifacts are stored")
    p.add_argument("--marker", help="write a JSON marker file when done (for Snakemake)")
    p.set_defaults(func=cmd_tracking_init)

    for name, runner, text in JOBS:
        p = sub.add_parser(name, help=text, description=text)
        spec = p.add_mutually_exclusive_group()
        spec.add_argument("--spec", help="job spec as a JSON string (what Snakemake passes)")
        spec.add_argument("--spec-file", help="job spec as a JSON file")
        p.set_defaults(func=cmd_job, runner=runner)

    p = sub.add_parser("report", help="tables and figures from MLflow")
    p.add_argument("--metrics", nargs="+", required=True, help="evaluate metrics.json files")
    p.add_argument("--pretrain-metrics", nargs="*", help="pretrain metrics.json files")
    _add_tracking_uri(p)
    p.add_argument("--out", default="results", help="folder receiving tables/ and figures/")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="re-verify every reported number's provenance")
    p.add_argument("--results", default="results", help="the results folder to audit")
    _add_tracking_uri(p)
    p.add_argument("--project-root", default=".", help="the project (repository) root")
    p.add_argument("--strict", action="store_true",
                   help="warnings fail too (a run from a dirty git tree, a commit not here)")
    p.add_argument("--recompute", action="store_true",
                   help="re-compute Dice/HD95 of every test case from its saved prediction "
                        "(without it: a seeded sample per run)")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                   help="cases per evaluate run re-computed without --recompute")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the sampled cases (mixed with the run id)")
    p.add_argument("--html", default=None,
                   help="Snakemake HTML report to audit (None: <results>/report.html, "
                        "skipped when absent)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("spec", help="print the job spec a config gives for one job")
    p.add_argument("stage", choices=["pretrain", "finetune", "evaluate"], help="job kind")
    p.add_argument("--config", default="config/config.yaml", help="experiment config YAML")
    for opt in ("backbone", "method", "corpus", "dataset", "init"):
        p.add_argument(f"--{opt}", help=f"{opt} name as the config names it")
    p.add_argument("--fraction", default="1", help="label fraction (finetune/evaluate)")
    p.add_argument("--seed", default="0", help="seed (finetune/evaluate)")
    p.set_defaults(func=cmd_spec)
    _add_predict_and_export(sub)
    return parser


# ------------------------------------------------------------------------------------------------
# Errors: a user's mistake (bad config, bad data, missing file) is one message and exit code 2; a
# bug in this code keeps its traceback. --debug (or HYBRIDMIM_DEBUG=1) always shows it.
USER_ERROR_EXIT_CODE = 2


def _is_user_error(exc: BaseException) -> bool:
    import gzip
    import tarfile
    import zipfile

    if isinstance(exc, (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile,
                        tarfile.TarError, gzip.BadGzipFile)):
        return True
    if any(cls.__module__.startswith("hybridmim") for cls in type(exc).__mro__):
        return True  # the project's own error classes (ManualDownloadRequired, StoreError, ...)
    if isinstance(exc, RuntimeError) and exc.__traceback__ is not None:
        # A plain RuntimeError the project raised on purpose (e.g. a failed `dvc` command).
        import traceback

        innermost = traceback.extract_tb(exc.__traceback__)[-1].filename
        return Path(innermost).resolve().is_relative_to(Path(__file__).resolve().parent)
    return False


def _user_error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # "[Errno 2] No such file or directory: 'x'" → "x: No such file or directory"
        target = f" -> {exc.filename2}" if exc.filename2 else ""
        return f"{exc.filename}{target}: {exc.strerror}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{type(exc).__name__}: {text}"


def run_command(args: argparse.Namespace) -> None:
    """Run the chosen sub-command; turn a user error into one logged message and exit code 2."""
    debug = args.debug or os.environ.get("HYBRIDMIM_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except Exception as exc:
        if debug or not _is_user_error(exc):
            raise
        log.error("%s\n(run with `hybridmim --debug ...` for the traceback)",
                  _user_error_message(exc))
        sys.exit(USER_ERROR_EXIT_CODE)


def main(argv: list[str] | None = None) -> None:
    from hybridmim.progress import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    run_command(args)


if __name__ == "__main__":
    main()
