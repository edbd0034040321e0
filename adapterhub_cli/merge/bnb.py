"""bitsandbytes checkpoints: read a quantized base as plain weights, and write merged weights quantized.

transformers saves a model loaded with ``BitsAndBytesConfig`` (and writes ``quantization_config`` with
``"quant_method": "bitsandbytes"`` into ``config.json``) in one of two layouts. Only the modules it replaced
by bitsandbytes layers (``nn.Linear`` / GPT-2's ``Conv1D``, minus ``llm_int8_skip_modules`` or, when that is
null, the output head) are quantized; embeddings, norms, biases and ``lm_head`` keep the model's dtype.

4-bit (``nf4`` / ``fp4``), for a weight ``W`` of logical shape (out, in), ``n = out * in``, block size ``b``
(64 by default), ``k = ceil(n / b)`` blocks::

    <m>.weight                                   U8  (ceil(n / 2), 1)  two 4-bit codes per byte, high nibble first
    <m>.weight.absmax                            F32 (k,)              per-block absolute maximum
                                                 U8  (k,)              with double quant: absmax - offset, 8-bit
    <m>.weight.quant_map                         F32 (16,)             the nf4 / fp4 code table
    <m>.weight.nested_absmax                     F32 (ceil(k / 256),)  double quant only
    <m>.weight.nested_quant_map                  F32 (256,)            double quant only: bitsandbytes' dynamic map
    <m>.weight.quant_state.bitsandbytes__<type>  U8  (len,)            UTF-8 JSON: quant_type, blocksize, dtype,
                                                                       shape [out, in]; with double quant also
                                                                       nested_blocksize (256), nested_dtype,
                                                                       nested_offset

``W[i] = quant_map[code[i]] * absmax[i // b]`` in float32, rounded to the dtype the JSON names (the dtype the
weight had when it was quantized: the model's load dtype, not ``bnb_4bit_compute_dtype``). With double quant,
``absmax = nested_quant_map[absmax_u8] * nested_absmax[j // 256] + nested_offset``. GPT-2-style ``Conv1D``
weights are transposed before quantizing, so their quantized logical shape is (out, in), not the (in, out)
of the plain checkpoint.

8-bit (LLM.int8, ``load_in_8bit``; transformers saves it on CPU too)::

    <m>.weight         I8  (out, in)   round(W16 * 127 / SCB), W16 = the weight cast to float16
    <m>.SCB            F32 (out,)      per-row absolute maximum
    <m>.weight_format  U8  ()          0 ("row")

``W = weight * SCB / 127`` (bitsandbytes multiplies by ``7.874015718698502e-3``), in float32.

The JSON blob of a double-quantized weight holds a data-dependent float (``nested_offset``), so its length
varies by a byte or two from tensor to tensor in transformers' own files. To let the merge engine write
safetensors headers before it computes a weight, :func:`quantize_weight` writes that number in a fixed-width
exponent form (``5.16853332519531250e-02``): the same float to ``json.loads``, and a blob length that depends
only on the shape, dtype, block size and scheme (:func:`planned_entries`).

Dequantization here is plain torch (no bitsandbytes needed, any device) and reproduces bitsandbytes' result
bit for bit; quantization calls bitsandbytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.patterns import PatternError, compile_pattern
from adapterhub_cli.artifact.safetensors import TensorInfo, dtype_name, torch_dtype, torch_name
from adapterhub_cli.artifact.safetensors import data_start as start_of_data
from adapterhub_cli.errors import CorruptFileError, InvalidAdapterError, UsageError


if TYPE_CHECKING:
    import torch

#: The schemes this module reads and writes.
SCHEMES = ("nf4", "fp4", "int8")
#: Block sizes bitsandbytes accepts for 4-bit quantization.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: bitsandbytes quantizes the per-block absmax of a double-quantized weight in blocks of this size.
NESTED_BLOCKSIZE = 256

_STATE_INFIX = ".quant_state.bitsandbytes__"
_ABSMAX, _QUANT_MAP = ".absmax", ".quant_map"
_NESTED_ABSMAX, _NESTED_QUANT_MAP = ".nested_absmax", ".nested_quant_map"
_SCB, _WEIGHT_FORMAT = ".SCB", ".weight_format"
_INT8_SCALE = 7.874015718698502e-3  # 1 / 127 as bitsandbytes writes it

# The code tables bitsandbytes' kernels use (``bitsandbytes.functional.get_4bit_type``), as float32 values.
_CODES: dict[str, tuple[float, ...]] = {
    "nf4": (
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ),
    "fp4": (
        0.0,
        0.0052083334885537624,
        0.6666666865348816,
        1.0,
        0.3333333432674408,
        0.5,
        0.1666666716337204,
        0.25,
        -0.0,  # code 0b1000: bitsandbytes' kernels apply the sign bit, so it dequantizes to -0.0
        -0.0052083334885537624,
        -0.6666666865348816,
        -1.0,
        -0.3333333432674408,
        -0.5,
        -0.1666666716337204,
        -0.25,
    ),
}

#: the floating dtypes (safetensors names) bitsandbytes quantizes from and dequantizes to
COMPUTE_DTYPES = ("BF16", "F16", "F32")
_COMPUTE_TORCH_NAMES = tuple(torch_name(d) for d in COMPUTE_DTYPES)

# Module names (last component) that are never quantized because they are embeddings (nn.Embedding), and the
# output heads transformers leaves unquantized by default (``get_keys_to_not_convert``: the output embeddings,
# tied weights and the last module) when ``llm_int8_skip_modules`` is null.
_EMBEDDING_NAMES = {"wte", "wpe", "shared", "embed_tokens", "embed_positions", "embed_in", "tok_embeddings"}
_DEFAULT_SKIPS = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")


@dataclass(frozen=True)
class _State4bit:
    """The parsed ``quant_state.bitsandbytes__<type>`` JSON of one 4-bit weight."""

    quant_type: str
    blocksize: int
    dtype: str  # torch name: "bfloat16", "float16" or "float32"
    shape: tuple[int, int]
    nested: bool
    nested_offset: float = 0.0


# --------------------------------------------------------------------------------------------- config


def bnb_scheme(config: dict[str, Any]) -> str | None:
    """The bitsandbytes scheme a ``config.json`` declares: ``"nf4"``, ``"fp4"``, ``"int8"``, or None.

    None when there is no ``quantization_config`` or it is another method (GPTQ, AWQ, ...).

    Raises:
        InvalidAdapterError: the config says bitsandbytes but neither 4-bit nor 8-bit, or an unknown 4-bit type.
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method not in (None, "bitsandbytes"):
        return None
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        quant_type = qc.get("bnb_4bit_quant_type", "fp4")
        if quant_type not in ("nf4", "fp4"):
            raise InvalidAdapterError(
                f"config.json's quantization_config has bnb_4bit_quant_type {quant_type!r}",
                hint="bitsandbytes 4-bit checkpoints use 'nf4' or 'fp4'; fix config.json or re-save the model",
            )
        return str(quant_type)
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8"
    if method == "bitsandbytes":
        raise InvalidAdapterError(
            "config.json's quantization_config says bitsandbytes but neither load_in_4bit nor load_in_8bit",
            hint="fix config.json or re-save the model with save_pretrained",
        )
    return None


def quantization_config(
    scheme: str, compute_dtype: str, *, double_quant: bool = False, skip_modules: list[str] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` entry transformers writes into ``config.json`` for ``scheme``.

    Args:
        scheme: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: ``bnb_4bit_compute_dtype`` as a torch name (``"bfloat16"``, ``"float16"``,
            ``"float32"``) or a safetensors name (``"BF16"``...). transformers writes ``"float32"`` for int8.
        double_quant: ``bnb_4bit_use_double_quant`` (4-bit only).
        skip_modules: ``llm_int8_skip_modules``; None (transformers' default) leaves the output head unquantized.

    Raises:
        UsageError: unknown scheme or dtype, or double quant asked for int8.
    """
    _check_scheme(scheme)
    name = _torch_dtype_name(compute_dtype)
    four = scheme != "int8"
    if not four and double_quant:
        raise UsageError("double quantization applies to 4-bit schemes only", hint="drop it, or use nf4")
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": name if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": scheme if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def should_quantize(key: str, shape: tuple[int, ...], config: dict[str, Any]) -> bool:
    """Whether transformers quantizes tensor ``key`` of ``shape`` when it loads ``config``'s model with bitsandbytes.

    transformers replaces ``nn.Linear`` (and ``Conv1D``) modules; from a key alone we take every 2-D
    ``.weight`` except embeddings (``embed_tokens``, ``wte``, ``*_embeddings``...), the modules matched by
    ``quantization_config.llm_int8_skip_modules`` (transformers' matching: a prefix ending at a module
    boundary, a regex with that boundary, or a suffix) and, when that list is null, the output heads
    (``lm_head``, ``embed_out``, ``score``, ``classifier``, ``qa_outputs``). Norms and biases are 1-D.
    A model class's ``_keep_in_fp32_modules`` are not known here; when the base is already quantized, prefer
    the set it holds (:func:`companions`).
    """
    if len(shape) != 2 or not key.endswith(".weight"):
        return False
    module = key[: -len(".weight")]
    last = module.rsplit(".", 1)[-1]
    if last in _EMBEDDING_NAMES or last.endswith(("embeddings", "embedding")):
        return False
    qc = config.get("quantization_config")
    skips = qc.get("llm_int8_skip_modules") if isinstance(qc, dict) else None
    if skips is None:
        return last not in _DEFAULT_SKIPS
    return _should_convert(module, [str(s) for s in skips])


def _should_convert(module: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module``: a pattern skips a module as a prefix or regex ending at a module
    boundary, or as a suffix."""
    for pattern in patterns:
        if _skips(pattern, module) or module.endswith(pattern):
            return False
    return True


def _skips(pattern: str, module: str) -> bool:
    r"""``re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module)`` in linear time: the pattern (from an untrusted
    ``config.json``) runs on RE2 against each prefix of ``module`` that ends at a module boundary. A pattern Python
    cannot compile is a literal prefix, as in transformers; one RE2 cannot run safely is refused."""
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return module.startswith(pattern) and module[len(pattern) : len(pattern) + 1] in ("", ".")
    try:
        safe = compile_pattern(pattern)
    except PatternError as e:
        raise InvalidAdapterError(
            f"the base's llm_int8_skip_modules entry {pattern!r} cannot be matched safely: {e}",
            hint="edit quantization_config.llm_int8_skip_modules in the base's config.json",
        ) from None
    ends = [i for i, c in enumerate(module) if c == "."]
    prefixes = {module, *(module[:i] for i in ends), *(module[: i + 1] for i in ends)}
    return any(safe.fullmatch(prefix) for prefix in prefixes)


# --------------------------------------------------------------------------------------------- reading


def companions(view: BaseView) -> dict[str, list[str]]:
    """Each quantized weight's key -> the keys of the tensors stored with it (absmax, quant_map, SCB, ...).

    A 4-bit weight is recognised by its ``.quant_state.bitsandbytes__nf4|fp4`` blob, an int8 weight by an
    ``I8`` dtype next to a ``<module>.SCB``. Unquantized tensors do not appear.

    Raises:
        CorruptFileError: a companion without its weight, or a 4-bit weight missing absmax / quant_map or
            half of its nested pair.
    """
    out: dict[str, list[str]] = {}
    for key in view.tensors:
        found = _companions_of(view, key)
        if found is not None:
            out[key] = found
        elif _STATE_INFIX in key:
            weight, _, quant_type = key.rpartition(_STATE_INFIX)
            if quant_type not in ("nf4", "fp4"):
                raise CorruptFileError(
                    f"tensor {key!r}: unknown bitsandbytes quant state type {quant_type!r}",
                    path=_shard(view, key),
                    module=weight,
                )
            if weight in view.tensors:
                continue  # found with its weight
            raise CorruptFileError(
                f"{key!r} is stored but its weight {weight!r} is not",
                path=_shard(view, key),
                module=weight,
                hint="the checkpoint is incomplete: download or copy it again",
            )
    return out


def _companions_of(view: BaseView, key: str) -> list[str] | None:
    """The companion keys of weight ``key`` if it is stored quantized, else None (a lookup, not a scan)."""
    tensors = view.tensors
    if key not in tensors or _STATE_INFIX in key:
        return None
    blobs = [key + _STATE_INFIX + t for t in ("nf4", "fp4") if key + _STATE_INFIX + t in tensors]
    if blobs:
        if len(blobs) > 1:
            raise CorruptFileError(
                f"4-bit weight {key!r} has both an nf4 and an fp4 quant state", path=_shard(view, key)
            )
        keys = [key + s for s in (_ABSMAX, _QUANT_MAP) if key + s in tensors]
        if len(keys) != 2:
            raise CorruptFileError(
                f"4-bit weight {key!r} lacks its .absmax or .quant_map",
                path=_shard(view, key),
                module=key,
                hint="the checkpoint is incomplete: download or copy it again",
            )
        nested = [key + s for s in (_NESTED_ABSMAX, _NESTED_QUANT_MAP) if key + s in tensors]
        if len(nested) == 1:
            raise CorruptFileError(
                f"4-bit weight {key!r} has {nested[0]!r} but not its nested partner",
                path=_shard(view, key),
                module=key,
            )
        return [*keys, *nested, blobs[0]]
    if key.endswith(".weight") and tensors[key].dtype == "I8":
        module = key[: -len(".weight")]
        if module + _SCB in tensors:
            return [module + _SCB, *([module + _WEIGHT_FORMAT] if module + _WEIGHT_FORMAT in tensors else [])]
    return None


def logical_view(view: BaseView, read: Callable[[str], bytes] | None = None) -> BaseView:
    """The same checkpoint as it looks dequantized: each quantized weight under its plain key with its logical
    (out, in) shape and its floating dtype; companion tensors hidden; everything else unchanged.

    A 4-bit weight's dtype and shape come from its quant-state JSON (its ``dtype``: ``"BF16"`` for a model
    loaded in bfloat16); an int8 weight keeps its shape and takes ``config.json``'s ``dtype`` /
    ``torch_dtype`` (``"F16"`` when absent: bitsandbytes quantizes int8 from float16). The returned entries keep
    the stored tensor's byte range (``start`` / ``end`` point at the packed bytes, so ``nbytes`` is the stored
    size, not ``numel x dtype``). ``config`` (still holding ``quantization_config``) and ``path`` are shared,
    and ``shard_of`` maps every remaining key, plain keys included, to its shard (:meth:`BaseView.derive`: for
    a Hub base, still fetched one shard at a time when first read). A view without quantized weights comes
    back as an equal copy.

    Args:
        view: the checkpoint as stored.
        read: returns the raw bytes of a stored tensor by key; by default the view's own ``read_raw`` (a Hub base
            reads the small quant-state blobs by HTTP range requests, downloading no shard), else the local
            shard file.

    Raises:
        CorruptFileError: a quant-state blob that is not valid JSON or disagrees with its tensors.
    """
    comps = companions(view)
    hidden = {k for keys in comps.values() for k in keys}
    remote = read is None and view.read_raw is not None
    read = read or view.read_raw or _file_reader(view)
    int8_dtype = _config_dtype(view.config) or "F16"
    blobs = {
        key: next(k for k in comps[key] if _STATE_INFIX in k)
        for key, info in view.tensors.items()
        if key in comps and info.dtype != "I8"
    }
    # one small request per 4-bit weight: over HTTP, a few at a time (a 7B model has ~220 of them)
    with ThreadPoolExecutor(8 if remote else 1, thread_name_prefix="adapters-quant-state") as pool:
        raw = dict(zip(blobs.values(), pool.map(read, blobs.values()), strict=True))
    tensors: dict[str, TensorInfo] = {}
    for key, info in view.tensors.items():
        if key in hidden:
            continue
        if key in comps:
            if info.dtype == "I8":
                info = replace(info, dtype=int8_dtype)
            else:
                blob = blobs[key]
                state = _parse_state(raw[blob], key, view, blob)
                _check_4bit_sizes(view, key, comps[key], state)
                info = replace(info, dtype=dtype_name(state.dtype), shape=state.shape)
        tensors[key] = info
    return view.derive(tensors)


def dequantize_weight(load: Callable[[str], torch.Tensor], key: str, view: BaseView) -> torch.Tensor:
    """The quantized weight ``key`` as plain floats, exactly as bitsandbytes dequantizes it.

    4-bit: returns (out, in) in the dtype of its quant state (what ``bitsandbytes.functional.dequantize_4bit``
    returns for the layer transformers loads). int8: ``weight * SCB / 127`` in float32 (bitsandbytes'
    ``int8_vectorwise_dequant``) cast to the dtype :func:`logical_view` reports. The result is on the device of
    the tensors ``load`` returns. Plain torch: bitsandbytes need not be installed.

    Args:
        load: returns a stored tensor by its key (any device).
        key: the plain weight key, e.g. ``model.layers.0.self_attn.q_proj.weight``.
        view: the checkpoint as stored (not the logical view).

    Raises:
        InvalidAdapterError: ``key`` is not a quantized weight of ``view``.
        CorruptFileError: the stored tensors disagree with each other or with the quant state.
    """
    import torch

    comps = _companions_of(view, key)
    if comps is None:
        raise InvalidAdapterError(
            f"{key!r} is not a bitsandbytes-quantized weight of this checkpoint",
            path=view.path,
            module=key,
            hint="only weights with .absmax / .quant_state (4-bit) or .SCB (int8) companions can be dequantized",
        )
    path = _shard(view, key)
    if view.tensors[key].dtype == "I8":
        weight = load(key)
        scb = load(key[: -len(".weight")] + _SCB)
        if weight.dim() != 2 or scb.shape != (weight.shape[0],):
            raise CorruptFileError(
                f"int8 weight {key!r} {tuple(weight.shape)} does not match its SCB {tuple(scb.shape)}",
                path=path,
                module=key,
            )
        dtype = torch_dtype(_config_dtype(view.config) or "F16")
        return (weight * scb.float().view(-1, 1) * _INT8_SCALE).to(dtype)

    blob_key = comps[-1]
    state = _parse_state(bytes(load(blob_key).cpu().to(torch.uint8).numpy()), key, view, blob_key)
    _check_4bit_sizes(view, key, comps, state)
    packed = load(key)
    device = packed.device
    packed = packed.contiguous().view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)
    quant_map = load(key + _QUANT_MAP).to(device=device, dtype=torch.float32)
    code = torch.tensor(_CODES[state.quant_type], dtype=torch.float32, device=device)
    if not torch.equal(quant_map, code):
        raise CorruptFileError(
            f"{key + _QUANT_MAP!r} is not bitsandbytes' {state.quant_type} table",
            path=path,
            module=key,
            hint="the checkpoint was not written by bitsandbytes / transformers, or is damaged",
        )
    n = state.shape[0] * state.shape[1]
    blocks = -(-n // state.blocksize)
    absmax = load(key + _ABSMAX).to(device)
    if state.nested:
        nested_absmax = load(key + _NESTED_ABSMAX).to(device=device, dtype=torch.float32)
        nested_map = load(key + _NESTED_QUANT_MAP).to(device=device, dtype=torch.float32)
        scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:blocks]
        absmax = nested_map[absmax.long()] * scale
        absmax += torch.tensor(state.nested_offset, dtype=torch.float32, device=device)
    else:
        absmax = absmax.float()
    codes = torch.empty(packed.numel() * 2, dtype=torch.long, device=device)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    values = code[codes[:n]]
    pad = blocks * state.blocksize - n
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = (values.view(blocks, state.blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.reshape(state.shape).to(getattr(torch, state.dtype))


# --------------------------------------------------------------------------------------------- writing


def planned_entries(
    key: str,
    shape: tuple[int, int],
    scheme: str,
    *,
    compute_dtype: torch.dtype | str,
    blocksize: int = 64,
    double_quant: bool = False,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stored key, safetensors dtype, shape) of every tensor :func:`quantize_weight` returns for ``key``,
    known before the weight is: the merge engine writes safetensors headers first.

    ``compute_dtype`` is needed because the 4-bit quant-state JSON names it, which sets the blob's length.

    Args:
        key: the plain weight key (ending in ``.weight`` for int8).
        shape: the weight's logical (out, in) shape.
        scheme: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the same value later passed to :func:`quantize_weight` (a torch dtype or a torch /
            safetensors dtype name).
        blocksize, double_quant: as for :func:`quantize_weight`.

    Raises:
        UsageError: unknown scheme, dtype or block size, a shape that is not 2-D, double quant with int8.
    """
    _check_args(key, shape, scheme, blocksize, double_quant)
    dtype_name = _torch_dtype_name(compute_dtype)
    out_features, in_features = shape
    if scheme == "int8":
        module = key[: -len(".weight")]
        return [
            (key, "I8", (out_features, in_features)),
            (module + _SCB, "F32", (out_features,)),
            (module + _WEIGHT_FORMAT, "U8", ()),
        ]
    n = out_features * in_features
    blocks = -(-n // blocksize)
    entries: list[tuple[str, str, tuple[int, ...]]] = [
        (key, "U8", ((n + 1) // 2, 1)),
        (key + _ABSMAX, "U8" if double_quant else "F32", (blocks,)),
        (key + _QUANT_MAP, "F32", (16,)),
    ]
    if double_quant:
        entries += [
            (key + _NESTED_ABSMAX, "F32", (-(-blocks // NESTED_BLOCKSIZE),)),
            (key + _NESTED_QUANT_MAP, "F32", (256,)),
        ]
    blob = _state_blob(scheme, blocksize, dtype_name, shape, 0.0 if double_quant else None)
    entries.append((key + _STATE_INFIX + scheme, "U8", (len(blob),)))
    return entries


def quantize_weight(
    t: torch.Tensor,
    key: str,
    scheme: str,
    *,
    compute_dtype: torch.dtype,
    blocksize: int = 64,
    double_quant: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize the (out, in) weight ``t`` as transformers would when loading it with bitsandbytes, and return
    every tensor it stores for it (keys, dtypes and shapes exactly those of :func:`planned_entries`).

    ``t`` is first rounded to ``compute_dtype`` (the dtype the quant state records and dequantization returns;
    transformers uses the model's load dtype there, so pass the base's weight dtype), as a merged weight saved
    in that dtype and then quantized by transformers would be. int8 then casts to float16 as bitsandbytes does.
    Tensors come back on ``t``'s device (the JSON blob and ``weight_format`` on CPU); needs bitsandbytes.

    Raises:
        UsageError: bad arguments, bitsandbytes missing, or a weight with NaN / inf values.
    """
    import torch

    _check_args(key, tuple(t.shape), scheme, blocksize, double_quant)
    dtype_name = _torch_dtype_name(compute_dtype)
    if not t.is_floating_point():
        raise UsageError(f"{key}: cannot quantize a {t.dtype} tensor", hint="quantize floating-point weights only")
    w = t.detach().to(getattr(torch, dtype_name))
    if not bool(torch.isfinite(w).all()):
        raise UsageError(
            f"{key}: the weight holds NaN or inf values and cannot be quantized",
            hint="check the base model and the adapter (adapters validate), or write the output unquantized",
        )
    functional = _bnb_functional()
    if scheme == "int8":
        module = key[: -len(".weight")]
        cb, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return {key: cb, module + _SCB: scb, module + _WEIGHT_FORMAT: torch.tensor(0, dtype=torch.uint8)}
    packed, state = functional.quantize_4bit(
        w.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=scheme
    )
    out = {key: packed, key + _ABSMAX: state.absmax, key + _QUANT_MAP: state.code}
    offset = None
    if double_quant:
        out[key + _NESTED_ABSMAX] = state.state2.absmax
        out[key + _NESTED_QUANT_MAP] = state.state2.code.clone()
        offset = float(state.offset.item())
    blob = _state_blob(scheme, blocksize, dtype_name, (int(t.shape[0]), int(t.shape[1])), offset)
    out[key + _STATE_INFIX + scheme] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


# --------------------------------------------------------------------------------------------- helpers


def _state_blob(scheme: str, blocksize: int, dtype_name: str, shape: tuple[int, int], offset: float | None) -> bytes:
    """The quant-state JSON as bitsandbytes packs it (``json.dumps`` of its fields); with double quant
    (``offset`` given) ``nested_offset`` is written in a fixed-width exponent form so the length depends only on
    the other arguments."""
    doc: dict[str, Any] = {"quant_type": scheme, "blocksize": blocksize, "dtype": dtype_name, "shape": list(shape)}
    if offset is None:
        return json.dumps(doc).encode()
    if not math.isfinite(offset) or offset < 0:
        raise UsageError(f"double quantization produced an invalid offset {offset!r}", hint="check the weight values")
    doc.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32")
    text = json.dumps(doc)
    # float32 values written with 18 significant digits: always "d.ddddddddddddddddde[+-]dd" (23 characters).
    return f'{text[:-1]}, "nested_offset": {offset:.17e}}}'.encode()


def _parse_state(raw: bytes, key: str, view: BaseView, blob_key: str) -> _State4bit:
    path = _shard(view, blob_key)
    try:
        doc = json.loads(raw.decode("utf-8"))
        quant_type = str(doc["quant_type"])
        blocksize = int(doc["blocksize"])
        dtype = str(doc["dtype"])
        shape = tuple(int(d) for d in doc["shape"])
        nested = "nested_offset" in doc
        offset = float(doc["nested_offset"]) if nested else 0.0
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:  # JSONDecodeError: a ValueError
        raise CorruptFileError(
            f"tensor {blob_key!r} is not a bitsandbytes quant state ({e})", path=path, module=key
        ) from e
    if not blob_key.endswith(_STATE_INFIX + quant_type) or quant_type not in ("nf4", "fp4"):
        raise CorruptFileError(f"tensor {blob_key!r} declares quant_type {quant_type!r}", path=path, module=key)
    if blocksize not in BLOCKSIZES:
        raise CorruptFileError(f"tensor {blob_key!r} declares blocksize {blocksize}", path=path, module=key)
    if dtype not in _COMPUTE_TORCH_NAMES:
        raise CorruptFileError(
            f"tensor {blob_key!r} declares dtype {dtype!r}",
            path=path,
            module=key,
            hint="bitsandbytes dequantizes to bfloat16, float16 or float32 only",
        )
    if len(shape) != 2 or min(shape) <= 0:
        raise CorruptFileError(
            f"tensor {blob_key!r} declares shape {list(shape)}; a 2-D weight is expected", path=path, module=key
        )
    if nested and doc.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
        raise CorruptFileError(
            f"tensor {blob_key!r} declares nested_blocksize {doc.get('nested_blocksize')}", path=path, module=key
        )
    return _State4bit(quant_type, blocksize, dtype, (shape[0], shape[1]), nested, offset)


def _check_4bit_sizes(view: BaseView, key: str, comps: list[str], state: _State4bit) -> None:
    """The stored companions' sizes agree with the quant state (checked from headers, before any read)."""
    n = state.shape[0] * state.shape[1]
    blocks = -(-n // state.blocksize)
    info = view.tensors[key]
    nested = key + _NESTED_ABSMAX in comps
    expected = {
        key: ((n + 1) // 2, None),
        key + _ABSMAX: (blocks, "U8" if nested else "F32"),
        key + _QUANT_MAP: (16, "F32"),
    }
    if nested:
        expected[key + _NESTED_ABSMAX] = (-(-blocks // NESTED_BLOCKSIZE), "F32")
        expected[key + _NESTED_QUANT_MAP] = (256, "F32")
    if nested != state.nested:
        raise CorruptFileError(
            f"{key!r}: the quant state and the stored nested_absmax disagree about double quantization",
            path=_shard(view, key),
            module=key,
        )
    for name, (count, dtype) in expected.items():
        t = view.tensors[name]
        numel = info.nbytes if name == key else t.numel  # packed bytes may be stored as another dtype
        if numel != count or (dtype is not None and t.dtype != dtype):
            raise CorruptFileError(
                f"{name!r} is {t.dtype} {list(t.shape)} but a {state.quant_type} weight of shape "
                f"{list(state.shape)} (block size {state.blocksize}) needs {count} {dtype or 'bytes'}",
                path=_shard(view, name),
                module=key,
                hint="the checkpoint is damaged: download or copy it again",
            )


def _file_reader(view: BaseView) -> Callable[[str], bytes]:
    data_start: dict[Path, int] = {}

    def read(key: str) -> bytes:
        path = view.shard_of.get(key, view.path)
        info = view.tensors[key]
        try:
            with path.open("rb") as f:
                if path not in data_start:
                    data_start[path] = start_of_data(f.read(8), path=path)
                f.seek(data_start[path] + info.start)
                data = f.read(info.nbytes)
        except OSError as e:
            raise CorruptFileError(f"cannot read tensor {key!r} ({e})", path=path, module=key) from e
        if len(data) != info.nbytes:
            raise CorruptFileError(f"tensor {key!r} is truncated", path=path, module=key)
        return data

    return read


def _shard(view: BaseView, key: str) -> Path:
    """Where ``key`` is stored, for messages. ``dict.get`` on purpose: a Hub base's lazy shard map answers its
    ``org/name@rev/<shard>`` placeholder here instead of downloading the shard."""
    return dict.get(view.shard_of, key, view.path)


def _config_dtype(config: dict[str, Any]) -> str | None:
    """``config.json``'s model dtype as a safetensors name, if it names a floating dtype we know."""
    raw = config.get("dtype") or config.get("torch_dtype")
    if not raw:
        return None
    try:
        name = dtype_name(raw)
    except ValueError:
        return None
    return name if name in COMPUTE_DTYPES else None


def _torch_dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"BF16"`` -> ``"bfloat16"`` (float32 and the 16-bit floats only)."""
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise UsageError(
            f"unsupported compute dtype {dtype!r}",
            hint="bitsandbytes quantizes from bfloat16, float16 or float32",
        )
    return torch_name(name)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown bitsandbytes scheme {scheme!r}", hint=f"choose one of {', '.join(SCHEMES)}")


def _check_args(key: str, shape: tuple[int, ...], scheme: str, blocksize: int, double_quant: bool) -> None:
    _check_scheme(scheme)
    if len(shape) != 2 or min(shape) <= 0:
        raise UsageError(f"{key}: only 2-D weights are quantized, not shape {list(shape)}")
    if scheme == "int8":
        if double_quant:
            raise UsageError("double quantization applies to 4-bit schemes only", hint="drop it, or use nf4")
        if not key.endswith(".weight"):
            raise UsageError(f"{key}: int8 weights are stored as <module>.weight", hint="pass the .weight key")
    elif blocksize not in BLOCKSIZES:
        raise UsageError(
            f"block size {blocksize} is not one bitsandbytes supports",
            hint=f"choose one of {', '.join(map(str, BLOCKSIZES))} (transformers uses 64)",
        )


def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as functional
    except ImportError as e:
        raise UsageError(
            "writing a bitsandbytes-quantized checkpoint needs bitsandbytes",
            hint="pip install 'adapterhub-cli[quant]', or leave out --quantize",
        ) from e
    return functional
