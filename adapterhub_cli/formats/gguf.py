"""llama.cpp's LoRA GGUF: written with ``gguf``, the library llama.cpp publishes for its file format.

What llama.cpp's loader expects (``src/llama-adapter.cpp``, ``llama_adapter_lora_init_impl``; its converter
``convert_lora_to_gguf.py`` writes the same): ``general.type = adapter``, ``general.architecture`` equal to the
base model's, ``adapter.type = lora``, one global ``adapter.lora.alpha`` (f32), and per adapted weight
``<gguf name>.weight.lora_a`` (PyTorch shape ``[r, in]``) and ``.lora_b`` (``[out, r]``); for ``token_embd`` the
A factor is stored transposed. At run time each tensor is scaled by ``alpha / r_i`` with ``r_i`` that tensor's
own rank (``llama_adapter_lora_weight::get_scale``).

PEFT's scale is per module (``alpha_pattern``, ``rank_pattern``, rsLoRA's ``alpha / sqrt(r)``). This writer keeps
the adapter's ``lora_alpha`` as the global alpha and multiplies each module's B by ``s_i * r_i / alpha`` so that
llama.cpp's ``alpha / r_i * B' A`` equals PEFT's ``s_i * B A`` exactly (up to float32 rounding). Llama-family
bases (Llama, Mistral) get llama.cpp's q/k row permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``),
applied to B's rows, which permutes the rows of ``B A`` as the base weight's are.

Tensor names come from ``gguf``'s own tensor-name mapping for the architecture. Factors are written as float32
(the converter's default ``--outtype f32``). Only LoRA factors are exported: DoRA magnitudes, biases and
``modules_to_save`` copies are refused by name, as llama.cpp's converter refuses them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.files import atomic_file, read_json
from adapterhub_cli.errors import InvalidAdapterError, UsageError


if TYPE_CHECKING:
    import torch

    from adapterhub_cli.artifact.adapter import Adapter


#: HF ``architectures[0]`` -> (llama.cpp architecture, q/k permuted as ``LlamaModel`` does, lm_head tied by default).
#: From ``convert_hf_to_gguf.py``'s ``@ModelBase.register`` lines (LlamaModel also registers Mistral).
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", True, False),
    "MistralForCausalLM": ("llama", True, False),
    "Qwen2ForCausalLM": ("qwen2", False, False),
    "Qwen3ForCausalLM": ("qwen3", False, False),
    "GemmaForCausalLM": ("gemma", False, True),
    "Gemma2ForCausalLM": ("gemma2", False, True),
    "Gemma3ForCausalLM": ("gemma3", False, True),
}

#: The key that carries this tool's provenance (JSON) in the GGUF's key-value metadata.
PROVENANCE_KEY = "adapterhub.provenance"


def permute_rows(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF's rotate-half q/k rows to GGML's interleaved
    rope layout. ``weights`` is (n_head * head_dim, ...); ``n_head_kv`` replaces ``n_head`` when it differs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_rows(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (for reading a GGUF back as HF rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf() -> Any:
    """The ``gguf`` package, or a clean error naming how to install it."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            "--to gguf needs the gguf package (llama.cpp's GGUF library)", hint="pip install gguf"
        ) from None
    return gguf


def base_config(adapter: Adapter, base: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """The base's folder and ``config.json``: ``base`` when given, else the adapter's ``base_model_name_or_path``
    when that is a local folder. The GGUF names and permutation depend on it."""
    where = base if base is not None else adapter.config.raw.get("base_model_name_or_path")
    folder = Path(where) if isinstance(where, (str, Path)) and str(where) else None
    if folder is None or not (folder / "config.json").is_file():
        raise UsageError(
            f"--to gguf needs the base model's config.json: {where or 'no --base given'} is not a local folder "
            "holding one",
            hint="pass --base FOLDER (a downloaded base: adapters pull, or huggingface-cli download)",
        )
    return folder, read_json(folder / "config.json", "base config.json")


def _arch(config: dict[str, Any], folder: Path) -> tuple[str, bool, bool]:
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name not in ARCHITECTURES:
        raise UsageError(
            f"--to gguf: base architecture {name!r} ({folder}) is not one this tool exports; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}",
            hint="use llama.cpp's convert_lora_to_gguf.py for other architectures",
        )
    return ARCHITECTURES[name]


def _int(config: dict[str, Any], key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"base config.json ({folder}) has no positive integer {key!r}")
    return value


def gguf_tensors(adapter: Adapter, base: str | Path | None) -> tuple[str, float, dict[str, torch.Tensor]]:
    """What :meth:`GgufFormat.write` stores: the llama.cpp architecture, the global alpha, and the tensors by
    GGUF name (float32, PyTorch layout; ``gguf`` reverses the dims into GGML's ``ne``).

    Raises:
        UsageError: no usable base config, or an architecture not in :data:`ARCHITECTURES`.
        InvalidAdapterError: a module or tensor llama.cpp cannot hold (named).
    """
    import torch

    gguf = _gguf()
    folder, config = base_config(adapter, base)
    arch, permute, tied_default = _arch(config, folder)
    n_layers = _int(config, "num_hidden_layers", folder)
    n_head = _int(config, "num_attention_heads", folder)
    n_head_kv = _int(config, "num_key_value_heads", folder, n_head)
    tied = bool(config.get("tie_word_embeddings", tied_default))
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)

    def refuse(what: str, module: str | None, hint: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"--to gguf: {what}", path=adapter.path, module=module, hint=hint)

    # PEFT saves embed_tokens / lm_head base copies beside their LoRA (save_embedding_layers); llama.cpp's
    # converter skips ``*.base_layer.weight`` (convert_lora_to_gguf.py get_tensors) and so does this writer.
    extra = sorted(n for n in adapter.extra_tensors if not n.endswith(".base_layer.weight"))
    if extra:
        first = extra[0]
        raise refuse(
            f"{first} is not a LoRA factor (a bias or modules_to_save copy): llama.cpp's LoRA GGUF holds only "
            "lora_a / lora_b pairs",
            first,
            "merge the adapter into the base instead (adapters merge), then convert the merged model",
        )
    alpha = float(adapter.config.lora_alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        alpha = float(max((m.rank for m in adapter.modules.values()), default=1))
    out: dict[str, torch.Tensor] = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        if m.magnitude is not None:
            raise refuse(
                "DoRA magnitude vectors cannot be stored (llama.cpp applies plain LoRA)",
                name,
                "merge the adapter into the base instead",
            )
        if m.kind == "conv":
            raise refuse("convolution LoRA has no GGUF form", name, "GGUF LoRA is for language models")
        gname = names.get_name(name)
        if gname is None:
            raise refuse(
                f"module {name} has no {arch} GGUF tensor name (gguf's tensor-name map)",
                name,
                "check that --base is the model this adapter was trained on",
            )
        if gname == "output" and tied:
            raise refuse(
                "a LoRA on lm_head of a base with tied embeddings: llama.cpp has no output tensor to apply it to",
                name,
                "drop the lm_head module, or use a base with untied embeddings",
            )
        f = adapter.factors(name, finite=True)
        a, b = f.A.to(torch.float64), f.B.to(torch.float64)
        ratio = m.scale * m.rank / alpha
        if ratio != 1.0:
            b = b * ratio  # llama.cpp: alpha / r_i * B' A == s_i * B A
        if permute and gname.endswith(("attn_q", "attn_k")):
            b = permute_rows(b, n_head, n_head if gname.endswith("attn_q") else n_head_kv)
        if m.kind == "embedding":
            # PEFT: A (r, vocab), B (dim, r), delta = (B A)^T; llama.cpp wants token_embd.lora_a transposed.
            a = a.T
        out[f"{gname}.weight.lora_a"] = a.to(torch.float32).contiguous()
        out[f"{gname}.weight.lora_b"] = b.to(torch.float32).contiguous()
    return arch, alpha, out


class GgufFormat:
    """llama.cpp's LoRA GGUF (``llama-cli --lora FILE``, ``llama-server --lora FILE``): write only."""

    name = "gguf"
    description = "llama.cpp LoRA GGUF (one .gguf file; needs --base; write only)"

    def sniff(self, path: Path) -> bool:
        try:
            with Path(path).open("rb") as fh:
                return bool(Path(path).is_file() and fh.read(4) == b"GGUF")
        except OSError:
            return False

    def read(self, path: Path) -> Adapter:
        raise InvalidAdapterError(
            "a GGUF file is llama.cpp's format: this tool writes it (convert --to gguf) but does not read it",
            path=path,
            hint="convert from the PEFT adapter it was made from",
        )

    def write(
        self,
        adapter: Adapter,
        path: Path,
        *,
        base: str | Path | None = None,
        overwrite: bool = False,
        provenance: dict[str, Any] | None = None,
    ) -> Path:
        """Write one ``.gguf`` file that llama.cpp loads on ``base`` (a local folder with config.json)."""
        if Path(path).suffix != ".gguf":
            raise UsageError(f"a llama.cpp LoRA is one .gguf file; got -o {path}")
        arch, alpha, tensors = gguf_tensors(adapter, base)
        gguf = _gguf()
        tokens = adapter.config.raw.get("alora_invocation_tokens")
        with atomic_file(path, overwrite=overwrite) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            if isinstance(tokens, list) and tokens and all(isinstance(t, int) and t >= 0 for t in tokens):
                writer.add_key_value(  # llama.cpp requires ARRAY of UINT32 (llama-adapter.cpp)
                    gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
                    tokens,
                    gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.UINT32,
                )
            writer.add_string(PROVENANCE_KEY, json.dumps(provenance or {}, sort_keys=True))
            for name, t in tensors.items():
                writer.add_tensor(name, t.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return Path(path)
