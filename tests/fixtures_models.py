"""Builders for tiny, deterministic base models and LoRA adapters.

Every builder is a plain function that takes a target directory, writes a real
``save_pretrained`` folder (safetensors) into it and returns that directory.
Nothing here touches the network or global logging settings, so the same
functions can back a CLI ``demo`` command or benchmarks, not only pytest.

Bases are random-initialised transformers models (seeded with
``torch.manual_seed``). Adapters are built with ``peft.get_peft_model`` and then
every ``lora_A``/``lora_B`` (plus DoRA magnitudes and ``modules_to_save``
copies) is overwritten with values from a dedicated seeded generator, so the
update is non-zero and identical from run to run.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


# Shapes shared by the llama bases (hidden size is the only thing that varies).
LLAMA_KWARGS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
GPT2_KWARGS: dict[str, Any] = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 128,
    "n_positions": 64,
    # GPT2Config defaults to 50256 (outside our vocab) and transformers warns about it.
    "bos_token_id": 127,
    "eos_token_id": 127,
}
ROBERTA_KWARGS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 80,
    "num_labels": 2,
}

# Small enough that the ~360 KB tiny llama is split into 4 shards + index.
SHARDED_MAX_SHARD_SIZE = "100KB"

DEFAULT_VOCAB_SIZE = 128


# --------------------------------------------------------------------------- bases


def build_llama_base(
    out_dir: Path | str,
    *,
    hidden_size: int = 64,
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a tiny ``LlamaForCausalLM`` (untied embeddings) to ``out_dir``.

    With ``max_shard_size`` the weights are written as ``model-0000X-of-0000N.safetensors``
    plus ``model.safetensors.index.json``; otherwise as a single ``model.safetensors``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KWARGS, "hidden_size": hidden_size}))
    model.eval()
    if max_shard_size is None:
        model.save_pretrained(out)
    else:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def build_gpt2_base(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny ``GPT2LMHeadModel`` (Conv1D weights stored as (d_in, d_out), tied lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_KWARGS))
    model.eval()
    model.save_pretrained(out)
    return out


def build_roberta_base(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny ``RobertaForSequenceClassification`` with a 2-label head."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(RobertaConfig(**ROBERTA_KWARGS))
    model.eval()
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------ adapters


def load_base_model(base_dir: Path | str, task: str = "causal-lm") -> torch.nn.Module:
    """Load a saved base with the right Auto class. ``task`` is ``"causal-lm"`` or ``"seq-cls"``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}[task]
    model = auto.from_pretrained(str(base_dir))
    model.eval()
    return model


@torch.no_grad()
def randomize_adapter_weights(peft_model: torch.nn.Module, *, seed: int, scale: float = 0.1) -> None:
    """Overwrite adapter parameters with deterministic, non-zero values.

    * ``lora_A``: ``randn / sqrt(fan_in)``; ``lora_B``: ``randn * scale`` (so ``B @ A`` is non-zero).
    * DoRA ``lora_magnitude_vector``: multiplied by ``1 + 0.05 * randn`` (so it no longer equals
      the column norm computed at init, as after training).
    * ``modules_to_save`` copies: ``+ randn * scale`` (so they differ from the base module).

    Parameters are visited in sorted-name order with a private generator, so the result depends
    only on ``seed`` and the model structure, not on global RNG state or peft's init scheme.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(peft_model.named_parameters())
    for name in sorted(params):
        p = params[name]
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if ".lora_A." in name:
            p.copy_(noise / (p.shape[-1] ** 0.5))
        elif ".lora_B." in name:
            p.copy_(noise * scale)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.05 * noise)
        elif ".modules_to_save." in name:
            p.add_(noise * scale)


def build_lora_adapter(
    base_dir: Path | str,
    out_dir: Path | str,
    lora_config: Any,
    *,
    seed: int,
    task: str = "causal-lm",
    scale: float = 0.1,
) -> Path:
    """Wrap the base in ``base_dir`` with ``lora_config``, randomise the adapter and save it.

    ``base_model_name_or_path`` in the written ``adapter_config.json`` is ``str(base_dir)``.
    """
    from peft import get_peft_model

    base_dir = Path(base_dir)
    out = Path(out_dir)
    torch.manual_seed(seed)  # peft's own init (kaiming for lora_A) uses the global RNG
    model = load_base_model(base_dir, task)
    with warnings.catch_warnings():
        # peft 0.21 calls the deprecated `is_gradient_checkpointing` on transformers 5 models.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora_config)
    randomize_adapter_weights(peft_model, seed=seed, scale=scale)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out)
    return out


@dataclass(frozen=True)
class AdapterSpec:
    """Recipe for one fixture adapter: which base it sits on and how it is configured."""

    base: str
    make_config: Callable[[], Any]
    seed: int
    task: str = "causal-lm"


def _lora(**kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        from peft import LoraConfig

        return LoraConfig(**kwargs)

    return make


BASE_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama_base": lambda d: build_llama_base(d),
    "llama_base_sharded": lambda d: build_llama_base(d, max_shard_size=SHARDED_MAX_SHARD_SIZE),
    "llama_base_wide": lambda d: build_llama_base(d, hidden_size=96),
    "gpt2_base": lambda d: build_gpt2_base(d),
    "roberta_base": lambda d: build_roberta_base(d),
}

ADAPTER_SPECS: dict[str, AdapterSpec] = {
    "llama_lora": AdapterSpec(
        "llama_base",
        _lora(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        seed=1,
    ),
    "llama_rslora": AdapterSpec(
        "llama_base",
        _lora(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        seed=2,
    ),
    "llama_patterns": AdapterSpec(
        "llama_base",
        _lora(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 4, "model.layers.1.self_attn.q_proj": 2},
            alpha_pattern={"up_proj": 32},
        ),
        seed=3,
    ),
    "llama_dora": AdapterSpec(
        "llama_base",
        _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
        seed=4,
    ),
    "llama_all_linear": AdapterSpec(
        "llama_base",
        _lora(r=4, lora_alpha=8, target_modules="all-linear"),
        seed=5,
    ),
    "gpt2_lora": AdapterSpec(
        "gpt2_base",
        _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        seed=6,
    ),
    "roberta_lora": AdapterSpec(
        "roberta_base",
        _lora(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            task_type="SEQ_CLS",
            modules_to_save=["classifier"],
        ),
        seed=7,
        task="seq-cls",
    ),
    "llama_lora_wide": AdapterSpec(
        "llama_base_wide",
        _lora(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        seed=8,
    ),
}


def build_named_base(name: str, out_dir: Path | str) -> Path:
    """Build one of :data:`BASE_BUILDERS` into ``out_dir``."""
    return BASE_BUILDERS[name](Path(out_dir))


def build_named_adapter(name: str, base_dir: Path | str, out_dir: Path | str) -> Path:
    """Build one of :data:`ADAPTER_SPECS` on the already-built base in ``base_dir``."""
    spec = ADAPTER_SPECS[name]
    return build_lora_adapter(base_dir, out_dir, spec.make_config(), seed=spec.seed, task=spec.task)


def build_all(root: Path | str) -> dict[str, Path]:
    """Build every base and adapter under ``root/<name>``; returns name -> folder."""
    root = Path(root)
    built = {name: build_named_base(name, root / name) for name in BASE_BUILDERS}
    for name, spec in ADAPTER_SPECS.items():
        built[name] = build_named_adapter(name, built[spec.base], root / name)
    return built


# ------------------------------------------------------------------------- helpers


def copy_adapter(src: Path | str, dest_root: Path | str, name: str | None = None) -> Path:
    """Copy a saved folder (adapter or base) to ``dest_root/<name>`` and return the copy.

    ``name`` defaults to the source folder name; a numeric suffix is added if it already exists,
    so several copies of the same fixture can live in one ``tmp_path``.
    """
    src = Path(src)
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    stem = name or src.name
    dest = dest_root / stem
    i = 1
    while dest.exists():
        dest = dest_root / f"{stem}_{i}"
        i += 1
    shutil.copytree(src, dest)
    return dest


def sample_input_ids(
    batch: int = 2, seq_len: int = 8, *, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0
) -> torch.Tensor:
    """Deterministic token ids for forward-pass comparisons (avoids id 0/1 special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (batch, seq_len), generator=gen)
