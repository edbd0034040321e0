"""Does an adapter fit its base model? Checks on config, tensor headers and (for finiteness) the adapter's weights.

Each problem is a :class:`Finding` with a stable code, a severity, the module and a sentence saying what
to do. Only the adapter's own (small) tensors are loaded; the base is read through its headers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adapterhub_cli.artifact.adapter import Adapter, LoraModule, conv1d_layer, factor_shape_problem
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.config import MAX_ALPHA, MAX_RANK
from adapterhub_cli.artifact.safetensors import (
    COMPUTE_DTYPES,
    FLOAT_DTYPES,
    TensorInfo,
    all_finite,
    computable,
    count_nonfinite,
)


if TYPE_CHECKING:
    import torch

    from lora_ops import LoraFactors


Severity = Literal["error", "warning", "info"]

#: PEFT task types whose AutoPeftModel class loads a head model (``AutoModelForCausalLM`` ...), not the bare one
HEAD_TASKS = frozenset({"CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS"})


@dataclass(frozen=True)
class Finding:
    """One result of validation. ``code`` is stable and meant for scripts."""

    code: str
    severity: Severity
    message: str
    module: str | None = None


@dataclass
class ValidationReport:
    """All findings for one adapter against one base."""

    adapter: str
    base: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_against(adapter: Adapter, base: BaseView, *, check_weights: bool = True) -> ValidationReport:
    """Check ``adapter`` against ``base``; return every finding (never raises for a misfit)."""
    report = ValidationReport(adapter=str(adapter.path), base=str(base.path))
    add = report.findings.append
    for w in adapter.warnings:
        add(Finding("adapter-warning", "warning", w))
    add_all = report.findings.extend
    add_all(check_config(adapter))
    add_all(_check_factor_shapes(adapter))
    add_all(_check_ranks(adapter))
    add_all(_check_targets(adapter, base))
    add_all(_check_names(adapter, base))
    for m in adapter.modules.values():
        add_all(_check_module_shape(adapter, base, m))
    add_all(_check_extra_tensors(adapter, base))
    add_all(_check_declared_base(adapter, base))
    if check_weights:
        add_all(_check_weights(adapter))
    arch = _check_architecture(adapter, base)
    if arch is not None:
        report.findings = [arch, *_summarise_misfits(report.findings)]
    return report


#: Module-name signatures of model families: (what to call it, a regex most of a family's LoRA modules match).
_FAMILIES: tuple[tuple[str, str], ...] = (
    (
        "Llama-style decoder (Llama, Mistral, Qwen, Gemma, ...)",
        r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    ),
    ("GPT-2-style model (GPT-2, GPT-BigCode)", r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"),
    (
        "BERT-style encoder (BERT, RoBERTa, XLM-R)",
        r"(^|\.)layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
        r"|output\.dense)$",
    ),
    (
        "T5-style model (T5, mT5, Flan-T5)",
        r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention|DenseReluDense)\.",
    ),
    ("GPT-NeoX-style model (Pythia, GPT-NeoX)", r"(^|\.)layers\.\d+\.attention\.(query_key_value|dense)$"),
    ("Falcon / BLOOM-style model", r"(^|\.)h\.\d+\.self_attention\.(query_key_value|dense)$"),
    ("diffusers UNet", r"(^|\.)(down_blocks|up_blocks|mid_block)\..*\.(to_q|to_k|to_v|to_out\.0|proj_in|proj_out)$"),
    ("CLIP text encoder", r"(^|\.)text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\."),
)


def _family(names: list[str]) -> tuple[str, str] | None:
    """The family whose signature at least half of ``names`` match (None: no clear family)."""
    import re

    for label, pattern in _FAMILIES:
        rx = re.compile(pattern)
        if names and 2 * sum(bool(rx.search(n)) for n in names) >= len(names):
            return label, pattern
    return None


def _arch_name(config: dict[str, object]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _declared_arch(adapter: Adapter) -> str | None:
    """The architecture of the base the adapter declares, when that is a local folder with a config.json."""
    from adapterhub_cli.artifact.files import read_json
    from adapterhub_cli.errors import AdaptersError

    declared = adapter.config.base_model_name_or_path
    if not declared:
        return None
    try:
        folder = Path(declared)
        if not (folder / "config.json").is_file():
            return None
        return _arch_name(read_json(folder / "config.json", "declared base config.json"))
    except (AdaptersError, OSError, ValueError):
        return None


def _check_architecture(adapter: Adapter, base: BaseView) -> Finding | None:
    """``architecture-mismatch``: most LoRA modules are not in the base, and the adapter clearly belongs to another
    architecture: the base it declares (a local folder) has other ``architectures``, or its module names follow a
    family's naming that no module of this base follows."""
    names = list(adapter.modules)
    absent = [n for n in names if base.weight_match(adapter.config.base_module(n)) is None]
    if not names or 2 * len(absent) < len(names):
        return None
    here = _arch_name(base.config) or "an unknown architecture"
    declared = _declared_arch(adapter)
    family = _family(names)
    if declared is not None and declared != here:
        theirs = f"declares a {declared} base ({adapter.config.base_model_name_or_path})"
    elif family is not None and _family_absent(family[1], base):
        theirs = f"is for a {family[0]} (module names like {names[0]})"
    else:
        return None
    return Finding(
        "architecture-mismatch",
        "error",
        f"the adapter {theirs}, this base is {here}: {len(absent)} of its {len(names)} modules do not exist here "
        "and PEFT would apply none of them; validate it against the base it was trained on",
    )


def _family_absent(pattern: str, base: BaseView) -> bool:
    import re

    rx = re.compile(pattern)
    return not any(rx.search(n) for n in base.module_names())


def _summarise_misfits(findings: list[Finding]) -> list[Finding]:
    """After ``architecture-mismatch``, one line per kind of per-module misfit instead of one per module (and no
    ``base-name-mismatch``: the architecture finding says more)."""
    out: list[Finding] = []
    grouped: dict[str, list[Finding]] = {}
    for f in findings:
        if f.code == "base-name-mismatch":
            continue
        if f.code in ("module-missing", "shape-mismatch") and f.module is not None:
            grouped.setdefault(f.code, []).append(f)
        else:
            out.append(f)
    for code, group in grouped.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        what = "are not in this base" if code == "module-missing" else "do not fit this base's shapes"
        out.append(
            Finding(
                code,
                group[0].severity,
                f"{len(group)} modules {what} (e.g. {group[0].module}): see architecture-mismatch",
                group[0].module,
            )
        )
    return out


def check_config(adapter: Adapter) -> list[Finding]:
    """The config's values that scale an update, checked: ``lora_alpha`` and ``alpha_pattern`` values finite and at
    most :data:`MAX_ALPHA` in size (``alpha-not-finite``, ``alpha-out-of-range``), ``r`` and ``rank_pattern``
    values at most :data:`MAX_RANK` (``rank-out-of-range``). Every writing command refuses these errors."""
    cfg = adapter.config
    out = []
    alphas: list[tuple[str, str | None, float]] = [("lora_alpha", None, cfg.lora_alpha)]
    alphas += [(f"alpha_pattern[{key!r}]", key, value) for key, value in cfg.alpha_pattern.items()]
    for what, key, alpha in alphas:
        if not math.isfinite(alpha):
            out.append(
                Finding(
                    "alpha-not-finite",
                    "error",
                    f"{what} is {alpha}: every update it scales would be NaN or infinite; set a finite alpha in "
                    "adapter_config.json",
                    key,
                )
            )
        elif abs(alpha) > MAX_ALPHA:
            out.append(
                Finding(
                    "alpha-out-of-range",
                    "error",
                    f"{what} is {alpha:g}, beyond +-{MAX_ALPHA:g}: no trained adapter uses such a scale (a damaged "
                    "or crafted config); set the alpha it was trained with",
                    key,
                )
            )
    ranks: list[tuple[str, str | None, int]] = [("r", None, cfg.r)]
    ranks += [(f"rank_pattern[{key!r}]", key, v) for key, v in cfg.rank_pattern.items()]
    for what, key, rank in ranks:
        if rank > MAX_RANK:
            out.append(
                Finding(
                    "rank-out-of-range",
                    "error",
                    f"{what} is {_number(rank)}, beyond {MAX_RANK}: set the rank the tensors have",
                    key,
                )
            )
    return out


def _number(n: int) -> str:
    """An integer for a message: its digits, or how many there are when they are too many to read."""
    return str(n) if n < 10**30 else f"a {len(str(n))}-digit number"


def _check_factor_shapes(adapter: Adapter) -> list[Finding]:
    """``factor-shape``: factors with a number of dimensions PEFT refuses (:func:`factor_shape_problem`): a 3-D
    lora_A is not a Linear's with its trailing dimensions multiplied. Every writing command refuses this error."""
    return [
        Finding("factor-shape", "error", f"{problem}; re-save the adapter with PEFT", m.name)
        for m in adapter.modules.values()
        if (problem := factor_shape_problem(m)) is not None
    ]


def _check_ranks(adapter: Adapter) -> list[Finding]:
    out = []
    cfg = adapter.config
    for m in adapter.modules.values():
        want = cfg.rank_for(m.name)
        if want != m.rank:
            rule = "rank_pattern" if want != cfg.r else "r"
            out.append(
                Finding(
                    "rank-mismatch",
                    "error",
                    f"the tensors have rank {m.rank} but the config ({rule}) says {_number(want)}: the scale "
                    "alpha/r would be wrong; fix r / rank_pattern in adapter_config.json",
                    m.name,
                )
            )
    if cfg.use_dora:
        lacking = [m.name for m in adapter.modules.values() if m.magnitude is None and m.kind != "embedding"]
        if lacking:
            out.append(
                Finding(
                    "dora-magnitude-missing",
                    "error",
                    f"use_dora is set but {len(lacking)} modules have no lora_magnitude_vector "
                    f"(e.g. {lacking[0]}): re-save the adapter with PEFT",
                    lacking[0],
                )
            )
    elif any(m.magnitude is not None for m in adapter.modules.values()):
        out.append(
            Finding(
                "dora-flag-missing",
                "error",
                "the file holds DoRA magnitude vectors but use_dora is false: set use_dora: true",
            )
        )
    return out


def _namings(base: BaseView) -> list[str]:
    """The names of the base's weight modules as the models transformers builds from the checkpoint know them:
    as stored, and across the ``base_model_prefix`` (a head model loaded from a bare checkpoint, a bare model
    loaded from a head checkpoint)."""
    names = base.module_names()
    prefix = base.base_model_prefix()
    if not prefix:
        return names
    head = prefix + "."
    if any(n.startswith(head) for n in names):
        other = [n[len(head) :] for n in names if n.startswith(head)]
    else:
        other = [head + n for n in names]
    return sorted(set(names) | set(other))


def _check_targets(adapter: Adapter, base: BaseView) -> list[Finding]:
    """PEFT's rule: the config must select at least one module of the model (else ``inject_adapter`` raises
    "Target modules ... not found in the base model"); list entries that match nothing are fine as long as one
    matches (target lists written for several architectures are common)."""
    out = []
    cfg = adapter.config
    if cfg.target_modules is not None and not adapter.config_inferred:
        names = base.module_names()
        if not any(cfg.targets(n) for n in names):
            names = _namings(base)
        hit = any(cfg.targets(n) for n in names)
        excluded = [] if hit else [(n, why) for n in names if (why := cfg.excluded_by(n))]
        if excluded:
            name, why = excluded[0]
            out.append(
                Finding(
                    "targets-not-found",
                    "error",
                    f"target_modules select only modules that {why} excludes (e.g. {name}): PEFT never puts a LoRA "
                    'on an excluded or modules_to_save module and refuses the adapter ("No modules were targeted '
                    f'for adaptation"); remove them from {why}',
                    name,
                )
            )
        elif not hit:
            out.append(
                Finding(
                    "targets-not-found",
                    "error",
                    f"target_modules {_show_targets(cfg.target_modules)} select no module of the base: PEFT refuses "
                    "to load the adapter (Target modules ... not found in the base model); is it for another "
                    "architecture?",
                )
            )
        elif isinstance(cfg.target_modules, list):
            unused = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
            if unused:
                out.append(
                    Finding(
                        "target-unused",
                        "info",
                        f"target_modules entries {unused} match no module of this base; PEFT needs only one entry "
                        "to match (lists written for several architectures are common)",
                        unused[0],
                    )
                )
    untargeted = [m for m in adapter.modules if not adapter.config_inferred and not cfg.targets(m)]
    if untargeted:
        why = cfg.excluded_by(untargeted[0])
        reason = (
            f"target_modules names it but {why} excludes it (PEFT puts no LoRA on such a module)"
            if why
            else "target_modules does not select them"
        )
        fix = f"remove it from {why}" if why else "add them to target_modules"
        out.append(
            Finding(
                "untargeted-tensors",
                "error",
                f"{len(untargeted)} modules have LoRA tensors PEFT does not apply (e.g. {untargeted[0]}: {reason}): "
                f"PEFT loads the adapter without them (a merge would differ from PEFT); {fix}, or drop their tensors",
                untargeted[0],
            )
        )
    return out


def _show_targets(targets: list[str] | str) -> str:
    text = repr(targets)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_names(adapter: Adapter, base: BaseView) -> list[Finding]:
    """Each LoRA module against the modules of the model transformers builds from the base, as PEFT maps saved
    keys (``base_model.model.<module>``) onto it: only the names themselves, transformers' ``base_model_prefix``
    and a tied ``lm_head`` are tolerated. A module PEFT would not find is an error (PEFT loads the adapter without
    applying it); a name that would match after removing or adding a leading prefix gets a hint to rewrite it."""
    missing: list[str] = []
    bare: list[str] = []
    for m in adapter.modules.values():
        match = base.weight_match(adapter.config.base_module(m.name))  # layer_replication: the layer it copies
        if match is None:
            missing.append(m.name)
        elif match[1] == "prefix-removed":
            bare.append(m.name)
    task = adapter.config.task_type
    prefix = base.base_model_prefix() if bare else None  # transformers is imported only when needed
    arch = (base.config.get("architectures") or ["the head model"])[0]
    loaded_as_head = task is not None and task in HEAD_TASKS
    out = []
    if bare and loaded_as_head:
        # PEFT (AutoPeftModelFor<task>) loads the head model: its names carry the prefix these lack
        out += [
            Finding(
                "module-missing",
                "error",
                f"{name} is named as in the bare model, but task_type {task} loads the base as {arch}, whose "
                f"module is {prefix}.{name}: PEFT would load the adapter without applying it; run `adapters "
                f"convert {adapter.path} --to peft --add-prefix {prefix}. -o OUT` to rewrite the names",
                name,
            )
            for name in bare
        ]
    elif bare and task != "FEATURE_EXTRACTION":
        out.append(
            Finding(
                "bare-model-names",
                "warning",
                f"{len(bare)} modules are named as in the bare model (e.g. {bare[0]}) while the base stores a "
                f"{arch} (keys under {prefix}.): PEFT applies them only when the base is loaded as its bare model "
                f"(AutoModel); loaded as {arch} it applies none. For the head model run `adapters convert "
                f"{adapter.path} --to peft --add-prefix {prefix}. -o OUT`",
                bare[0],
            )
        )
    hint = _prefix_hint(adapter, base, missing)
    for i, name in enumerate(missing):
        if hint:
            what = hint if i == 0 else "see the name-prefix note"
        else:
            what = "is the adapter for another model?"
        out.append(
            Finding(
                "module-missing",
                "error",
                f"the base has no module {name} (no {name}.weight): PEFT would load the adapter without applying "
                f"this module's weights; {what}",
                name,
            )
        )
    if hint:
        out.append(Finding("name-prefix", "info", hint, missing[0]))
    return out


def _prefix_hint(adapter: Adapter, base: BaseView, missing: list[str]) -> str | None:
    """The tolerant lookup, as a hint only: the one leading prefix whose removal (or addition) makes the most
    missing names match, and the command that rewrites them."""
    if not missing:
        return None
    votes = Counter(hit for hit in (base.near_match(n) for n in missing) if hit is not None)
    if not votes:
        return None
    (op, prefix), n = votes.most_common(1)[0]
    which = "these names match" if n == len(missing) else f"{n} of these {len(missing)} names match"
    if op == "strip":
        return (
            f"{which} after removing the prefix {prefix!r}: run `adapters convert {adapter.path} --to peft "
            f"--strip-prefix {prefix} -o OUT` to rewrite them"
        )
    return (
        f"{which} after adding the prefix {prefix!r}: run `adapters convert {adapter.path} --to peft "
        f"--add-prefix {prefix} -o OUT` to rewrite them"
    )


def _expected_shapes(
    adapter: Adapter, m: LoraModule, w: TensorInfo, base_config: dict[str, Any] | None = None
) -> tuple[bool, bool]:
    """(fits, fits_only_transposed_against_the_flag) for a LoRA module and its base weight."""
    if m.kind == "conv":
        ok = len(w.shape) == 4 and w.shape[0] == m.d_out and w.shape[1:] == m.A.shape[1:]
        return ok, False
    if len(w.shape) != 2:
        return False, False
    straight = w.shape == (m.d_out, m.d_in)
    transposed = w.shape == (m.d_in, m.d_out)
    if m.kind == "embedding":
        return transposed, False
    wants_transposed = adapter.config.fan_in_fan_out
    fits = straight or transposed
    against_flag = fits and not (transposed if wants_transposed else straight)
    if straight and transposed:  # square: the layer's class tells, where the base's config does (as PEFT sees it)
        conv1d = conv1d_layer(base_config, m.name)
        against_flag = conv1d is not None and conv1d != wants_transposed
    return fits, against_flag


def _check_module_shape(adapter: Adapter, base: BaseView, m: LoraModule) -> list[Finding]:
    key = base.find_weight(adapter.config.base_module(m.name))
    if key is None:
        return []  # module-missing: _check_names
    w = base.tensors[key]
    out = []
    # 8-bit floats (F8_E4M3, F8_E5M2) and smaller are storage formats torch adds nothing to, quantization_config
    # or not (bitsandbytes stores U8 / I8; an fp8-quantized checkpoint needs its scales to mean anything)
    storage_float = w.dtype in FLOAT_DTYPES and w.dtype not in COMPUTE_DTYPES
    if storage_float:
        out.append(
            Finding(
                "base-weight-not-float",
                "error",
                f"the base stores {key} as {w.dtype}, a storage format torch cannot add to: a LoRA update can only "
                f"be added to a weight in {', '.join(sorted(COMPUTE_DTYPES))} (an fp8 checkpoint: convert it to "
                "bf16 first)",
                m.name,
            )
        )
    elif w.dtype not in FLOAT_DTYPES and not base.config.get("quantization_config"):
        out.append(
            Finding(
                "base-weight-not-float",
                "error",
                f"the base stores {key} as {w.dtype}: a LoRA update can only be added to a floating-point weight "
                "(is the checkpoint damaged, or quantized without a quantization_config?)",
                m.name,
            )
        )
    fits, against_flag = _expected_shapes(adapter, m, w, base.config)
    if not fits:
        out.append(
            Finding(
                "shape-mismatch",
                "error",
                f"lora_A {list(m.A.shape)} / lora_B {list(m.B.shape)} do not fit the base weight {list(w.shape)}: "
                "the adapter was trained on a model with other dimensions (hidden size, heads)",
                m.name,
            )
        )
    elif against_flag:
        flag = adapter.config.fan_in_fan_out
        out.append(
            Finding(
                "fan-in-fan-out",
                "warning",
                f"fan_in_fan_out is {str(flag).lower()} but the base stores this weight "
                f"{'as (d_out, d_in) (Linear)' if flag else 'transposed, as (d_in, d_out) (Conv1D)'}; "
                f"PEFT corrects this with a warning (and so does the merge): set fan_in_fan_out to "
                f"{str(not flag).lower()}",
                m.name,
            )
        )
    # PEFT stores a Linear's DoRA magnitude as (d_out,) and a Conv2d's as (1, d_out, 1, 1)
    magnitude_shapes = [(m.d_out,)] + ([(1, m.d_out, 1, 1)] if len(w.shape) == 4 else [])
    if m.magnitude is not None and m.magnitude.shape not in magnitude_shapes:
        out.append(
            Finding(
                "magnitude-shape",
                "error",
                f"DoRA magnitude has shape {list(m.magnitude.shape)}, expected {list(magnitude_shapes[-1])}",
                m.name,
            )
        )
    return out


def _check_extra_tensors(adapter: Adapter, base: BaseView) -> list[Finding]:
    out = []
    saved = adapter.config.modules_to_save or []
    for name, info in adapter.extra_tensors.items():
        key = base.find_weight(name.replace(".base_layer.", "."), suffix="")
        if key is None:
            out.append(
                Finding(
                    "unexpected-key",
                    "warning",
                    f"saved tensor {name!r} has no counterpart in the base; PEFT will report it as an unexpected key",
                    name,
                )
            )
            continue
        want = base.tensors[key].shape
        if info.shape == want:
            continue
        if len(want) == 2 and len(info.shape) == 2 and want[1] == info.shape[1] and want[0] != info.shape[0]:
            hint = (
                f"the vocabulary or label count differs ({info.shape[0]} rows saved, {want[0]} in the base): "
                f"resize the base first (model.resize_token_embeddings({info.shape[0]})) or use the matching base"
            )
        else:
            hint = "the adapter was trained on a model with other dimensions"
        owner = next((s for s in saved if _saved_under(name, s)), None)
        out.append(
            Finding(
                "modules-to-save-shape" if owner else "extra-tensor-shape",
                "error",
                f"saved tensor {name} has shape {list(info.shape)} but the base has {list(want)}: {hint}",
                name,
            )
        )
    for s in saved:
        # ``s`` names a module, often a parent one ("classifier" owns classifier.dense.weight, ...).
        if not any(_saved_under(n, s) for n in adapter.extra_tensors) and any(
            _saved_under(k, s) for k in base.tensors
        ):
            out.append(
                Finding(
                    "modules-to-save-missing",
                    "error",
                    f"modules_to_save names {s!r} but no saved copy is in the file: PEFT refuses to load the "
                    "adapter (set_peft_model_state_dict looks the copy up: KeyError); save the adapter again with "
                    f"PEFT, or remove {s!r} from modules_to_save to use the base's weights",
                    s,
                )
            )
    return out


def _saved_under(key: str, module: str) -> bool:
    """Whether tensor ``key`` belongs to module ``module`` (itself, a child, or a suffix match as PEFT matches)."""
    return key == module or key.startswith(module + ".") or f".{module}." in f".{key}"


def _same_base(declared: str, base: BaseView) -> bool:
    if Path(declared).exists():
        return Path(declared).resolve() == base.path.resolve()
    names = {base.path.name, base.name_or_path, Path(base.name_or_path).name}
    return declared in names or declared.rstrip("/").split("/")[-1] in {Path(n).name for n in names}


def _check_declared_base(adapter: Adapter, base: BaseView) -> list[Finding]:
    declared = adapter.config.base_model_name_or_path
    if not declared:
        return [Finding("base-undeclared", "info", "the adapter does not declare base_model_name_or_path")]
    if _same_base(declared, base):
        return []
    return [
        Finding(
            "base-name-mismatch",
            "warning",
            f"the adapter declares base {declared!r} but is checked against {base.name_or_path!r}: "
            "make sure this is the same model (shapes alone cannot tell fine-tunes apart)",
        )
    ]


#: the largest float32: PEFT computes an update in float32 (``(B @ A) * scale``), so beyond this it is inf
F32_MAX = 3.4028234663852886e38


def _check_weights(adapter: Adapter) -> list[Finding]:
    out = []
    zero_b: set[str] = set()
    b_keys = {m.B.name for m in adapter.modules.values()}
    factor_keys = b_keys | {m.A.name for m in adapter.modules.values()}
    amax: dict[str, float] = {}  # the largest |value| of each factor (for the overflow check)
    for info in adapter.all_tensor_infos():  # one tensor in memory at a time
        key = info.name
        t = adapter.source.load([key])[key]
        if key in b_keys and not bool(t.any()):
            zero_b.add(key)
        if key in factor_keys and t.is_floating_point() and t.numel():
            largest = largest_magnitude(t)  # (one pass: finite exactly when every value is)
            finite = math.isfinite(largest)
            if finite:
                amax[key] = largest
        else:
            finite = all_finite(t)
        if not finite:  # any float dtype: 8-bit floats are checked as float32 (they load as float32)
            n_nan, n_inf = count_nonfinite(t)
            out.append(
                Finding(
                    "non-finite",
                    "error",
                    f"tensor {key} holds {n_nan} NaN and {n_inf} inf values: training diverged or the "
                    "file is damaged; do not ship it",
                    key,
                )
            )
    out += _check_overflow(adapter, amax)
    zero = [m.name for m in adapter.modules.values() if m.B.name in zero_b]
    if zero and len(zero) == len(adapter.modules):
        out.append(
            Finding(
                "untrained", "warning", "every lora_B is zero: the adapter changes nothing (saved before training?)"
            )
        )
    elif zero:
        out.append(Finding("zero-modules", "info", f"{len(zero)} modules have lora_B = 0 and change nothing", zero[0]))
    return out


def largest_magnitude(t: torch.Tensor) -> float:
    """max |value| of a non-empty floating tensor, from one ``aminmax`` pass: NaN and inf survive it, so the result
    is finite exactly when every value is (8-bit floats measured as float32)."""
    import torch

    lo, hi = (float(x) for x in torch.aminmax(computable(t.detach())))
    return max(abs(lo), abs(hi))


def _check_overflow(adapter: Adapter, amax: dict[str, float]) -> list[Finding]:
    """``update-overflow``: modules whose update ``scale * B @ A``, computed as PEFT computes it (float32), would hold
    inf though every factor is finite (:func:`overflowing_update`; the factors are loaded again only for a module
    whose bound ``r * max|A| * max|B| * |scale|`` reaches float32's range, which no trained adapter's does)."""
    out = []
    for m in adapter.modules.values():
        a_max, b_max = amax.get(m.A.name), amax.get(m.B.name)
        if a_max is None or b_max is None or not math.isfinite(m.scale):
            continue
        if abs(m.scale) * m.rank * a_max * b_max < F32_MAX:
            continue
        largest = overflowing_update(adapter.factors(m.name))
        if largest is not None:
            out.append(Finding("update-overflow", "error", overflow_message(m.name, largest), m.name))
    return out


def overflowing_update(f: LoraFactors) -> float | None:
    """The largest |element| of ``f``'s update ``scale * B @ A`` if it is beyond float32's range (where PEFT, which
    computes it in float32, gets inf), else None. Cheap unless ``r * max|A| * max|B| * |scale|`` reaches that range;
    then exact (float64, row blocks of B)."""
    a = f.A.detach().double().reshape(f.A.shape[0], -1)
    b = f.B.detach().double().reshape(f.B.shape[0], -1)
    if not a.numel() or not b.numel():
        return None
    scale = abs(float(f.scale))
    if scale * a.shape[0] * float(a.abs().max()) * float(b.abs().max()) < F32_MAX:
        return None
    largest = 0.0
    for i in range(0, b.shape[0], 256):
        block = float((b[i : i + 256] @ a).abs().max()) * scale
        largest = math.inf if math.isnan(block) else max(largest, block)  # (inf - inf: NaN, beyond any range)
    return largest if not largest < F32_MAX else None


def overflow_message(module: str, largest: float) -> str:
    """What ``update-overflow`` says."""
    return (
        f"module {module}: its update scale * B @ A reaches {largest:.3g}, beyond float32's range: PEFT would compute "
        "inf (the factors are finite, but too large for each other or for this scale); the file is damaged or crafted"
    )
