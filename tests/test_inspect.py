"""``ah.inspect`` against PEFT itself: what we read from config + headers must be what PEFT builds.

Each adapter fixture is loaded with ``PeftModel.from_pretrained`` on its base; its LoRA layers
(``peft.tuners.lora.LoraLayer``) are the reference for module names, shapes, ranks, alphas and
scalings, ``get_peft_model_state_dict`` for the parameter count, ``peft_config["default"]`` for the
config fields, and ``layer.get_delta_weight`` (the dense update, in float64) for the spectra.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fixtures_models as fm
import numpy as np
import pytest
import torch
from peft_helpers import FITTING_ADAPTERS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah


# adapter fixture -> (base fixture, task)
ADAPTERS: dict[str, tuple[str, str]] = {**FITTING_ADAPTERS, "llama_lora_wide": ("llama_base_wide", "causal-lm")}
SPECTRUM_ADAPTERS = ["llama_lora", "llama_rslora", "llama_patterns", "llama_dora", "gpt2_lora"]
PEFT_PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _private_hash_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """sha256 digests are cached on disk; keep that cache out of the user's home."""
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path_factory.mktemp("adapters_cache")))


@dataclass
class PeftCase:
    name: str
    adapter_dir: Path
    model: Any  # peft.PeftModel
    layers: dict[str, Any]  # module name relative to the base model -> peft LoraLayer
    report: ah.InspectReport  # ah.inspect(adapter, modules=True)

    @property
    def rows(self) -> dict[str, ah.ModuleRow]:
        assert self.report.modules is not None
        return {row.name: row for row in self.report.modules}

    @property
    def peft_config(self) -> Any:
        return self.model.peft_config["default"]


def peft_lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """PEFT's LoRA layers holding the ``default`` adapter, keyed by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            assert name.startswith(PEFT_PREFIX), name
            layers[name.removeprefix(PEFT_PREFIX)] = module
    return layers


def load_with_peft(adapter_dir: Path, base_dir: Path, task: str) -> Any:
    from peft import PeftModel

    base = fm.load_base_model(base_dir, task)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


@pytest.fixture(scope="module", params=list(ADAPTERS))
def case(request: pytest.FixtureRequest) -> PeftCase:
    name = request.param
    base_name, task = ADAPTERS[name]
    adapter_dir: Path = request.getfixturevalue(name)
    base_dir: Path = request.getfixturevalue(base_name)
    model = load_with_peft(adapter_dir, base_dir, task)
    return PeftCase(
        name=name,
        adapter_dir=adapter_dir,
        model=model,
        layers=peft_lora_layers(model),
        report=ah.inspect(adapter_dir, modules=True),
    )


# ------------------------------------------------------------------------------ per module


def test_module_names_match_peft(case: PeftCase) -> None:
    assert case.layers, "PEFT built no LoRA layer"
    assert set(case.rows) == set(case.layers)
    assert case.report.num_modules == len(case.layers)
    assert [row.name for row in case.report.modules or []] == sorted(case.layers)


def test_module_rank_alpha_scale_match_peft(case: PeftCase) -> None:
    cfg = case.peft_config
    for name, layer in case.layers.items():
        row = case.rows[name]
        r, alpha, scaling = layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]
        assert row.rank == r, name
        assert row.alpha == alpha, name
        assert row.scale == pytest.approx(scaling, rel=1e-12), name
        expected = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        assert row.scale == pytest.approx(expected, rel=1e-12), name
    assert case.report.ranks == sorted({layer.r["default"] for layer in case.layers.values()})


def test_module_shapes_dtype_and_dora_match_peft(case: PeftCase) -> None:
    with safe_open(case.adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for name, layer in case.layers.items():
        row = case.rows[name]
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        assert row.kind == "linear"
        assert (row.rank, row.d_in) == tuple(a.shape), name
        assert (row.d_out, row.rank) == tuple(b.shape), name
        assert row.dtype == stored[f"{PEFT_PREFIX}{name}.lora_A.weight"] == "F32"
        assert row.dora == bool(layer.use_dora["default"]), name
        if row.dora:
            assert "default" in layer.lora_magnitude_vector


def test_parameter_count_matches_peft_state_dict(case: PeftCase) -> None:
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(case.model)
    assert case.report.num_parameters == sum(t.numel() for t in saved.values())
    assert sum(case.report.dtypes.values()) == case.report.num_parameters


def _enum_value(v: Any) -> Any:
    """PEFT keeps peft_type / task_type as enums or as plain strings, depending on how the config was made."""
    return getattr(v, "value", v)


def test_config_fields_match_peft(case: PeftCase) -> None:
    cfg, rep = case.peft_config, case.report
    assert rep.peft_type == "LORA" == _enum_value(cfg.peft_type)
    assert rep.r == cfg.r
    assert rep.lora_alpha == cfg.lora_alpha
    assert rep.use_rslora is cfg.use_rslora
    assert rep.scale_rule == ("alpha/sqrt(r)" if cfg.use_rslora else "alpha/r")
    assert rep.use_dora is cfg.use_dora
    assert rep.fan_in_fan_out is cfg.fan_in_fan_out
    assert rep.rank_pattern == dict(cfg.rank_pattern or {})
    assert rep.alpha_pattern == dict(cfg.alpha_pattern or {})
    if isinstance(cfg.target_modules, str):
        assert rep.target_modules == cfg.target_modules
    else:
        assert rep.target_modules == sorted(cfg.target_modules)
    # PEFT's sequence-classification wrapper appends "classifier"/"score" to the list each time it is built.
    want_mts = list(dict.fromkeys(cfg.modules_to_save)) if cfg.modules_to_save else None
    assert rep.modules_to_save == want_mts
    assert rep.base_model_name_or_path == cfg.base_model_name_or_path
    assert rep.task_type == _enum_value(cfg.task_type)


def test_specific_fixture_facts(case: PeftCase) -> None:
    """A few facts spelled out, so a bug shared by us and the comparison above cannot hide."""
    rep, rows = case.report, case.rows
    if case.name == "llama_rslora":
        assert rep.use_rslora
        assert all(r.scale == pytest.approx(16 / math.sqrt(8)) for r in rows.values())
        assert rep.num_modules == 8
    elif case.name == "llama_patterns":
        assert rows["model.layers.0.self_attn.v_proj"].rank == 4
        assert rows["model.layers.1.self_attn.q_proj"].rank == 2
        assert rows["model.layers.1.self_attn.q_proj"].scale == pytest.approx(16 / 2)
        assert rows["model.layers.0.self_attn.q_proj"].rank == 8
        assert rows["model.layers.0.mlp.up_proj"].alpha == 32
        assert rows["model.layers.0.mlp.up_proj"].scale == pytest.approx(32 / 8)
        assert rep.ranks == [2, 4, 8]
    elif case.name == "llama_dora":
        assert rep.use_dora and all(r.dora for r in rows.values())
    elif case.name == "gpt2_lora":
        assert rep.fan_in_fan_out
        assert (rows["transformer.h.0.attn.c_attn"].d_out, rows["transformer.h.0.attn.c_attn"].d_in) == (192, 64)
        assert (rows["transformer.h.0.mlp.c_proj"].d_out, rows["transformer.h.0.mlp.c_proj"].d_in) == (64, 256)
    elif case.name == "roberta_lora":
        assert rep.modules_to_save is not None and "classifier" in rep.modules_to_save
        assert rep.num_parameters > sum(r.rank * (r.d_in + r.d_out) for r in rows.values())
    elif case.name == "llama_all_linear":
        assert rep.num_modules == 14
    else:
        assert all(not r.dora for r in rows.values())


# ---------------------------------------------------------------------------- file facts


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_sha256_file_size_and_dtypes(request: pytest.FixtureRequest, name: str) -> None:
    adapter_dir: Path = request.getfixturevalue(name)
    weights = adapter_dir / "adapter_model.safetensors"
    rep = ah.inspect(adapter_dir)
    assert rep.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert rep.file_size == weights.stat().st_size
    assert Path(rep.tensor_file or "") == weights
    assert rep.format == "peft"
    assert rep.warnings == []
    assert rep.modules is None and rep.spectrum is None
    numel: dict[str, int] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel[sl.get_dtype()] = numel.get(sl.get_dtype(), 0) + math.prod(sl.get_shape())
    assert rep.dtypes == numel
    # the second call (served from the digest cache) agrees
    assert ah.inspect(adapter_dir).sha256 == rep.sha256
    assert ah.inspect(adapter_dir, sha256=False).sha256 is None


def test_sha256_follows_a_rewritten_file(llama_lora: Path, copy_adapter: Callable[..., Path]) -> None:
    adapter = copy_adapter(llama_lora)
    weights = adapter / "adapter_model.safetensors"
    first = ah.inspect(adapter).sha256
    tensors = load_file(weights)
    tensors = {k: v * 2 for k, v in tensors.items()}
    weights.unlink()  # a new file (new inode), as a tool that writes atomically would leave
    save_file(tensors, weights, metadata={"format": "pt"})
    second = ah.inspect(adapter).sha256
    assert second == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert second != first


# -------------------------------------------------------------------------------- spectrum


def _energy_rank(s: np.ndarray, energy: float) -> int:
    e = s.astype(np.float64) ** 2
    cum = np.cumsum(e) / e.sum()
    return int(np.argmax(cum >= energy)) + 1


@pytest.mark.parametrize("name", SPECTRUM_ADAPTERS)
def test_spectrum_matches_peft_dense_delta(request: pytest.FixtureRequest, name: str) -> None:
    base_name, task = ADAPTERS[name]
    adapter_dir: Path = request.getfixturevalue(name)
    model = load_with_peft(adapter_dir, request.getfixturevalue(base_name), task)
    layers = peft_lora_layers(model)
    rep = ah.inspect(adapter_dir, spectrum=True)
    assert rep.spectrum is not None
    spectra = {s.name: s for s in rep.spectrum}
    assert set(spectra) == set(layers)
    for mod_name, layer in layers.items():
        layer64 = copy.deepcopy(layer).to(torch.float64)
        with torch.no_grad():
            dense = layer64.get_delta_weight("default")
        assert dense.dtype == torch.float64
        ref = torch.linalg.svdvals(dense)
        r = layer.r["default"]
        got = torch.tensor(spectra[mod_name].singular_values, dtype=torch.float64)
        assert got.shape == (r,), mod_name
        sigma1 = float(ref[0])
        assert sigma1 > 0
        torch.testing.assert_close(got, ref[:r], rtol=1e-9, atol=1e-12 * sigma1)
        # beyond rank r the dense update has nothing left
        assert ref.shape[0] > r
        assert float(ref[r:].abs().max()) < 1e-10 * sigma1
        fro = float(torch.linalg.matrix_norm(dense, ord="fro"))
        assert spectra[mod_name].fro_norm == pytest.approx(fro, rel=1e-10)
        s_np = ref.numpy()
        assert spectra[mod_name].effective_rank_90 == _energy_rank(s_np, 0.90), mod_name
        assert spectra[mod_name].effective_rank_99 == _energy_rank(s_np, 0.99), mod_name
        assert 1 <= spectra[mod_name].effective_rank_90 <= spectra[mod_name].effective_rank_99 <= r


def test_spectrum_in_fp32_agrees_with_peft_fp32_delta(llama_lora: Path, llama_base: Path) -> None:
    """PEFT's delta as it would merge it (fp32) is within fp32 rounding of our float64 spectrum."""
    layers = peft_lora_layers(load_with_peft(llama_lora, llama_base, "causal-lm"))
    spectra = {s.name: s for s in ah.inspect(llama_lora, spectrum=True).spectrum or []}
    for mod_name, layer in layers.items():
        with torch.no_grad():
            dense = layer.get_delta_weight("default")
        assert dense.dtype == torch.float32
        ref = torch.linalg.svdvals(dense)[: layer.r["default"]].double()
        got = torch.tensor(spectra[mod_name].singular_values, dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref[0]))


def test_zero_update_reports_zero_norm_and_no_rank(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    adapter = copy_adapter(llama_lora, "zero_b")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    zeroed = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()}
    assert sum(".lora_B." in k for k in zeroed) == 4
    weights.unlink()
    save_file(zeroed, weights, metadata={"format": "pt"})

    rep = ah.inspect(adapter, modules=True, spectrum=True)
    assert rep.spectrum is not None and len(rep.spectrum) == 4
    for s in rep.spectrum:
        assert s.fro_norm == 0.0
        assert s.effective_rank_90 is None
        assert s.effective_rank_99 is None
        assert s.singular_values == [0.0] * 8
    # the rest of the report is unaffected
    assert rep.r == 8 and rep.num_modules == 4
    assert json.loads(json.dumps(rep.to_dict()))["spectrum"][0]["effective_rank_90"] is None
