"""The experiment config: schema validation, cross-key checks, spec builders, the DAG."""
import json
import subprocess
import sys

import pytest

from hybridmim import config as hcfg
from hybridmim.hashing import spec_hash

from conftest import ROOT, demo_config_with


_load = demo_config_with


def test_demo_config_validates_and_fills_defaults():
    config = hcfg.load_config(ROOT / "config" / "config.yaml")
    assert config["finetuning"]["seeds"] == [0]
    assert config["pretraining"]["methods"]["hybridmim"]["loss_weights"]["con"] == 0.01
    assert config["data_versioning"]["dvc"] is True


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["pretraining"]["methods"]["hybridmim"].update(mask_ratio=1.5), "mask_ratio"),
    (lambda c: c.update(bogus_key=1), "bogus_key"),
    (lambda c: c["pretraining"]["optim"].pop("steps"), "steps"),
    (lambda c: c["backbones"]["unet"].update(name="resnet"), "resnet"),
])
def test_schema_errors_name_the_key(tmp_path, mutate, key):
    with pytest.raises(hcfg.ConfigError) as err:
        hcfg.load_config(_load(tmp_path, mutate))
    assert key in str(err.value)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["finetuning"]["datasets"].append("nope"), "finetuning.datasets"),
    (lambda c: c["finetuning"]["inits"].append("mae"), "finetuning.inits"),
    (lambda c: c["pretraining"]["corpora"]["ct"]["datasets"].append("demo_brats"),
     "mixes channel counts"),
    (lambda c: c["pretraining"]["geometry"].update(crop=40), "pretraining.geometry"),
    (lambda c: c["finetuning"]["resources"].update(gpus=2), "finetuning.resources.gpus"),
])
def test_cross_key_errors_name_the_key(tmp_path, mutate, key):
    config_path = _load(tmp_path, mutate)
    with pytest.raises(hcfg.ConfigError) as err:
        config = hcfg.load_config(config_path)
        hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")
    assert key in str(err.value)


def test_specs_are_complete_and_stable():
    config = hcfg.load_config(ROOT / "config" / "config.yaml")
    pre = hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")
    assert pre["backbone"]["in_channels"] == 1
    assert [d["name"] for d in pre["data"]["datasets"]] == ["demo_btcv", "demo_liver",
                                                           "demo_spleen"]
    assert pre["data"]["datasets"][0]["window"]["b_min"] == pytest.approx(0.001)
    mri = hcfg.pretrain_spec(config, "unet", "hybridmim", "mri")
    assert mri["backbone"]["in_channels"] == 4
    ft = hcfg.finetune_spec(config, "demo_brats", "unet", "hybridmim", "1", "0")
    assert ft["init"]["checkpoint"] == "results/pretrain/unet/hybridmim/mri/model.pt"
    assert ft["init"]["first_layer"] == "keep"  # the MRI corpus has the same 4 channels
    assert ft["dataset"]["regions"] == {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}
    scratch = hcfg.finetune_spec(config, "demo_btcv", "unet", "scratch", "1", "0")
    assert scratch["init"]["checkpoint"] is None
    assert json.loads(json.dumps(ft)) == ft  # JSON-serialisable
    assert spec_hash(ft) == spec_hash(hcfg.finetune_spec(config, "demo_brats", "unet",
                                                         "hybridmim", "1", "0"))
    assert spec_hash(ft) != spec_hash(hcfg.finetune_spec(config, "demo_brats", "unet",
                                                         "hybridmim", "1", "1"))


def test_simmim_is_full_reconstruction_pr_only(tmp_path):
    def add(c):
        c["pretraining"]["methods"]["simmim"] = {"kind": "simmim"}
    config = hcfg.load_config(_load(tmp_path, add))
    spec = hcfg.pretrain_spec(config, "unet", "simmim", "ct")
    assert spec["method"]["box"] == "full"
    assert spec["method"]["loss_weights"] == {"pr": 1.0, "num": 0.0, "loc": 0.0, "con": 0.0,
                                              "cl": 0.0}


def _every_spec(config: dict) -> dict[str, dict]:
    """Every job spec of a config's DAG (pretraining: every backbone x method x corpus)."""
    pre, specs = config["pretraining"], {}
    for bb in pre["backbones"]:
        for method in [*pre["methods"], *hcfg.variants_of(config)]:
            for corpus in pre["corpora"]:
                specs[f"pretrain/{bb}/{method}/{corpus}"] = hcfg.pretrain_spec(config, bb, method,
                                                                               corpus)
    for job in hcfg.finetune_grid(config):
        args = (config, job["dataset"], job["backbone"], job["init"], job["fraction"], job["seed"])
        specs["finetune/" + "/".join(job.values())] = hcfg.finetune_spec(*args)
        specs["evaluate/" + "/".join(job.values())] = hcfg.evaluate_spec(*args)
    return specs


def test_specs_match_their_schemas_and_keep_their_hashes():
    """A spec's hash is its job's identity (MLflow tag config_hash, the audit): refactoring the
    builders must not change any spec of the shipped configs. tests/data/spec_hashes.json holds
    the hashes; a deliberate change of a spec rewrites it (write the dict this test builds)."""
    from hybridmim.spec_schemas import check_spec

    recorded = json.loads((ROOT / "tests" / "data" / "spec_hashes.json").read_text())
    for name in ("config.yaml", "paper.yaml"):
        specs = _every_spec(hcfg.load_config(ROOT / "config" / name))
        for job, spec in specs.items():
            check_spec(spec, job.split("/")[0])
        hashes = {job: spec_hash(spec) for job, spec in specs.items()}
        changed = sorted(job for job in hashes.keys() | recorded[name].keys()
                         if hashes.get(job) != recorded[name].get(job))
        assert not changed, f"config/{name}: specs changed or appeared/vanished: {changed[:10]}"


def test_schemas_have_no_stray_keys():
    """In a YAML flow mapping an unquoted comma ends the value: `{description: a (b, c).}` reads
    as the description "a (b" plus a stray key "c)." with no value, which jsonschema ignores and
    Snakemake's report prints truncated. No schema keyword or property is ever null."""
    import yaml

    def nulls(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if value is None:
                    yield f"{'/'.join(map(str, path))}: {key!r}"
                yield from nulls(value, [*path, key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from nulls(value, [*path, i])

    for schema in sorted((ROOT / "workflow" / "schemas").glob("*.yaml")):
        found = list(nulls(yaml.safe_load(schema.read_text()), []))
        assert not found, f"{schema.name}: keys without a value (quote the text?): {found}"


def _snakemake(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_snakemake_lint_is_clean():
    proc = _snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_plans_the_whole_grid():
    proc = _snakemake("-n", "--cores", "2", "--quiet", "rules")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    # 2 HybridMIM + SimMIM and 3 ablations on CT; 8 main cells + 4 arms + 2 scarce-label cells
    for rule, count in [("pretrain", 6), ("finetune", 14), ("evaluate", 14), ("report", 1)]:
        assert any(line.split()[:2] == [rule, str(count)] for line in text.splitlines()), text


def test_invalid_config_fails_before_any_job(tmp_path):
    bad = _load(tmp_path, lambda c: c["finetuning"].update(batch_size=0))
    proc = _snakemake("-n", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    assert "batch_size" in proc.stdout + proc.stderr


def test_paper_config_plans_the_full_dag_without_data():
    proc = _snakemake("-n", "--cores", "8", "--quiet", "rules", "--configfile",
                      "config/paper.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = {parts[0]: int(parts[1]) for parts in
              (line.split() for line in proc.stdout.splitlines()) if len(parts) == 2
              and parts[1].isdigit()}
    # 4 datasets x 3 backbones x 3 inits x 4 label fractions x 3 seeds + 12 ablations x 3 seeds
    assert counts["finetune"] == counts["evaluate"] == 432 + 36
    # 3 backbones x 2 methods x 2 corpora (CT, MRI) + 12 UNet ablations on CT
    assert counts["pretrain"] == 24
    assert counts["acquire_data"] == counts["preprocess_data"] == 4


# ------------------------------------------------------------------------------------------------
# Ablation variants and subgrids
def test_variants_are_named_by_their_change_and_resolved_against_the_base(tmp_path):
    def change_base(c):
        c["pretraining"]["methods"]["hybridmim"]["temperature"] = 0.3
    config = hcfg.load_config(_load(tmp_path, change_base))
    assert list(hcfg.variants_of(config)) == ["hybridmim-no_cl", "hybridmim-mask0.6",
                                              "hybridmim-hierarchical_masking"]
    spec = hcfg.pretrain_spec(config, "unet", "hybridmim-no_cl", "ct")
    base = hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")
    assert spec["method"]["loss_weights"] == {**base["method"]["loss_weights"], "cl": 0.0}
    assert spec["method"]["temperature"] == 0.3  # a change of the base reaches its variants
    assert spec["method"]["name"] == "hybridmim-no_cl"
    evaluate = hcfg.evaluate_spec(config, "demo_spleen", "unet", "hybridmim-mask0.6", "1", "0")
    assert evaluate["variant"] == {"of": "hybridmim", "changes": "mask0.6",
                                   "pretrained_as": "hybridmim-mask0.6", "corpus": "ct"}
    assert "variant" not in hcfg.evaluate_spec(config, "demo_spleen", "unet", "hybridmim", "1",
                                               "0")


def test_variant_names_for_each_ablation_axis():
    from hybridmim.variants import variant_name

    assert variant_name("hybridmim", {"loss_weights": {"num": 0, "loc": 0, "con": 0, "cl": 0}}) \
        == "hybridmim-pr_only"
    assert variant_name("hybridmim", {"geometry": {"crop": 128, "region": 64}}) \
        == "hybridmim-crop128-region64"
    assert variant_name("hybridmim", {"masking": "hierarchical"}) \
        == "hybridmim-hierarchical_masking"
    assert variant_name("hybridmim", {"region_grouping": "raster", "mask_ratio": 0.2}) \
        == "hybridmim-mask0.2-raster_grouping"
    # The fidelity flags (docs/method.md) are ablation axes too: the schema accepts them.
    assert variant_name("hybridmim", {"consistency": "cross_entropy",
                                      "pr_normalisation": "sample"}) \
        == "hybridmim-pr_sample_mean-con_cross_entropy"


def test_a_variant_may_flip_a_fidelity_flag(tmp_path):
    def flip(c):
        c["pretraining"]["variants"]["hybridmim"].append({"consistency": "cross_entropy"})
    config = hcfg.load_config(_load(tmp_path, flip))
    spec = hcfg.pretrain_spec(config, "unet", "hybridmim-con_cross_entropy", "ct")
    assert spec["method"]["consistency"] == "cross_entropy"
    assert hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")["method"]["consistency"] \
        == "authors"


@pytest.mark.parametrize("variant, key", [
    ({"mask_ration": 0.6}, "mask_ration"),
    ({"loss_weights": {"cll": 0.0}}, "cll"),
    ({"kind": "simmim"}, "kind"),
    ({"geometry": {"patch": 5}}, "pretraining.variants.hybridmim[0].geometry"),
    ({"geometry": {"region": 32}}, "pretraining.variants.hybridmim[0].geometry"),
])
def test_bad_variant_fails_at_parse_time_naming_the_key(tmp_path, variant, key):
    def mutate(c):
        c["pretraining"]["variants"] = {"hybridmim": [variant]}
    with pytest.raises(hcfg.ConfigError) as err:
        hcfg.load_config(_load(tmp_path, mutate))
    assert key in str(err.value)


def test_subgrid_init_must_be_declared(tmp_path):
    def mutate(c):
        c["finetuning"]["subgrids"] = [{"datasets": ["demo_spleen"], "inits": ["hybridmim-no_pr"]}]
    with pytest.raises(hcfg.ConfigError) as err:
        hcfg.load_config(_load(tmp_path, mutate))
    assert "finetuning.subgrids[0].inits" in str(err.value)
    assert "hybridmim-no_cl" in str(err.value)  # the message lists what exists


def test_variant_with_an_existing_spec_is_not_pretrained_twice(tmp_path):
    def mutate(c):
        # mask_ratio 0.4 is the base's own value: the same pretraining job under another name.
        c["pretraining"]["variants"]["hybridmim"].append({"mask_ratio": 0.4})
        c["finetuning"]["subgrids"][0]["inits"].append("hybridmim-mask0.4")
    config = hcfg.load_config(_load(tmp_path, mutate))
    same = hcfg.pretrain_spec(config, "unet", "hybridmim-mask0.4", "ct")
    base = hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")
    assert spec_hash(same) != spec_hash(base)  # the names differ ...
    assert hcfg.pretrain_content_hash(same) == hcfg.pretrain_content_hash(base)  # ... not the job
    targets = hcfg.pretrain_targets(config)
    assert "results/pretrain/unet/hybridmim-mask0.4/ct/model.pt" not in targets
    assert len(targets) == 6
    ft = hcfg.finetune_spec(config, "demo_spleen", "unet", "hybridmim-mask0.4", "1", "0")
    assert ft["init"]["checkpoint"] == "results/pretrain/unet/hybridmim/ct/model.pt"
    assert ft["variant"]["pretrained_as"] == "hybridmim"
    assert len(hcfg.finetune_grid(config)) == 15


@pytest.mark.parametrize("mutate, names", [
    (lambda c: c["pretraining"]["corpora"]["ct"]["datasets"].append("lits"),
     ["pretraining.corpora.ct.datasets", "'lits'", "datasets"]),
    (lambda c: c["pretraining"]["backbones"].append("vnet"),
     ["pretraining.backbones", "'vnet'", "backbones"]),
    (lambda c: c["finetuning"]["datasets"].append("lits"),
     ["finetuning.datasets", "'lits'"]),
    (lambda c: c["finetuning"]["inits"].append("mae"),
     ["finetuning.inits", "'mae'", "pretraining.variants"]),
    (lambda c: c["finetuning"].update(subgrids=[{"backbones": ["vnet"]}]),
     ["finetuning.subgrids[0].backbones", "'vnet'"]),
])
def test_grid_names_must_be_declared(tmp_path, mutate, names):
    """Every name a list of the grid refers to is defined; the error names the list and the name."""
    with pytest.raises(hcfg.ConfigError) as error:
        hcfg.load_config(_load(tmp_path, mutate))
    for part in names:
        assert part in str(error.value)
