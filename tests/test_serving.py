"""`validate --target gguf|vllm`: what llama.cpp and vLLM would refuse or silently lose (artifact/serving.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_models import build_lora_adapter, load_base_model, randomize_adapter_weights
from peft import LoraConfig, get_peft_model
from peft_helpers import randomize_embedding_lora

from adapterhub_cli import api as ah
from adapterhub_cli.cli.main import build_cli


def _codes(adapter: Path, base: Path, target: str, **kw: object) -> dict[str, str]:
    report = ah.validate(adapter, base=base, target=target, **kw)
    return {f.code: f.severity for f in report.findings if f.code.startswith(target)}


def _cli(*args: str) -> object:
    return CliRunner().invoke(build_cli(), list(args))


@pytest.fixture(scope="module")
def llama_embed_lora(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA on embed_tokens and lm_head (PEFT also saves their base_layer copies: save_embedding_layers)."""
    import torch

    torch.manual_seed(0)
    model = get_peft_model(
        load_base_model(llama_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    )
    randomize_adapter_weights(model, seed=3)
    randomize_embedding_lora(model, seed=4)
    out = tmp_path_factory.mktemp("embed") / "lora"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_saved_embed(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    return build_lora_adapter(llama_base, tmp_path_factory.mktemp("saved") / "lora", cfg, seed=5)


# --------------------------------------------------------------------------------------------------- gguf


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_gguf_flags_quantized_factors(scheme, llama_lora, llama_base, tmp_path):
    q = tmp_path / "q"
    ah.quantize(llama_lora, q, scheme=scheme)
    assert _codes(q, llama_base, "gguf") == {"gguf-quantized": "error"}
    # ... which convert --to gguf handles: it reads the factors dequantized
    ah.convert(q, tmp_path / "q.gguf", to="gguf", base=llama_base)


def test_gguf_casts_are_not_flagged(llama_lora, llama_base, tmp_path):
    ah.quantize(llama_lora, tmp_path / "bf16", scheme="bf16")
    assert _codes(tmp_path / "bf16", llama_base, "gguf") == {}


def test_gguf_embedding_lora_is_not_flagged(llama_embed_lora, llama_saved_embed, llama_base, tmp_path):
    """llama.cpp exports lora_embedding_A/B (token_embd) and lm_head LoRA (output); full copies it refuses."""
    assert _codes(llama_embed_lora, llama_base, "gguf") == {}
    ah.convert(llama_embed_lora, tmp_path / "e.gguf", to="gguf", base=llama_base)
    assert _codes(llama_saved_embed, llama_base, "gguf") == {"gguf-modules-to-save": "error"}


def test_gguf_tied_lm_head(tmp_path):
    """A Gemma base ties lm_head to the embeddings: llama.cpp's converter refuses a LoRA on it, and so do we."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size = 2, 16, 128
    GemmaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lora = build_lora_adapter(
        tmp_path / "base",
        tmp_path / "lora",
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]),
        seed=1,
    )
    assert _codes(lora, tmp_path / "base", "gguf")["gguf-tied-lm-head"] == "error"
    res = _cli("convert", str(lora), "--to", "gguf", "--base", str(tmp_path / "base"), "-o", str(tmp_path / "x.gguf"))
    assert res.exit_code == 2 and "tied" in res.output and not (tmp_path / "x.gguf").exists()


def test_gguf_scale_findings_point_to_convert(llama_rslora, llama_patterns, llama_base):
    for adapter in (llama_rslora, llama_patterns):
        report = ah.validate(adapter, base=llama_base, target="gguf")
        msgs = [f.message for f in report.findings if f.code in ("gguf-rslora", "gguf-alpha-pattern")]
        assert msgs and all("convert ADAPTER --to gguf" in m for m in msgs)


def test_target_gguf_and_alias_agree(llama_rslora, llama_base):
    a = _cli("validate", str(llama_rslora), "--base", str(llama_base), "--target", "gguf", "--json")
    b = _cli("validate", str(llama_rslora), "--base", str(llama_base), "--gguf", "--json")
    assert a.exit_code == b.exit_code == 1
    assert json.loads(a.stdout)["findings"] == json.loads(b.stdout)["findings"]


# --------------------------------------------------------------------------------------------------- vLLM


def test_vllm_plain_lora_is_clean(llama_lora, llama_base):
    assert _codes(llama_lora, llama_base, "vllm") == {}


def test_vllm_refusals(llama_dora, llama_saved_embed, llama_patterns, llama_base, roberta_lora, roberta_base):
    assert _codes(llama_dora, llama_base, "vllm")["vllm-dora"] == "error"
    assert _codes(llama_saved_embed, llama_base, "vllm")["vllm-modules-to-save"] == "error"
    assert _codes(llama_patterns, llama_base, "vllm") == {"vllm-pattern-ignored": "warning"}
    # a classifier head is what vLLM does accept (on a classification model)
    assert _codes(roberta_lora, roberta_base, "vllm") == {"vllm-classification-head": "info"}


def test_vllm_rank_limit(llama_base, tmp_path):
    lora = build_lora_adapter(
        llama_base, tmp_path / "r24", LoraConfig(r=24, lora_alpha=8, target_modules=["q_proj"]), seed=2
    )
    report = ah.validate(lora, base=llama_base, target="vllm")
    (f,) = [f for f in report.findings if f.code == "vllm-rank-too-high"]
    assert "--max-lora-rank 32" in f.message and not report.ok
    assert _codes(lora, llama_base, "vllm", max_lora_rank=32) == {}
    res = _cli("validate", str(lora), "--base", str(llama_base), "--target", "vllm", "--max-lora-rank", "32")
    assert res.exit_code == 0, res.output


def test_vllm_quantized_and_init(llama_lora, llama_base, copy_adapter, tmp_path):
    ah.quantize(llama_lora, tmp_path / "q", scheme="int8")
    assert _codes(tmp_path / "q", llama_base, "vllm") == {"vllm-quantized": "error"}
    pissa = copy_adapter(llama_lora)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (pissa / "adapter_config.json").write_text(json.dumps(cfg))
    assert _codes(pissa, llama_base, "vllm") == {"vllm-init-unsupported": "error"}


def test_vllm_embedding_lora_warns(llama_embed_lora, llama_base):
    assert _codes(llama_embed_lora, llama_base, "vllm") == {"vllm-embedding-lora": "warning"}


def test_both_targets_and_bad_input(llama_dora, llama_base):
    res = _cli(
        "validate", str(llama_dora), "--base", str(llama_base), "--target", "gguf", "--target", "vllm", "--json"
    )
    codes = {f["code"] for f in json.loads(res.stdout)["findings"]}
    assert {"gguf-dora", "vllm-dora"} <= codes and res.exit_code == 1
    for bad in (["--target", "tgi"], ["--target", "vllm", "--max-lora-rank", "0"]):
        res = _cli("validate", str(llama_dora), "--base", str(llama_base), *bad)
        assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(ah.UsageError, match="known targets: gguf, vllm"):
        ah.validate(llama_dora, base=llama_base, target="tgi")
