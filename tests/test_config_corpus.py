"""Real ``adapter_config.json`` files from public repositories (PEFT 0.3 to 0.19 and unknown trainers), each
with the source noted in ``tests/data/peft_configs/_sources.json`` (and ``SOURCES.md``).

For each config a tiny seeded model of its architecture family (or a generic tiny one whose module names match
its ``target_modules``) gets a PEFT adapter built from that very config (by PEFT), the real config file is put
back verbatim, and then: ``inspect`` reads it, ``validate`` against the tiny base is clean, ``reduce`` writes a
lossless copy (same rank), and ``PeftModel.from_pretrained`` loads that copy with PEFT's outputs. Configs our
code or PEFT refuses are expected refusals, with the reason, in the manifest (``expect``); none is skipped.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import adapterhub_cli as ah


DATA = Path(__file__).parent / "data" / "peft_configs"
SOURCES: list[dict[str, Any]] = json.loads((DATA / "_sources.json").read_text())


def _causal(kind: str, layers: int = 2) -> torch.nn.Module:
    import transformers as tf

    common = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    if kind == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8))
    if kind == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**common))
    if kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"})
        return tf.GPTNeoXForCausalLM(cfg)
    raise AssertionError(kind)


def _t5() -> torch.nn.Module:
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(cfg)


def _bert() -> torch.nn.Module:
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_labels=2
    )
    return tf.BertForSequenceClassification(cfg)


def _whisper() -> torch.nn.Module:
    import transformers as tf

    cfg = tf.WhisperConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return tf.WhisperForConditionalGeneration(cfg)


def _unet() -> torch.nn.Module:
    import fixtures_diffusion as fd
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**fd.UNET_KWARGS)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: _causal("llama"),
    "llama-32-layers": lambda: _causal("llama", layers=32),
    "mistral": lambda: _causal("mistral"),
    "qwen2": lambda: _causal("qwen2"),
    "qwen3": lambda: _causal("qwen3"),
    "gemma2": lambda: _causal("gemma2"),
    "phi": lambda: _causal("phi"),
    "gpt_neox": lambda: _causal("gpt_neox"),
    "t5": _t5,
    "bert-seq-cls": _bert,
    "whisper": _whisper,
    "unet": _unet,
}


def _inputs(family: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (1, 6), generator=g)
    if family == "unet":
        return {
            "sample": torch.randn(1, 4, 8, 8, generator=g),
            "timestep": torch.tensor([3]),
            "encoder_hidden_states": torch.randn(1, 5, 12, generator=g),
        }
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    if family == "whisper":
        return {"input_features": torch.randn(1, 8, 16, generator=g), "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


def _output(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(family, model))
    return out.sample if family == "unet" else out.logits  # type: ignore[no-any-return]


def _build(entry: dict[str, Any], tmp: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny base (saved) and a PEFT adapter built by PEFT from the real config, with that file put back."""
    from peft import LoraConfig, get_peft_model

    text = (DATA / entry["file"]).read_bytes()
    doc = json.loads(text)
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in doc.items() if k in known and k not in ("base_model_name_or_path", "revision")}
    kwargs["inference_mode"] = False
    torch.manual_seed(0)
    base_model = BUILDERS[entry["family"]]().eval()
    base = tmp / "base"
    base_model.save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base_model, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = tmp / "adapter"
    with warnings.catch_warnings():  # lm_head in target_modules: PEFT notes it saves the embedding layers
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(adapter)
    (adapter / "adapter_config.json").write_bytes(text)  # the real file, verbatim
    return base, adapter, peft_model


def _fresh(entry: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[entry["family"]]().eval()


def test_the_corpus_is_big_and_sourced() -> None:
    files = {p.name for p in DATA.glob("*.json")} - {"_sources.json"}
    assert files == {e["file"] for e in SOURCES} and len(files) >= 30
    for e in SOURCES:
        assert e["repo"].count("/") == 1 and len(e["commit"]) == 40 and e["path"].endswith("adapter_config.json")
        assert e["expect"] in ("ok", "refused") and e["peft_version"]
        assert e["family"] in BUILDERS if e["expect"] == "ok" else e["reason"] and e["refusal"]


@pytest.mark.parametrize("entry", SOURCES, ids=[e["file"].removesuffix(".json") for e in SOURCES])
def test_real_config(entry: dict[str, Any], tmp_path: Path) -> None:
    expect = entry["expect"]
    if expect.startswith("refused"):
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_config.json").write_bytes((DATA / entry["file"]).read_bytes())
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "a" / "adapter_model.safetensors"))
        with pytest.raises(ah.AdaptersError, match=entry["refusal"]):
            ah.load(tmp_path / "a")
        from peft import PeftConfig

        with pytest.raises((KeyError, ValueError, TypeError)):  # PEFT refuses it too
            PeftConfig.from_pretrained(str(tmp_path / "a"))
        return
    from peft import PeftModel

    base, adapter, peft_model = _build(entry, tmp_path)
    want = _output(peft_model.eval(), entry["family"])
    report = ah.inspect(adapter)
    targeted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert report.num_modules == len(targeted) > 0
    v = ah.validate(adapter, base=base)
    assert v.ok, [i for i in v.issues if i.severity == "error"]
    out = tmp_path / "reduced"
    # a rule that keeps every nonzero singular value: the rewritten adapter (SVD factors, rank_pattern) must act as
    # the original in PEFT (``--rank`` at the largest rank reduces nothing and is refused as a no-op)
    ah.reduce(adapter, out, sv_ratio=1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(_fresh(entry), out).eval()
    got = _output(reloaded, entry["family"])
    assert not torch.equal(got, _output(_fresh(entry), entry["family"]))  # the reduced adapter acts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
