"""Serving targets: what llama.cpp (GGUF) and vLLM would refuse, or load and silently get wrong, for an adapter.

``validate --target gguf`` / ``--target vllm`` add these findings to the fit-to-base report. Each rule cites the
serving stack's own source; the versions read are listed in the project's serving notes (llama.cpp
``ggml-org/llama.cpp@0c1e57098``, the copy vendored in llama-cpp-python 0.3.36; vLLM v0.33.0 release source).
The checks read the adapter's config and tensor headers (and the base's config.json when given), never weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.validate import Finding
from adapterhub_cli.errors import CorruptFileError, UsageError


#: The safetensors metadata key ``adapters quantize`` writes (formats/quantized.py ``QUANT_KEY``; artifact/ sits
#: below formats/, so the key is read here by value).
_QUANT_KEY = "adapterhub.quantization"


def _quantized_scheme(adapter: Adapter) -> str | None:
    raw = adapter.metadata.get(_QUANT_KEY)
    if raw is None:
        return None
    try:
        scheme = parse_json(raw.encode(), path=adapter.path, what=_QUANT_KEY).get("scheme")
    except (CorruptFileError, UnicodeEncodeError, AttributeError):
        return "unknown"
    return scheme if isinstance(scheme, str) else "unknown"


def _copies(adapter: Adapter) -> tuple[list[str], list[str], list[str]]:
    """Extra tensors split as (LoRA / base biases, norm-layer copies, other full-module copies). PEFT's own
    ``*.base_layer.weight`` copies of embed_tokens / lm_head (``save_embedding_layers``) are left out: both
    stacks skip them (llama.cpp convert_lora_to_gguf.py ``get_tensors``; vLLM utils.py
    ``is_base_embedding_weights``)."""
    names = [n for n in sorted(adapter.extra_tensors) if not n.endswith(".base_layer.weight")]
    listed = {str(m) for m in adapter.config.modules_to_save or []}

    def copied(n: str) -> bool:  # a tensor of a modules_to_save module (its bias included)
        return bool(listed & set(n.split(".")))

    bias = [n for n in names if n.endswith(".bias") and not copied(n)]
    rest = [n for n in names if n not in bias]
    norm = [n for n in rest if "norm" in n.rsplit(".", 2)[-2]] if rest else []
    return bias, norm, [n for n in rest if n not in norm]


# ------------------------------------------------------------------------------------------- llama.cpp (GGUF)


def check_gguf(adapter: Adapter, base: BaseView | None = None) -> list[Finding]:
    """What llama.cpp's ``convert_lora_to_gguf.py`` (and its loader, ``src/llama-adapter.cpp``) would refuse or
    silently lose. ``adapters convert --to gguf`` bakes per-module scales into lora_B, so the scale findings
    name it as the fix.

    A LoRA on ``embed_tokens`` / ``lm_head`` (``lora_embedding_A/B``, or lora_A/B on lm_head) is exported by the
    converter (``token_embd.weight.lora_a/b``, ``output.weight.lora_a/b``) and is not flagged, except lm_head on a
    base with tied embeddings (``"lm_head is present in adapter, but is ignored in base model"``).
    """
    cfg = adapter.config
    out: list[Finding] = []
    fix = "or export with `adapters convert ADAPTER --to gguf --base BASE -o OUT.gguf`, which bakes it into lora_B"
    scheme = _quantized_scheme(adapter)
    if scheme is not None:
        # convert_lora_to_gguf.py loads the factors as stored (int8 / fp8 bytes plus separate scale tensors it does
        # not know): "Unexpected name" for the scales, or garbage factors; nothing in llama.cpp reads our scheme.
        out.append(
            Finding(
                "gguf-quantized",
                "error",
                f"the factors are stored quantized ({scheme}, written by `adapters quantize`): llama.cpp's converter "
                "cannot read them; run `adapters dequantize` first, or export with `adapters convert ADAPTER --to "
                "gguf --base BASE -o OUT.gguf`, which dequantizes",
            )
        )
    if cfg.alpha_pattern:
        # convert_lora_to_gguf.py reads only lparams["lora_alpha"]; llama-adapter.h get_scale: alpha / rank.
        out.append(
            Finding(
                "gguf-alpha-pattern",
                "error",
                f"alpha_pattern ({len(cfg.alpha_pattern)} entries) is lost by llama.cpp's converter: GGUF stores one "
                f"global alpha; {fix}",
            )
        )
    if cfg.use_rslora:
        out.append(
            Finding(
                "gguf-rslora",
                "error",
                f"rsLoRA's alpha/sqrt(r) scale is lost by llama.cpp's converter (llama.cpp applies alpha/r); {fix}",
            )
        )
    dora = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if cfg.use_dora or dora:
        out.append(
            Finding(
                "gguf-dora",
                "error",
                'DoRA magnitude vectors are refused by the converter ("Unexpected name"): merge the '
                "adapter into the base instead",
                dora[0] if dora else None,
            )
        )
    bias, norm, saved = _copies(adapter)
    if cfg.bias != "none" or bias:
        out.append(
            Finding(
                "gguf-bias",
                "error",
                "bias tensors are refused by the converter: retrain with bias='none' or merge instead",
                bias[0] if bias else None,
            )
        )
    if saved:
        out.append(
            Finding(
                "gguf-modules-to-save",
                "error",
                'modules_to_save full copies are refused by the converter ("Unexpected name … Not a lora_A or '
                'lora_B tensor"): merge the adapter into the base instead',
                saved[0],
            )
        )
    if norm:
        # convert_lora_to_gguf.py passes *_norm tensors through; llama-adapter.cpp skips them
        # ("TODO: add support for norm vector").
        out.append(
            Finding(
                "gguf-norm-dropped",
                "warning",
                f"{len(norm)} norm-layer copies are converted, then skipped by llama.cpp's loader: their change "
                "is lost; merge the adapter into the base to keep it",
                norm[0],
            )
        )
    head = [m.name for m in adapter.modules.values() if m.name.split(".")[-1] == "lm_head"]
    if head and base is not None and base.config.get("tie_word_embeddings") is True:
        out.append(
            Finding(
                "gguf-tied-lm-head",
                "error",
                "a LoRA on lm_head of a base with tied embeddings: llama.cpp's converter refuses it (the base has no "
                "output tensor); drop the lm_head module or merge instead",
                head[0],
            )
        )
    if cfg.rank_pattern:
        out.append(
            Finding(
                "gguf-rank-pattern", "info", "rank_pattern is kept: GGUF reads each module's rank from its tensors"
            )
        )
    return out


# ------------------------------------------------------------------------------------------------------- vLLM

#: vllm/config/lora.py (v0.33.0) L27: ``max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``, default 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: vllm/lora/peft_helper.py ``_init_is_supported``: string inits that leave the base weights alone.
_VLLM_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
#: vllm/lora/peft_helper.py L56-65: the only modules_to_save vLLM accepts (classification heads).
_VLLM_SAVED = {"classifier", "score"}


def check_vllm(
    adapter: Adapter, base: BaseView | None = None, *, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
) -> list[Finding]:
    """What vLLM's LoRA loader (v0.33.0: ``vllm/lora/peft_helper.py`` ``PEFTHelper.from_dict`` / ``validate_legal``
    / ``_validate_features``, ``vllm/lora/lora_model.py`` ``from_local_checkpoint``, ``vllm/lora/utils.py``
    ``parse_fine_tuned_lora_name``, ``vllm/lora/worker_manager.py`` ``_load_adapter``) refuses or loses.

    ``max_lora_rank`` is the server's ``--max-lora-rank``.
    """
    cfg = adapter.config
    raw: dict[str, Any] = cfg.raw
    out: list[Finding] = []

    def add(code: str, severity: str, message: str, module: str | None = None) -> None:
        out.append(Finding(code, severity, message, module))  # type: ignore[arg-type]

    # peft_helper.py PEFTHelper.from_dict L155-173: "Missing required configuration fields".
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]
    if missing and not adapter.config_inferred:
        add(
            "vllm-missing-config-field",
            "error",
            f'adapter_config.json lacks {", ".join(missing)}: vLLM refuses it ("Missing required configuration '
            'fields")',
        )
    # peft_helper.py validate_legal L188-198: max(r, *rank_pattern.values()) > max_lora_rank; tensors with a larger
    # rank than the slots fail at activation (layers/base_linear.py set_lora copy_).
    ranks = [int(cfg.r)] + [int(v) for v in (cfg.rank_pattern or {}).values() if isinstance(v, int)]
    ranks += [m.rank for m in adapter.modules.values()]
    top = max(ranks) if ranks else 0
    if top > VLLM_MAX_LORA_RANKS[-1]:
        add(
            "vllm-rank-too-high",
            "error",
            f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): reduce it "
            f"(adapters reduce --max-rank {VLLM_MAX_LORA_RANKS[-1]})",
        )
    elif top > max_lora_rank:
        need = next(v for v in VLLM_MAX_LORA_RANKS if v >= top)
        add(
            "vllm-rank-too-high",
            "error",
            f'rank {top} is above --max-lora-rank {max_lora_rank} ("LoRA rank {top} is greater than '
            f'max_lora_rank"): start vLLM with --max-lora-rank {need}, or reduce the adapter',
        )
    # peft_helper.py _validate_features L66-86.
    dora = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if cfg.use_dora or dora:
        add(
            "vllm-dora",
            "error",
            '"vLLM does not yet support DoRA": merge the adapter instead',
            dora[0] if dora else None,
        )
    bias, norm, saved = _copies(adapter)
    lora_bias = [n for n in bias if ".lora_B." in n]
    if cfg.bias != "none" or bias or raw.get("lora_bias") is True:
        add(
            "vllm-bias",
            "error",
            '"Adapter bias is not supported" / "vLLM does not support LoRA bias (lora_bias)": retrain with '
            "bias='none' or merge instead",
            (lora_bias or bias)[0] if bias else None,
        )
    listed = cfg.modules_to_save or []
    bad_saved = sorted({str(n) for n in listed} - _VLLM_SAVED) + [
        n for n in saved + norm if not set(n.split(".")) & _VLLM_SAVED
    ]
    if bad_saved:
        add(
            "vllm-modules-to-save",
            "error",
            'vLLM accepts modules_to_save only for ["classifier", "score"] on classification models; '
            f"{bad_saved[0]} is refused (embedding / lm_head copies, extra vocabulary included): merge instead",
            bad_saved[0],
        )
    elif listed:
        add(
            "vllm-classification-head",
            "info",
            "a classifier / score head is loaded only on a classification (pooling) model, one head per adapter",
        )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in _VLLM_INITS:
        add(
            "vllm-init-unsupported",
            "error",
            f'init_lora_weights={init!r} changes the base weights ("Inits such as PiSSA, OLoRA, CorDA and LoftQ '
            'modify the base model weights"): vLLM refuses it; convert it to a plain LoRA first',
        )
    for key, code, what in (
        ("alora_invocation_tokens", "vllm-alora", "Activated LoRA (aLoRA)"),
        ("layer_replication", "vllm-layer-replication", "layer_replication"),
        ("use_bdlora", "vllm-bdlora", "BD-LoRA"),
        ("use_qalora", "vllm-qalora", "QA-LoRA"),
    ):
        if raw.get(key):
            add(code, "error", f"vLLM does not support {what}: it refuses the adapter")
    scheme = _quantized_scheme(adapter)
    if scheme is not None:
        # lora_model.py casts every stored tensor with tensor.to(device, dtype): int8 / fp8 bytes become values and
        # our block scales are "unsupported LoRA weight" keys (utils.py parse_fine_tuned_lora_name).
        add(
            "vllm-quantized",
            "error",
            f"the factors are stored quantized ({scheme}, written by `adapters quantize`): vLLM cannot read them; "
            "run `adapters dequantize` first",
        )
    # worker_manager.py _load_adapter / lora_model.py check_unexpected_modules: the last name component must be a
    # Linear / MoE module of the model or one of its embedding_modules; convolutions never are.
    for m in adapter.modules.values():
        if m.kind == "conv":
            add("vllm-unexpected-module", "error", "vLLM serves LoRA on linear layers only", m.name)
            break
    emb = [m.name for m in adapter.modules.values() if m.kind == "embedding" or m.name.split(".")[-1] == "lm_head"]
    if emb:
        # vllm/model_executor/models/llama.py ``embedding_modules = {"embed_tokens": ..., "lm_head": ...}``;
        # gemma*.py declare ``embedding_modules = {}`` ("Gemma does not apply LoRA to the embedding layer").
        add(
            "vllm-embedding-lora",
            "warning",
            "a LoRA on embed_tokens / lm_head loads only on models whose vLLM class lists it in embedding_modules "
            "(Llama-family yes, Gemma no); elsewhere vLLM refuses the adapter",
            emb[0],
        )
    if cfg.rank_pattern or cfg.alpha_pattern:
        # v0.27.0 and earlier: PEFTHelper drops rank_pattern / alpha_pattern (one scale for every module).
        add(
            "vllm-pattern-ignored",
            "warning",
            "rank_pattern / alpha_pattern are applied by vLLM >= 0.33 only; older vLLM (<= 0.27) uses one scale for "
            "every module and serves a wrong update",
        )
    if adapter.format != "peft":
        add(
            "vllm-format",
            "error",
            f"vLLM loads PEFT folders (adapter_config.json + adapter_model.safetensors); this is {adapter.format}: "
            "run `adapters convert ADAPTER --to peft -o OUT` first",
        )
    return out


#: ``validate --target NAME`` -> its check.
TARGETS: dict[str, Callable[..., list[Finding]]] = {"gguf": check_gguf, "vllm": check_vllm}


def check_target(
    target: str, adapter: Adapter, base: BaseView | None = None, *, max_lora_rank: int | None = None
) -> list[Finding]:
    """The findings of one serving target (``gguf`` or ``vllm``).

    Raises:
        UsageError: an unknown target (the message lists the known ones).
    """
    if target not in TARGETS:
        raise UsageError(f"unknown serving target {target!r}; known targets: {', '.join(sorted(TARGETS))}")
    if target == "vllm":
        return check_vllm(
            adapter, base, max_lora_rank=VLLM_DEFAULT_MAX_LORA_RANK if max_lora_rank is None else max_lora_rank
        )
    return TARGETS[target](adapter, base)
