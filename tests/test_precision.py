"""`precision: auto` on CPUs and the recorded reason (hybridmim/precision.py)."""
from __future__ import annotations

import pytest
import torch

from hybridmim import runtime
from hybridmim.precision import CPU_FLAGS_ENV, choose_precision, cpu_flags

CPU = torch.device("cpu")

# The flags of real CPUs: an AMD EPYC (Zen 4, AVX512-BF16 without AMX), an Intel Sapphire Rapids
# (AMX), an older Xeon with AVX512 but no bf16 instructions, an Arm Neoverse (bf16, but not one of
# the x86 instruction sets the choice looks for).
ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
SAPPHIRE = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
SKYLAKE = {"avx2", "avx512f", "avx512bw"}
NEOVERSE = {"asimd", "sve", "bf16"}


@pytest.mark.parametrize("flags, expected, native", [
    (ZEN4, "bf16", "avx512_bf16"), (SAPPHIRE, "bf16", "amx_bf16"),
    (SKYLAKE, "fp32", None), (NEOVERSE, "fp32", None), (set(), "fp32", None)])
def test_auto_is_bf16_only_with_native_bf16_instructions(flags, expected, native):
    choice = choose_precision("auto", CPU, flags=flags)
    assert choice.precision == expected
    assert choice.reason.startswith("auto:")
    assert (native in choice.reason) if native else ("without native bf16" in choice.reason)
    assert choice.tags() == {"precision": expected, "precision.reason": choice.reason}


def test_explicit_choices_on_cpu_and_bad_values():
    plain = SKYLAKE
    assert choose_precision("fp32", CPU, flags=ZEN4).precision == "fp32"
    emulated = choose_precision("bf16", CPU, flags=plain)
    assert emulated.precision == "bf16" and "emulated" in emulated.reason
    # fp16 is a GPU mode: on a CPU the job runs in fp32 and says so.
    fp16 = choose_precision("fp16", CPU, flags=plain)
    assert fp16.precision == "fp32" and "fp16" in fp16.reason
    with pytest.raises(ValueError, match="auto|fp32|bf16|fp16"):
        choose_precision("half", CPU)


def test_detection_agrees_with_torch_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
    detected = cpu_flags()
    assert ("avx512_bf16" in detected) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_bf16" in detected) == torch.cpu._is_amx_tile_supported()
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2,avx512f")
    assert runtime.precision_choice("auto", CPU).precision == "fp32"
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512_bf16")
    assert runtime.precision_choice("auto", CPU).precision == "bf16"


def test_auto_keeps_fp32_on_cpu_for_backbones_slower_in_bf16():
    flags = ZEN4
    assert choose_precision("auto", CPU, flags=flags, backbone="unet").precision == "bf16"
    swin = choose_precision("auto", CPU, flags=flags, backbone="swinunetr")
    assert swin.precision == "fp32" and "swinunetr" in swin.reason
    # An explicit request is obeyed.
    assert choose_precision("bf16", CPU, flags=flags, backbone="swinunetr").precision == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice is under test")
def test_predict_and_evaluate_set_up_a_model_file_alike(monkeypatch):
    """`hybridmim predict` and the evaluation share prepare_for_inference: the backbone's CPU
    exception holds for both (predict once ran SwinUNETR in bf16), and bf16 gets the guard."""
    from hybridmim.checkpoints import LoadedModel
    from hybridmim.models import build_segmentation_network
    from hybridmim.predict.inference import prepare_for_inference
    from test_models import TINY

    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512_bf16")
    chosen = {}
    for name in ("unet", "swinunetr"):
        network, class_path, kwargs = build_segmentation_network(TINY[name], 2, crop=64)
        loaded = LoadedModel(network.train(), {}, name, {"class": class_path, "kwargs": kwargs})
        forward, device, choice = prepare_for_inference(loaded, "auto")
        assert forward is network and not network.training and device == CPU
        chosen[name] = choice.precision
        guarded = [m for m in network.modules() if "forward" in vars(m)]
        assert bool(guarded) == (choice.precision == "bf16")
    assert chosen == {"unet": "bf16", "swinunetr": "fp32"}
