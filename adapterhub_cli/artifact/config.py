"""The adapter configuration: PEFT's ``adapter_config.json`` fields, and how PEFT resolves them per module."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.errors import InvalidAdapterError


#: Every key peft 0.21's LoraConfig writes. A key outside this set was probably written by a newer PEFT:
#: it is kept, reported as a warning, and otherwise ignored.
KNOWN_CONFIG_KEYS = frozenset(
    {
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
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


def pattern_key(pattern_keys: list[str], module: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, as PEFT matches it.

    PEFT (``peft.utils.other.get_pattern_key``) treats each key as a regex that must match a suffix of the
    module name at a ``.`` boundary: ``"v_proj"`` matches ``"model.layers.0.self_attn.v_proj"``.
    """
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if module == key or module.endswith("." + key):
                return key
    return None


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

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, path: str | Path | None = None) -> AdapterConfig:
        """Build from a parsed ``adapter_config.json``; wrong types raise :class:`InvalidAdapterError`."""

        def bad(msg: str) -> InvalidAdapterError:
            return InvalidAdapterError(
                f"adapter_config.json: {msg}", path=path, hint="fix the config, or re-save the adapter with PEFT"
            )

        peft_type = str(doc.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            raise bad(f"peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) are supported")
        r = doc.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise bad(f"r must be a positive integer, got {r!r}")
        alpha = doc.get("lora_alpha", 8)
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise bad(f"lora_alpha must be a number, got {alpha!r}")
        rank_pattern = doc.get("rank_pattern") or {}
        alpha_pattern = doc.get("alpha_pattern") or {}
        if not isinstance(rank_pattern, dict) or not all(isinstance(v, int) and v > 0 for v in rank_pattern.values()):
            raise bad(f"rank_pattern must map module patterns to positive ranks, got {rank_pattern!r}")
        if not isinstance(alpha_pattern, dict) or not all(isinstance(v, int | float) for v in alpha_pattern.values()):
            raise bad(f"alpha_pattern must map module patterns to numbers, got {alpha_pattern!r}")
        targets = doc.get("target_modules")
        if targets is not None and not isinstance(targets, str | list):
            raise bad(f"target_modules must be a list or a regex string, got {targets!r}")
        mts = doc.get("modules_to_save")
        if mts is not None and not isinstance(mts, list):
            raise bad(f"modules_to_save must be a list, got {mts!r}")
        return cls(
            r=r,
            lora_alpha=alpha,
            peft_type=peft_type,
            target_modules=sorted(set(targets)) if isinstance(targets, list) else targets,
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
            use_rslora=bool(doc.get("use_rslora", False)),
            use_dora=bool(doc.get("use_dora", False)),
            fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
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
        )

    @property
    def scale_rule(self) -> str:
        """``"alpha/sqrt(r)"`` with rsLoRA, else ``"alpha/r"``."""
        return "alpha/sqrt(r)" if self.use_rslora else "alpha/r"

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (its rank_pattern entry, else ``r``)."""
        key = pattern_key(list(self.rank_pattern), module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (its alpha_pattern entry, else ``lora_alpha``)."""
        key = pattern_key(list(self.alpha_pattern), module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str, rank: int | None = None) -> float:
        """PEFT's scaling for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = rank if rank is not None else self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT's target rule (``target_modules``, ``exclude_modules``) selects ``module``."""
        return _matches(self.target_modules, module) and not _matches(self.exclude_modules, module)


def _matches(rule: list[str] | str | None, module: str) -> bool:
    if rule is None:
        return False
    if isinstance(rule, str):
        if rule == "all-linear":
            return True  # PEFT expands it on save; a hand-written config may still hold it
        return re.fullmatch(rule, module) is not None
    return any(module == t or module.endswith("." + t) for t in rule)
