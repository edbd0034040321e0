"""The adapter configuration: PEFT's ``adapter_config.json`` fields, checked by type, and how PEFT resolves them
per module.

Every field PEFT's ``LoraConfig`` declares is checked against PEFT's declared type when the config is read; a
wrong type is :class:`InvalidAdapterError` naming the field. The values that scale an update (``lora_alpha``,
``alpha_pattern`` values, ``r`` and ``rank_pattern`` values) are kept as read even when not finite or out of
range, so that ``validate`` can report them (:func:`adapterhub_cli.artifact.validate.check_config`) and every
writing command refuses them before it writes. Regular expressions (a string ``target_modules`` or
``exclude_modules``, ``rank_pattern`` / ``alpha_pattern`` keys) are compiled when the config is read and run in
linear time (:mod:`adapterhub_cli.artifact.patterns`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from adapterhub_cli.artifact.patterns import PatternError, SafePattern, compile_pattern
from adapterhub_cli.errors import InvalidAdapterError


#: Every key peft 0.21's LoraConfig writes. A key outside this set was probably written by a newer PEFT:
#: it is kept, reported as a warning, and otherwise ignored.
KNOWN_CONFIG_KEYS = frozenset(
    {
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "astra_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
        # written by older PEFT releases
        "enable_lora",
        "merge_weights",
        "use_original_init",
    }
)

T = TypeVar("T")

#: The largest rank (``r``, ``rank_pattern`` values) taken as meant; larger ones are reported as out of range.
MAX_RANK = 1 << 20
#: The largest ``|lora_alpha|`` (and ``alpha_pattern`` value) taken as meant; larger ones are reported.
MAX_ALPHA = 1e6


# ------------------------------------------------------------------------------------------------ field types


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_dict(v: object) -> bool:
    return isinstance(v, dict)


def _list_of(p: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: isinstance(v, list) and all(p(x) for x in v)


def _either(*ps: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: any(p(v) for p in ps)


def _optional(p: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or p(v)


def _pair_of_ints(v: object) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)


_STRINGS = _list_of(_is_str)
_INTS = _list_of(_is_int)

#: PEFT's declared type of each LoraConfig field (peft 0.21), as (check, what the message asks for).
#: ``r``, ``rank_pattern`` and ``alpha_pattern`` are checked entry by entry in :meth:`AdapterConfig.from_dict`.
FIELD_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "task_type": (_optional(_is_str), "a string or null"),
    "peft_type": (_optional(_is_str), "a string or null"),
    "auto_mapping": (_optional(_is_dict), "an object or null"),
    "peft_version": (_optional(_is_str), "a string or null"),
    "base_model_name_or_path": (_optional(_is_str), "a string or null"),
    "revision": (_optional(_is_str), "a string or null"),
    "inference_mode": (_is_bool, "true or false"),
    "target_modules": (_optional(_either(_STRINGS, _is_str)), "a list of module names, a regex string, or null"),
    "exclude_modules": (_optional(_either(_STRINGS, _is_str)), "a list of module names, a regex string, or null"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (_is_number, "a number"),
    "fan_in_fan_out": (_is_bool, "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
    "use_rslora": (_is_bool, "true or false"),
    "modules_to_save": (_optional(_STRINGS), "a list of module names or null"),
    "init_lora_weights": (_either(_is_bool, _is_str), "true, false or the name of an initialisation"),
    "layers_to_transform": (_optional(_either(_INTS, _is_int)), "a layer index, a list of them, or null"),
    "layers_pattern": (_optional(_either(_STRINGS, _is_str)), "a string, a list of strings, or null"),
    "megatron_config": (_optional(_is_dict), "an object or null"),
    "megatron_core": (_optional(_is_str), "a string or null"),
    "trainable_token_indices": (
        _optional(_either(_INTS, lambda v: isinstance(v, dict) and all(_INTS(x) for x in v.values()))),
        "a list of token ids, an object mapping module names to them, or null",
    ),
    "loftq_config": (_optional(_is_dict), "an object or null"),
    "eva_config": (_optional(_is_dict), "an object or null"),
    "corda_config": (_optional(_is_dict), "an object or null"),
    "astra_config": (_optional(_is_dict), "an object or null"),
    "lora_ga_config": (_optional(_is_dict), "an object or null"),
    "use_dora": (_is_bool, "true or false"),
    "velora_config": (_optional(_is_dict), "an object or null"),
    "alora_invocation_tokens": (_optional(_INTS), "a list of token ids or null"),
    "use_qalora": (_is_bool, "true or false"),
    "qalora_group_size": (_is_int, "an integer"),
    "monteclora_config": (_optional(_is_dict), "an object or null"),
    "layer_replication": (_optional(_list_of(_pair_of_ints)), "a list of [start, end] pairs or null"),
    "lora_bias": (_is_bool, "true or false"),
    "target_parameters": (_optional(_STRINGS), "a list of parameter names or null"),
    "use_bdlora": (_optional(_is_dict), "an object or null"),
    "arrow_config": (_optional(_is_dict), "an object or null"),
    "kasa_config": (_optional(_is_dict), "an object or null"),
    "ensure_weight_tying": (_is_bool, "true or false"),
}


def _show(value: object, limit: int = 60) -> str:
    """A short, printable rendering of a config value for a message (repr escapes control characters)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite_or_inf(v: int | float) -> int | float:
    """``v``, or an infinity of its sign when it is an integer too large for a float (so scales can be computed)."""
    if isinstance(v, int) and abs(v) > sys.float_info.max:
        return math.inf if v > 0 else -math.inf
    return v


# ---------------------------------------------------------------------------------------------- pattern rules


def _key_pattern(key: str) -> SafePattern:
    """The pattern PEFT builds from a ``rank_pattern`` / ``alpha_pattern`` key (``peft.utils.other.get_pattern_key``:
    ``re.match(rf"(.*\\.)?({key})$", module)``)."""
    return compile_pattern(rf"(.*\.)?({key})$")


def pattern_key(pattern_keys: list[str], module: str) -> str | None:
    """The key of ``rank_pattern`` / ``alpha_pattern`` that applies to ``module``, as PEFT chooses it.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first key that, as a regex, matches a suffix of the
    module name at a ``.`` boundary (``"v_proj"`` matches ``"model.layers.0.self_attn.v_proj"``); when none
    does, it looks the module name up as a key itself.

    Raises:
        PatternError: a key that cannot be matched safely (see :func:`compile_pattern`).
    """
    for key in pattern_keys:
        if _key_pattern(key).match(module):
            return key
    return module if module in pattern_keys else None


def _matches(rule: list[str] | str | None, module: str) -> bool:
    """PEFT's target rule (``check_target_module_exists``): a string is a regex the whole name must match, a
    list holds names the module name equals or ends with (after a ``.``)."""
    if rule is None:
        return False
    if isinstance(rule, str):
        if rule == "all-linear":
            return True  # PEFT expands it on save; a hand-written config may still hold it
        return compile_pattern(rule).fullmatch(module)
    return any(module == t or module.endswith("." + t) for t in rule)


def _saved_module(saved: list[str] | None, module: str) -> bool:
    r"""PEFT never puts a LoRA on a ``modules_to_save`` module or inside one (``re.match(rf"(^|.*\.){m}($|\..*)",
    key)``, with the name taken literally)."""
    return any(
        module == m or module.startswith(m + ".") or module.endswith("." + m) or f".{m}." in module
        for m in saved or []
    )


def _is_index(segment: str) -> bool:
    return segment.isascii() and segment.isdigit()


def layer_index(module: str, layers_pattern: list[str] | str | None) -> int | None:
    r"""The layer index PEFT reads from ``module`` for ``layers_to_transform`` (``check_target_module_exists``).

    Without ``layers_pattern``: the first all-digit segment with at least two segments before it and one after
    (``re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)``). With it: the first all-digit segment right after a run
    of segments one of the patterns matches, followed by another segment (``(?:^|.*?\.){pattern}\.(\d+)\.``).

    Raises:
        PatternError: a layers_pattern that cannot be matched safely.
    """
    parts = module.split(".")
    if not layers_pattern:
        for j in range(2, len(parts) - 1):
            if _is_index(parts[j]):
                return int(parts[j])
        return None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        compiled = compile_pattern(pattern)
        for j in range(1, len(parts) - 1):  # PEFT's lazy prefix: the earliest index wins
            if _is_index(parts[j]) and any(compiled.fullmatch(".".join(parts[i:j])) for i in range(j)):
                return int(parts[j])
    return None


# ------------------------------------------------------------------------------------------------ the config


@dataclass
class AdapterConfig:
    """The fields of a PEFT LoRA ``adapter_config.json`` that this tool uses; ``raw`` keeps every key."""

    r: int
    lora_alpha: float
    peft_type: str = "LORA"
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    bias: str = "none"
    layers_to_transform: list[int] | int | None = None
    exclude_modules: list[str] | str | None = None
    peft_version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    #: the file the config was read from, named by errors raised while matching patterns
    path: Path | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, path: str | Path | None = None) -> AdapterConfig:
        """Build from a parsed ``adapter_config.json``.

        Raises:
            InvalidAdapterError: a field of the wrong type (the message names it), a rank that is not a positive
                integer, a pattern that is invalid or cannot be matched in linear time, a combination PEFT refuses.
        """
        _check_types(doc, path)
        peft_type = check_peft_type({"peft_type": "LORA", **{k: v for k, v in doc.items() if v is not None}}, path)
        targets = doc.get("target_modules")
        mts = doc.get("modules_to_save")
        config = cls(
            r=doc.get("r", 8),
            lora_alpha=_finite_or_inf(doc.get("lora_alpha", 8)),
            peft_type=peft_type,
            target_modules=sorted(set(targets)) if isinstance(targets, list) else targets,
            rank_pattern=dict(doc.get("rank_pattern") or {}),
            alpha_pattern={k: _finite_or_inf(v) for k, v in (doc.get("alpha_pattern") or {}).items()},
            use_rslora=doc.get("use_rslora", False),
            use_dora=doc.get("use_dora", False),
            fan_in_fan_out=doc.get("fan_in_fan_out", False),
            modules_to_save=list(dict.fromkeys(mts)) if mts else None,
            base_model_name_or_path=doc.get("base_model_name_or_path"),
            revision=doc.get("revision"),
            task_type=doc.get("task_type"),
            bias=str(doc.get("bias") or "none"),
            layers_to_transform=doc.get("layers_to_transform"),
            exclude_modules=doc.get("exclude_modules"),
            peft_version=doc.get("peft_version"),
            raw=dict(doc),
            unknown_keys=sorted(k for k in doc if k not in KNOWN_CONFIG_KEYS),
            path=Path(path) if path is not None else None,
        )
        config._compile_patterns()
        return config

    def _compile_patterns(self) -> None:
        """Compile every regular expression of the config once, so a bad one is refused when the config is read."""
        for name in ("target_modules", "exclude_modules"):
            rule = getattr(self, name)
            if isinstance(rule, str) and rule != "all-linear":
                self._compiled(name, compile_pattern, rule)
        for name, keys in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in keys:
                self._compiled(f"{name} key {key!r}", _key_pattern, key)

    def _compiled(self, what: str, run: Callable[..., T], *args: Any) -> T:
        """``run(*args)``, with a :class:`PatternError` raised as :class:`InvalidAdapterError` naming ``what``."""
        try:
            return run(*args)
        except PatternError as e:
            raise _bad(f"{what}: {e}", self.path, hint="fix the pattern in adapter_config.json") from None

    @property
    def lora_bias(self) -> bool:
        """``lora_bias=True``: PEFT's lora_B has a bias (saved as ``lora_B.bias``)."""
        return bool(self.raw.get("lora_bias"))

    @property
    def alora_invocation_tokens(self) -> list[int] | None:
        """aLoRA's invocation tokens: the adapter acts only after them, so it cannot be merged (PEFT refuses)."""
        tokens = self.raw.get("alora_invocation_tokens")
        return list(tokens) if tokens is not None else None

    @property
    def layer_replication(self) -> list[list[int]] | None:
        """PEFT's ``layer_replication``: ``[[start, end), ...]`` ranges of base layers stacked into the adapted
        model (``peft.tuners.tuners_utils.replicate_layers``); None without it."""
        ranges = self.raw.get("layer_replication")
        return [list(r) for r in ranges] if ranges else None

    def base_module(self, module: str) -> str:
        """The base module whose weights ``module`` of the adapted model uses: with ``layer_replication``, layer
        ``i`` of the stacked model is base layer ``[k for s, e in ranges for k in range(s, e)][i]`` (PEFT clones
        each layer sharing its weights); without it, ``module`` itself."""
        ranges = self.layer_replication
        if not ranges:
            return module
        stacked = [k for start, end in ranges for k in range(start, end)]
        parts = module.split(".")
        for j in range(1, len(parts) - 1):  # the first layer index, as PEFT finds the layer list
            if _is_index(parts[j]):
                i = int(parts[j])
                if i < len(stacked):
                    parts[j] = str(stacked[i])
                return ".".join(parts)
        return module

    @property
    def scale_rule(self) -> str:
        """``"alpha/sqrt(r)"`` with rsLoRA, else ``"alpha/r"``."""
        return "alpha/sqrt(r)" if self.use_rslora else "alpha/r"

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (its rank_pattern entry, else ``r``)."""
        key = self._compiled("rank_pattern", pattern_key, list(self.rank_pattern), module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (its alpha_pattern entry, else ``lora_alpha``)."""
        key = self._compiled("alpha_pattern", pattern_key, list(self.alpha_pattern), module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str, rank: int | None = None) -> float:
        """PEFT's scaling for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA.

        NaN when the rank is beyond :data:`MAX_RANK` (``validate`` reports it; writers refuse it).
        """
        r = rank if rank is not None else self.rank_for(module)
        if r > MAX_RANK:
            return math.nan
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT's target rule selects ``module`` (``peft.tuners.tuners_utils.check_target_module_exists``):
        not excluded (``exclude_modules``), not a ``modules_to_save`` module, matched by ``target_modules``, and,
        for a list matched by suffix, in ``layers_to_transform`` (the index read with ``layers_pattern``)."""
        return self._compiled("target_modules", self._targets, module)

    def excluded_by(self, module: str) -> str | None:
        """Which of PEFT's exclusions drops ``module`` although ``target_modules`` names it: ``"exclude_modules"``,
        ``"modules_to_save"`` (``check_target_module_exists`` returns ``_ExcludedModule`` for a module inside a
        ``modules_to_save`` one, before looking at ``target_modules``), or None."""
        if _matches(self.exclude_modules, module):
            why = "exclude_modules"
        elif _saved_module(self.modules_to_save, module):
            why = "modules_to_save"
        else:
            return None
        rule = self.target_modules
        named = module in rule if isinstance(rule, list) and module in rule else _matches(rule, module)
        return why if named else None

    def _targets(self, module: str) -> bool:
        if _matches(self.exclude_modules, module) or _saved_module(self.modules_to_save, module):
            return False
        rule = self.target_modules
        if not isinstance(rule, list):
            return _matches(rule, module)
        if module in rule:
            return True  # PEFT takes a name listed whole without looking at layers_to_transform
        if not _matches(rule, module):
            return False
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        index = layer_index(module, self.raw.get("layers_pattern"))
        if index is None:
            return False
        return index == wanted if isinstance(wanted, int) else index in wanted


#: PEFT's non-LoRA methods (``peft.utils.peft_types.PeftType``, peft 0.21) by the name a message gives them.
PROMPT_LEARNING_TYPES = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE"}
)
OTHER_PEFT_TYPES: dict[str, str] = {
    "PROMPT_TUNING": "prompt tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "P_TUNING": "P-tuning",
    "PREFIX_TUNING": "prefix tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "CPT": "context-aware prompt tuning (CPT)",
    "CARTRIDGE": "cartridges (prefix tuning)",
    "ADALORA": "AdaLoRA (SVD-parameterised LoRA, lora_E)",
    "IA3": "IA3 (learned rescaling vectors)",
    "LOHA": "LoHa (Hadamard-product LoRA)",
    "LOKR": "LoKr (Kronecker-product LoRA)",
    "XLORA": "X-LoRA (a mixture of LoRA experts)",
    "VERA": "VeRA (shared random projections)",
    "BOFT": "BOFT (butterfly orthogonal fine-tuning)",
    "OFT": "OFT (orthogonal fine-tuning)",
    "POLY": "Poly (a mixture of LoRA skills)",
    "LN_TUNING": "LayerNorm tuning",
    "TRAINABLE_TOKENS": "trainable tokens",
}


def check_peft_type(doc: dict[str, Any], path: str | Path | None) -> str:
    """``"LORA"``, or :class:`InvalidAdapterError` for a config PEFT would not load as a LoRA.

    PEFT reads ``peft_type`` to choose the config class (``PeftConfig._get_peft_type``): a config file without it
    does not load at all (``KeyError: 'peft_type'``), and any other type is another method, refused here by name.
    Readers of ``adapter_config.json`` files call this; :meth:`AdapterConfig.from_dict` takes a missing type as
    LoRA (a config built in code).
    """
    if "peft_type" not in doc or doc["peft_type"] is None:
        raise _bad(
            "has no peft_type: PEFT cannot load it (PeftConfig._get_peft_type raises KeyError 'peft_type')",
            path,
            hint='add "peft_type": "LORA" if the adapter is a LoRA',
        )
    value = doc["peft_type"]
    if not isinstance(value, str):
        raise _bad(f"peft_type must be {FIELD_TYPES['peft_type'][1]}, got {_show(value)}", path)
    peft_type = value.upper()
    if peft_type == "LORA":
        return peft_type
    what = OTHER_PEFT_TYPES.get(peft_type)
    if what is None:
        raise _bad(
            f"peft_type is {value!r}, not a PEFT method this tool knows; only LoRA adapters (peft_type LORA) "
            "are supported",
            path,
        )
    why = (
        "it trains virtual tokens, not weight updates: there is nothing to merge, reduce or combine"
        if peft_type in PROMPT_LEARNING_TYPES
        else "its weights are not LoRA's A and B factors"
    )
    raise _bad(
        f"peft_type is {value!r}: {what}, not LoRA ({why}); only LoRA adapters (peft_type LORA) are supported",
        path,
        hint="load it with PEFT itself (PeftModel.from_pretrained)",
    )


def _bad(message: str, path: str | Path | None, hint: str | None = None) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter_config.json: {message}",
        path=path,
        hint=hint or "fix the config, or re-save the adapter with PEFT",
    )


def _check_types(doc: dict[str, Any], path: str | Path | None) -> None:
    """Check every field against PEFT's declared type, and the combinations PEFT's LoraConfig refuses."""
    for name, (ok, wanted) in FIELD_TYPES.items():
        if name in doc and not ok(doc[name]):
            raise _bad(f"{name} must be {wanted}, got {_show(doc[name])}", path)
    r = doc.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise _bad(f"r must be a positive integer, got {_show(r)}", path)
    for name, ok, wanted in (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer (a rank)"),
        ("alpha_pattern", _is_number, "a number (an alpha)"),
    ):
        entries = doc.get(name)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise _bad(f"{name} must be an object mapping module patterns to values, got {_show(entries)}", path)
        for key, value in entries.items():
            if not ok(value):
                raise _bad(f"{name}[{key!r}] must be {wanted}, got {_show(value)}", path)
    # what peft.LoraConfig.__post_init__ refuses
    if isinstance(doc.get("target_modules"), str):
        for name in ("layers_to_transform", "layers_pattern"):
            if doc.get(name) is not None:
                raise _bad(f"{name} cannot be used when target_modules is a regex string (PEFT refuses it)", path)
    bd = doc.get("use_bdlora")
    if bd is not None:
        raise _bad(
            f"use_bdlora is set: this is a BD-LoRA adapter (block-diagonal LoRA, {bd.get('nblocks', '?')} blocks), "
            "whose lora_A or lora_B stores only the diagonal blocks; BD-LoRA is not supported",
            path,
            hint="load it with PEFT itself, or serve it with an engine that supports BD-LoRA",
        )
    enable = doc.get("enable_lora")
    if isinstance(enable, list) and not all(enable):
        raise _bad(
            f"enable_lora is {_show(enable)}: a LoRA on only some parts of a fused layer (PEFT < 0.4's "
            "MergedLinear); today's PEFT ignores this key and cannot load such factors, and neither can this tool",
            path,
            hint="re-train or re-save the adapter with a current PEFT",
        )
    if doc.get("lora_bias") and doc.get("use_dora"):
        raise _bad("lora_bias=True is not supported for DoRA (PEFT refuses use_dora with lora_bias)", path)
    if doc.get("layers_pattern") and doc.get("layers_to_transform") is None:
        raise _bad("layers_pattern needs layers_to_transform (PEFT refuses it without)", path)
