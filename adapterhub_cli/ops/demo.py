"""A built-in example: a tiny Llama-style base and a LoRA adapter for it, built locally (no download)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """While inside: no progress bars from transformers or huggingface_hub, no Python warnings, no log records
    below ERROR (bitsandbytes, peft and transformers warn through both); everything is restored on the way out."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    verbosity, disabled = hf_logging.get_verbosity(), logging.root.manager.disable
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def build_demo(root: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/base`` (a tiny LlamaForCausalLM) and ``root/adapter`` (an r=8 PEFT LoRA on q/v/o_proj).

    The adapter's B factors are filled with seeded noise so its update is not zero, as after training.
    Returns (base_dir, adapter_dir). Prints nothing (transformers' and peft's bars and warnings are silenced).
    """
    with quiet_third_party():
        return _build(Path(root), seed)


def _build(root: Path, seed: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir)  # so the adapter records where its base is
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    )
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir
