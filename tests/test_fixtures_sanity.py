"""Sanity checks for the shared model/adapter fixtures in conftest.py."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import fixtures_models as fm
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file


ADAPTER_FIXTURES = [
    ("llama_lora", "llama_base", "causal-lm"),
    ("llama_rslora", "llama_base", "causal-lm"),
    ("llama_patterns", "llama_base", "causal-lm"),
    ("llama_dora", "llama_base", "causal-lm"),
    ("llama_all_linear", "llama_base", "causal-lm"),
    ("gpt2_lora", "gpt2_base", "causal-lm"),
    ("roberta_lora", "roberta_base", "seq-cls"),
    ("llama_lora_wide", "llama_base_wide", "causal-lm"),
]


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


@pytest.mark.parametrize(("adapter_name", "base_name", "task"), ADAPTER_FIXTURES)
def test_adapter_changes_forward_output(
    request: pytest.FixtureRequest, adapter_name: str, base_name: str, task: str
) -> None:
    adapter_dir: Path = request.getfixturevalue(adapter_name)
    base_dir: Path = request.getfixturevalue(base_name)

    cfg = _adapter_config(adapter_dir)
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    ids = fm.sample_input_ids()
    model = fm.load_base_model(base_dir, task)
    with torch.no_grad():
        base_out = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
        peft_model.eval()
        lora_out = peft_model(input_ids=ids).logits
    assert base_out.shape == lora_out.shape
    assert torch.isfinite(lora_out).all()
    assert not torch.allclose(base_out, lora_out, atol=1e-5)
    # Every saved lora_B is non-zero.
    for key, t in _adapter_tensors(adapter_dir).items():
        if ".lora_B." in key:
            assert t.abs().sum() > 0, key


def test_adapters_are_deterministic(llama_lora: Path, llama_base: Path, tmp_path: Path) -> None:
    rebuilt = fm.build_named_adapter("llama_lora", llama_base, tmp_path / "again")
    a, b = _adapter_tensors(llama_lora), _adapter_tensors(rebuilt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_llama_lora_layout(llama_lora: Path) -> None:
    tensors = _adapter_tensors(llama_lora)
    assert len(tensors) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (8, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 8)  # 2 kv heads
    cfg = _adapter_config(llama_lora)
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_llama_patterns_ranks_and_alphas(llama_patterns: Path, llama_base: Path) -> None:
    tensors = _adapter_tensors(llama_patterns)
    prefix = "base_model.model.model.layers"
    expected_rank = {
        "0.self_attn.q_proj": 8,
        "1.self_attn.q_proj": 2,  # full-name rank_pattern key
        "0.self_attn.v_proj": 4,  # suffix rank_pattern key
        "1.self_attn.v_proj": 4,
        "0.mlp.up_proj": 8,
        "1.mlp.up_proj": 8,
    }
    for mod, r in expected_rank.items():
        assert tensors[f"{prefix}.{mod}.lora_A.weight"].shape[0] == r, mod
        assert tensors[f"{prefix}.{mod}.lora_B.weight"].shape[1] == r, mod

    cfg = _adapter_config(llama_patterns)
    assert cfg["rank_pattern"] == {"v_proj": 4, "model.layers.1.self_attn.q_proj": 2}
    assert cfg["alpha_pattern"] == {"up_proj": 32}

    model = PeftModel.from_pretrained(fm.load_base_model(llama_base), llama_patterns)
    layers = model.base_model.model.model.layers
    assert layers[0].mlp.up_proj.scaling["default"] == pytest.approx(32 / 8)
    assert layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(16 / 8)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(16 / 4)
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(16 / 2)


def test_llama_rslora_scaling(llama_rslora: Path, llama_base: Path) -> None:
    assert _adapter_config(llama_rslora)["use_rslora"] is True
    model = PeftModel.from_pretrained(fm.load_base_model(llama_base), llama_rslora)
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.scaling["default"] == pytest.approx(16 / math.sqrt(8))


def test_llama_dora_has_magnitude_vectors(llama_dora: Path) -> None:
    tensors = _adapter_tensors(llama_dora)
    assert _adapter_config(llama_dora)["use_dora"] is True
    q_mag = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    v_mag = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"]
    assert q_mag.shape == (64,)
    assert v_mag.shape == (32,)
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 4


def test_llama_all_linear_targets(llama_all_linear: Path) -> None:
    tensors = _adapter_tensors(llama_all_linear)
    modules = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in tensors}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in k for k in tensors)
    assert len(tensors) == 2 * 7 * 2


def test_roberta_modules_to_save(roberta_lora: Path, roberta_base: Path) -> None:
    tensors = _adapter_tensors(roberta_lora)
    saved_cls = {k for k in tensors if ".classifier." in k}
    assert saved_cls == {
        "base_model.model.classifier.dense.weight",
        "base_model.model.classifier.dense.bias",
        "base_model.model.classifier.out_proj.weight",
        "base_model.model.classifier.out_proj.bias",
    }
    base = load_file(roberta_base / "model.safetensors")
    for key in saved_cls:
        base_key = key.removeprefix("base_model.model.")
        assert base[base_key].shape == tensors[key].shape
        assert not torch.equal(base[base_key], tensors[key]), key
    assert "classifier" in _adapter_config(roberta_lora)["modules_to_save"]


def test_sharded_base_has_index_and_shards(llama_base_sharded: Path, llama_base: Path) -> None:
    index = json.loads((llama_base_sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in llama_base_sharded.glob("model-*-of-*.safetensors"))
    assert len(shard_files) >= 3
    assert set(index["weight_map"].values()) == set(shard_files)
    assert not (llama_base_sharded / "model.safetensors").exists()

    single = load_file(llama_base / "model.safetensors")
    assert set(index["weight_map"]) == set(single)
    merged: dict[str, torch.Tensor] = {}
    for name in shard_files:
        merged.update(load_file(llama_base_sharded / name))
    for key, t in single.items():
        assert torch.equal(merged[key], t), key


def test_wide_base_and_adapter(llama_base_wide: Path, llama_lora_wide: Path) -> None:
    cfg = json.loads((llama_base_wide / "config.json").read_text())
    assert cfg["hidden_size"] == 96
    a = _adapter_tensors(llama_lora_wide)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 96)


def test_gpt2_conv1d_shapes(gpt2_base: Path, gpt2_lora: Path) -> None:
    with safe_open(gpt2_base / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 192]  # (d_in, d_out)
        assert f.get_slice("transformer.h.0.attn.c_proj.weight").get_shape() == [64, 64]
        assert f.get_slice("transformer.h.0.mlp.c_fc.weight").get_shape() == [64, 256]
        assert f.get_slice("transformer.h.0.mlp.c_proj.weight").get_shape() == [256, 64]
    assert "lm_head.weight" not in keys  # tied to wte, not stored

    tensors = _adapter_tensors(gpt2_lora)
    # LoRA factors keep nn.Linear orientation even for Conv1D: A (r, d_in), B (d_out, r).
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape == (4, 256)
    assert _adapter_config(gpt2_lora)["fan_in_fan_out"] is True


def test_copy_adapter_is_independent(
    llama_lora: Path, copy_adapter: Callable[..., Path], fixture_dir: Path, tmp_path: Path
) -> None:
    copy1 = copy_adapter(llama_lora)
    copy2 = copy_adapter(llama_lora)
    assert copy1 != copy2
    assert copy1.parent == fixture_dir
    (copy1 / "adapter_config.json").write_text("{not json")
    assert json.loads((llama_lora / "adapter_config.json").read_text())["r"] == 8

    helper_copy = fm.copy_adapter(llama_lora, tmp_path)
    assert (helper_copy / "adapter_model.safetensors").is_file()
    assert helper_copy.parent == tmp_path


def test_isolation_env(tmp_path: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["NO_COLOR"] == "1"
    assert os.environ["TERM"] == "dumb"
    assert os.environ["COLUMNS"] == "200"
    assert os.environ["ADAPTERS_LOAD_PLUGINS"] == ""
    assert "ADAPTERS_DEBUG" not in os.environ
    assert os.environ["HF_HUB_CACHE"].startswith(os.environ["HF_HOME"])
    assert not Path(os.environ["HF_HOME"]).is_relative_to(tmp_path)
