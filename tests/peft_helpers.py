"""Helpers for comparing with PEFT: load adapters onto fresh bases, walk LoRA layers, run forwards."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures_models import load_base_model, sample_input_ids
from peft import PeftModel
from peft.tuners.lora import LoraLayer


PREFIX = "base_model.model."

#: adapter fixture -> (its base fixture, task) for every adapter that fits its own base
FITTING_ADAPTERS: dict[str, tuple[str, str]] = {
    "llama_lora": ("llama_base", "causal-lm"),
    "llama_rslora": ("llama_base", "causal-lm"),
    "llama_patterns": ("llama_base", "causal-lm"),
    "llama_dora": ("llama_base", "causal-lm"),
    "llama_all_linear": ("llama_base", "causal-lm"),
    "gpt2_lora": ("gpt2_base", "causal-lm"),
    "roberta_lora": ("roberta_base", "seq-cls"),
}


def peft_model(base_dir: Path, adapter_dir: Path, task: str = "causal-lm") -> PeftModel:
    model = PeftModel.from_pretrained(load_base_model(base_dir, task), str(adapter_dir))
    model.eval()
    return model


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by module name relative to the base model (``model.layers.0.self_attn.q_proj``)."""
    return {name.removeprefix(PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def dense_delta(layer: LoraLayer, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scale * B @ A of one PEFT layer, as (d_out, d_in), in ``dtype`` (no fan_in_fan_out transpose)."""
    a = layer.lora_A["default"].weight.detach().to(dtype)
    b = layer.lora_B["default"].weight.detach().to(dtype)
    return layer.scaling["default"] * (b @ a)


@torch.no_grad()
def logits(model: torch.nn.Module, vocab_size: int = 128) -> torch.Tensor:
    out = model(input_ids=sample_input_ids(vocab_size=vocab_size))
    return out.logits.detach().to(torch.float64)


# ----------------------------------------------------------------------- merge comparisons


def load_base(base_dir: Path, task: str = "causal-lm", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Like ``fixtures_models.load_base_model`` but in a chosen dtype (None: as stored)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}[task]
    model = auto.from_pretrained(str(base_dir), dtype=dtype if dtype is not None else "auto")
    model.eval()
    return model


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (single file or shards), by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(tensors), f"{f.name} repeats tensors"
        tensors.update(part)
    return tensors


def tree_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (to show inputs are never modified)."""
    import hashlib

    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@torch.no_grad()
def randomize_embedding_lora(model: PeftModel, *, seed: int, scale: float = 0.1) -> None:
    """Give embedding LoRA layers (``lora_embedding_A`` / ``_B``, left alone by the fixture randomiser) non-zero,
    deterministic values."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if ".lora_embedding_A." in name:
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
        elif ".lora_embedding_B." in name:
            p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
