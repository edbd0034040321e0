"""Helpers for comparing with PEFT: load adapters onto fresh bases, walk LoRA layers, run forwards."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures_models import load_base_model, sample_input_ids
from peft import PeftModel
from peft.tuners.lora import LoraLayer


PREFIX = "base_model.model."


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
