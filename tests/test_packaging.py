"""The package as a user installs it: `pip install .` (not editable) into a fresh virtual
environment gives a working `hybridmim` with its config schema and data files inside; the
declared dependencies, the lock and the conda environments agree; LICENSE matches pyproject."""
import ast
import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN

TOP_LEVEL_SKIP = {".venv", ".git", "results", "data", "logs", ".snakemake", "build", "dvc-storage",
                  ".pytest_cache"}


def _skip(folder, names):
    """What a clone does not have: the root's work folders, caches anywhere."""
    top = Path(folder) == ROOT
    return {n for n in names if (top and n in TOP_LEVEL_SKIP) or n == "__pycache__"
            or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the project installed from a copy of the source tree (links kept, as a
    clone has them). Dependencies are not downloaded again: the venv sees the test
    environment's site-packages through a path entry (which, unlike a site directory, does not
    activate the editable install that lives there)."""
    uv = shutil.which("uv", path=str(VENV_BIN))
    if uv is None:
        pytest.skip("uv is not installed in the test environment (scripts/install.sh adds it)")
    root = tmp_path_factory.mktemp("pkg")
    source = root / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_skip)
    venv = root / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([uv, "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--python", str(venv / "bin" / "python"), str(source)], check=True,
                   timeout=300)
    return venv


def run(venv, *args, cwd):
    return subprocess.run([str(venv / "bin" / "hybridmim"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_installed_package_is_self_contained(installed, tmp_path):
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import hybridmim.resources as r; "
                            "print(r.RESOURCES); print(r.CONFIG_SCHEMA.is_symlink())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    package_dir, is_link = where.stdout.split()
    assert package_dir.startswith(str(installed)), "hybridmim was imported from the source tree"
    assert is_link == "False"  # the wheel carries the content, not a dangling link
    # The config schema and the job spec schemas (which refer to each other by file name).
    schemas = sorted((ROOT / "workflow" / "schemas").glob("*.schema.yaml"))
    assert len(schemas) >= 6
    for home in [*schemas, ROOT / "config" / "paper_results.yaml"]:
        assert (Path(package_dir) / home.name).read_bytes() == home.read_bytes(), home.name

    help_text = run(installed, "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "predict" in help_text.stdout
    version = run(installed, "--version", cwd=tmp_path)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version.stdout.strip() == f"hybridmim {project['version']}"
    spec = run(installed, "spec", "evaluate", "--config", str(ROOT / "config" / "config.yaml"),
               "--dataset", "demo_spleen", "--backbone", "unet", "--init", "scratch",
               cwd=tmp_path)
    assert spec.returncode == 0, spec.stderr
    assert '"grid": "original"' in spec.stdout  # a schema default: the schema was read
    check = subprocess.run([str(python), "-c", "import json, sys; from hybridmim.spec_schemas "
                            "import check_spec; check_spec(json.load(sys.stdin), 'evaluate')"],
                           input=spec.stdout, cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the shipped spec schemas resolve their $refs


def test_every_option_has_help_with_its_default():
    import argparse

    from hybridmim.cli import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    for name, parser in walk(build_parser(), "hybridmim"):
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                assert "(default:" in text, f"{name}: defaults are not shown"


def test_imports_declared_and_environments_follow_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=~!; ]", d, maxsplit=1)[0].lower()
                for d in project["dependencies"]}
    imported = set()
    for path in (ROOT / "hybridmim").rglob("*.py"):
        # The syntax tree, not a text search: a docstring line "from the ..." is no import.
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names) - {"hybridmim"}}
    names = {"yaml": "pyyaml"}
    missing = {m for m in third_party if names.get(m, m) not in declared}
    # pandas' DataFrame.to_markdown imports tabulate at call time.
    missing |= {"tabulate"} - declared
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    requirements_in = (ROOT / "requirements.in").read_text().lower()
    lock = (ROOT / "requirements.lock").read_text().lower()
    for name in sorted(declared):
        assert re.search(rf"^{re.escape(name)}\b", requirements_in, re.MULTILINE), name
        assert re.search(rf"^{re.escape(name)}==", lock, re.MULTILINE) or name == "torch", name
    # Snakemake rebuilds a conda env when its file changes; the lock's hash in the file makes a
    # lock change a file change.
    digest = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    for env in ("environment.yml", "workflow/envs/hybridmim.yaml"):
        recorded = re.search(r"requirements\.lock sha256: ([0-9a-f]{64})",
                             (ROOT / env).read_text())
        assert recorded and recorded.group(1) == digest, (
            f"{env}: write '# requirements.lock sha256: {digest}' (the lock changed)")
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"] == "Apache-2.0" and "Apache License" in license_text
    assert "Version 2.0" in license_text and project["license-files"] == ["LICENSE"]


def test_every_table_driven_command_runs_an_existing_function():
    # cli.DATA_STEPS and cli.JOBS name their functions as "module:function" strings (imported
    # only when the command runs): a moved or renamed function must fail here, not in a workflow.
    from hybridmim.cli import DATA_STEPS, JOBS, _function

    targets = [t for _, steps, _ in DATA_STEPS for t in steps] + [t for _, t, _ in JOBS]
    assert len(targets) == 8
    for target in targets:
        assert callable(_function(target)), target
