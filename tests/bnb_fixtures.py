"""Builders for bitsandbytes tests: a tiny bf16 Llama, its transformers-quantized saves, views of tensor dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.safetensors import TensorInfo


#: How each quantized fixture is made: BitsAndBytesConfig keyword arguments.
SCHEMES: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    "nf4dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
    "int8": {"load_in_8bit": True},
}

_ST_DTYPE = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer LlamaForCausalLM in bf16 whose linear dims are multiples of 64 (hidden 128, mlp 256, vocab 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def load_quantized(source: Path, scheme: str) -> Any:
    """``source`` loaded on CPU by transformers with the bitsandbytes config of ``scheme`` (a key of SCHEMES)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(SCHEMES[scheme])
    if "load_in_4bit" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(
        source, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu"
    )


def dict_view(tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> BaseView:
    """A BaseView over in-memory tensors (byte ranges laid end to end), for dequantizing fresh quantize output."""
    infos, offset = {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        infos[key] = TensorInfo(key, _ST_DTYPE[t.dtype], tuple(t.shape), offset, offset + nbytes)
        offset += nbytes
    return BaseView(path=Path("memory"), config=config or {}, tensors=infos, shard_of={})


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """A single-file safetensors checkpoint plus config.json, as save_pretrained lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
