"""harmonic.utils.provenance: what a result records about the machine it was computed on."""

from __future__ import annotations

import torch

from harmonic.utils import provenance as prov
from harmonic.utils.devices import native_bf16


def test_device_description_names_the_cpu_its_instruction_set_and_bfloat16_support():
    info = prov.device_description("cpu", {"fused_focal_backend": "native"})
    assert info["device"] == "cpu" and info["fused_focal_backend"] == "native"
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NO AVX", "SVE256", "SVE128")
    assert info["cpu_native_bf16"] is native_bf16(torch.device("cpu"))
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]


def test_the_cpu_model_is_read_from_cpuinfo_or_the_platform(monkeypatch):
    def no_cpuinfo(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(prov.platform, "processor", lambda: "")
    monkeypatch.setattr(prov.platform, "machine", lambda: "x86_64")
    assert prov._cpu_model() == "x86_64"
