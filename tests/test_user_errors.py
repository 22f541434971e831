"""A user's mistakes, through the real CLI: each is ONE message naming the user's own file or key
(never a temporary folder), with exit code 2 and no traceback (`--debug` shows it); a typo in a
key gets the closest valid key; a failed data job is not retried by the workflow."""
import gzip
import json
import subprocess
import sys
import zipfile

import pytest

from hybridmim import cli
from test_own_dataset import make_mri_folder

LABELS = {"0": "background", "1": "kidney", "2": "tumour"}


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    return make_mri_folder(tmp_path_factory.mktemp("own") / "my_brains", cases=3,
                           shape=(12, 12, 10))


def run_cli(capsys, *argv):
    """(exit code, stderr) of `hybridmim ARGV` in this process."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    return stop.value.code, capsys.readouterr().err


def acquire(capsys, tmp_path, name, block):
    return run_cli(capsys, "data", "acquire", "--dataset", name, "--dataset-json",
                   json.dumps(block), "--data-root", str(tmp_path / "data"))


def assert_one_clean_message(code, err, *expected):
    assert code == 2, err
    assert "Traceback" not in err and err.count(" ERROR ") == 1, err
    for text in expected:
        assert text in err, err
    assert ".tmp-" not in err, f"names a temporary folder: {err}"


def _copy_with(brains, tmp_path, edit):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(brains, folder)
    edit(folder)
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_BLOCKS = {
    "missing folder": (lambda b, t: {"folder": str(t / "nope"), "modality": "MRI",
                                     "labels": LABELS},
                       lambda b, t: [f"{t / 'nope'} (datasets.mine.folder): no such folder"]),
    "folder is an archive": (lambda b, t: {"folder": str(_zip(b, t)), "modality": "MRI",
                                           "labels": LABELS},
                             lambda b, t: [f"{t / 'my_brains.zip'} (datasets.mine.folder) is a "
                                           f"file, not a folder: extract the archive"]),
    "typo lables": (lambda b, t: {"folder": str(b), "modality": "MRI", "lables": LABELS},
                    lambda b, t: ["unknown key 'lables' (did you mean 'labels'?)",
                                  "'manual_path'"]),
    "typo foldr": (lambda b, t: {"foldr": str(b), "modality": "MRI", "labels": LABELS},
                   lambda b, t: ["unknown key 'foldr' (did you mean 'folder'?)"]),
    "typo num_case": (lambda b, t: {"folder": str(b), "modality": "MRI", "labels": LABELS,
                                    "num_case": 3},
                      lambda b, t: ["unknown key 'num_case' (did you mean 'num_cases'?)"]),
    "label map differs": (lambda b, t: {"folder": str(b), "modality": "MRI",
                                        "labels": {"0": "background", "1": "kidney"}},
                          lambda b, t: [f"{b}: 1 problem(s)", "the config block of dataset "
                                        "'mine' [0, 1]"]),
    "truncated image": (lambda b, t: {"folder": str(_copy_with(
                            b, t, lambda f: _truncate(f / "imagesTr" / "brain_001.nii.gz"))),
                            "modality": "MRI", "labels": LABELS},
                        lambda b, t: [f"{t / 'edited'}: 1 problem(s)",
                                      "brain_001: ./imagesTr/brain_001.nii.gz: unreadable"]),
    "two channels declared": (lambda b, t: {"folder": str(b), "modality": "MRI",
                                            "channels": ["t1", "t2"], "labels": LABELS},
                              lambda b, t: ["declares 1 channel(s) ['T1'], while the config "
                                            "block of dataset 'mine' expects 2"]),
}


def _zip(brains, tmp_path):
    archive = tmp_path / "my_brains.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(brains / "dataset.json", "my_brains/dataset.json")
    return archive


@pytest.mark.parametrize("fault", sorted(BAD_BLOCKS))
def test_bad_own_dataset_is_one_message_naming_the_users_file(fault, brains, tmp_path, capsys):
    make_block, expected = BAD_BLOCKS[fault]
    code, err = acquire(capsys, tmp_path, "mine", make_block(brains, tmp_path))
    assert_one_clean_message(code, err, *expected(brains, tmp_path))
    assert not (tmp_path / "data" / "raw" / "mine").exists()
    leftovers = list((tmp_path / "data" / "raw").glob(".*")) if (tmp_path / "data" /
                                                                 "raw").exists() else []
    assert not leftovers, leftovers


def test_minimal_dataset_json_and_single_channel_mri_are_accepted(brains, tmp_path, capsys):
    index = json.loads((brains / "dataset.json").read_text())
    assert set(index) == {"modality", "labels", "training"}
    cli.main(["data", "acquire", "--dataset", "mine", "--data-root", str(tmp_path / "data"),
              "--dataset-json", json.dumps({"folder": str(brains), "modality": "MRI",
                                            "labels": LABELS})])
    assert (tmp_path / "data" / "raw" / "mine" / "dataset.json").is_file()


@pytest.mark.parametrize("dataset, make_source, expected", [
    # The documented "please download" message of a dataset behind a registration.
    ("btcv", None, ["needs a registration", "RawData.zip"]),
    # A copy of a published archive that is not the published file (md5).
    ("msd_spleen", lambda t: _write(t / "Task09_Spleen.tar", b"not the archive"),
     ["md5 differs from the published"]),
    # A truncated download of an archive behind a registration.
    ("brats2020", lambda t: _truncated_zip(t / "MICCAI_BraTS2020_TrainingData.zip"),
     ["MICCAI_BraTS2020_TrainingData.zip"]),
])
def test_acquisition_errors_are_one_message(dataset, make_source, expected, tmp_path, capsys,
                                            monkeypatch):
    monkeypatch.delenv("SYNAPSE_AUTH_TOKEN", raising=False)
    block = {"manual_path": str(make_source(tmp_path))} if make_source else {}
    code, err = acquire(capsys, tmp_path, dataset, block)
    assert_one_clean_message(code, err, *expected)


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated_zip(path):
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3):
            zf.writestr(f"MICCAI_BraTS2020_TrainingData/BraTS20_Training_00{i}/x.nii.gz",
                        gzip.compress(b"x" * 5000))
    _truncate(path)
    return path


def test_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, "-m", "hybridmim.cli", "--debug", "data", "acquire", "--dataset",
            "mine", "--data-root", str(tmp_path), "--dataset-json",
            json.dumps({"folder": str(tmp_path / "nope"), "modality": "CT", "labels": LABELS})]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "no such folder" in proc.stderr
    proc = subprocess.run([a for a in argv if a != "--debug"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_workflow_does_not_retry_a_data_job_that_failed_on_bad_input(tmp_path):
    """The default profile retries failed jobs once (for preempted training); a data job on bad
    input fails the same way again, so it runs once and its error is printed once."""
    from conftest import copy_project

    project = copy_project(tmp_path / "project")
    (project / "mine.yaml").write_text(json.dumps({"datasets": {"mine": {
        "folder": str(tmp_path / "not_there"), "modality": "CT", "labels": LABELS}}}))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "data/raw/mine/dataset.json",
                           "--cores", "1", "--configfile", "config/config.yaml", "mine.yaml"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Trying to restart job" not in output, output[-3000:]
    assert output.count("no such folder") == 1, output[-3000:]
    log = (project / "logs" / "data" / "acquire_mine.log").read_text()
    assert "Traceback" not in log and log.count("no such folder") == 1, log


def test_typo_in_a_dataset_block_fails_when_the_config_is_read(tmp_path):
    from conftest import ROOT

    from hybridmim.config import load_config

    config = (ROOT / "config" / "config.yaml").read_text().replace(
        "demo_spleen: {num_cases: 10", "demo_spleen: {num_case: 10")
    (tmp_path / "config.yaml").write_text(config)
    with pytest.raises(ValueError, match=r"datasets.demo_spleen: unknown key 'num_case' \(did "
                                         r"you mean 'num_cases'\?\)"):
        load_config(tmp_path / "config.yaml")
