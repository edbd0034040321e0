"""Trust: configs are checked by type, patterns cannot hang, odd files get clean errors, and non-finite or
out-of-range scales never reach an output.

- Patterns: ``rank_pattern`` / ``alpha_pattern`` keys and a string ``target_modules`` / ``exclude_modules`` select
  the same modules PEFT selects (``get_pattern_key``, ``check_target_module_exists``) on a real model's module
  names; Hypothesis compares the linear-time engine with Python's ``re`` on generated patterns; a
  catastrophic-backtracking pattern on a long name finishes at once; what RE2 cannot run is refused.
- A table of bad configs and odd files, each through the API (the exact error type, the file and field named)
  and the CLI (exit 2, one line, no traceback, nothing written, the input unchanged).
- Scales: NaN, infinite or out-of-range ``lora_alpha`` / ``alpha_pattern`` / ranks are ``validate`` errors with
  codes, and every writing command refuses them before it writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli as cli
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.artifact.config import AdapterConfig
from adapterhub_cli.artifact.patterns import PatternError, compile_pattern
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.errors import CorruptFileError, IncompatibleBaseError, InvalidAdapterError


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------------------------------------- helpers


def cli_error(result: Result, exit_code: int = 2) -> str:
    """Check the CLI failed cleanly (status, one ``Error:`` line, no traceback); return the message, unwrapped."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err
    assert err.startswith("Error: "), err
    assert sum("Error:" in line for line in err.splitlines()) == 1, err
    body = err.split("\n  hint:")[0].split("\n  (set ADAPTERS_DEBUG")[0]
    return " ".join(body.removeprefix("Error: ").split())


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write_config(folder: Path, text: str) -> None:
    (folder / CONFIG).write_text(text)


def set_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def st_bytes(header: dict | str, data: bytes = b"") -> bytes:
    """A safetensors file from a header (a dict, or its JSON text as written) and the data section."""
    js = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(js)) + js + data


@pytest.fixture(scope="session")
def llama_module_names(llama_base: Path) -> list[str]:
    """Every module name of the tiny Llama, as PEFT sees them (``named_modules`` of the base model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base)
    return [name for name, _ in model.named_modules() if name]


# --------------------------------------------------------------------------------- patterns match as PEFT's

PATTERN_KEY_SETS = [
    ["v_proj"],
    ["q_proj", "v_proj"],
    ["model.layers.1.self_attn.q_proj", "q_proj"],
    ["layers.1.self_attn.q_proj"],
    [r"layers\.\d+\.mlp\..*"],
    ["self_attn"],
    ["proj"],
    [".*_proj"],
    ["(q|v)_proj"],
    ["q_proj$"],
    ["^model.layers.0.self_attn.q_proj"],
    ["Q_PROJ"],
    ["a)|(.*v_proj"],  # breaks out of PEFT's group: the template's meaning changes, and must change the same way
    ["layers.1", "mlp.up_proj", "up_proj"],
    [r"\w+_proj"],
    ["[^.]+_proj"],
    ["layers.[01].self_attn.k_proj"],
    ["model.layers.0.mlp.down_proj", ".*down_proj"],
]


@pytest.mark.parametrize("keys", PATTERN_KEY_SETS, ids=lambda k: "|".join(k))
def test_pattern_keys_resolve_as_peft_resolves_them(keys: list[str], llama_module_names: list[str]) -> None:
    rank_pattern = {k: i + 2 for i, k in enumerate(keys)}
    alpha_pattern = {k: 10.0 * (i + 1) for i, k in enumerate(keys)}
    cfg = AdapterConfig.from_dict(
        {"r": 8, "lora_alpha": 16, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    )
    for name in llama_module_names:
        peft_key = get_pattern_key(list(rank_pattern), name)  # what peft's LoraModel._create_and_replace does
        assert cfg.rank_for(name) == rank_pattern.get(peft_key, 8), name
        assert cfg.alpha_for(name) == alpha_pattern.get(peft_key, 16), name


TARGET_RULES = [
    (r".*\.(q|v)_proj", None),
    (r"model\.layers\.1\..*", None),
    (r".*mlp.*", r".*up_proj"),
    (r"^(?!.*layers\.0).*\.(q_proj|v_proj)$", None),  # the lookahead configs in the wild use for vision towers
    (r"^(?!.*mlp)(?!.*layers\.1\.).*_proj$", None),
    (r"(?i).*Q_PROJ", None),
    (r".*_proj", ["v_proj", "model.layers.0.mlp.up_proj"]),
    ("model.layers.0.self_attn.q_proj", None),  # a string is matched whole: "q_proj" would select nothing
    (r".*\.layers\.\d+\.self_attn\.[qkv]_proj", r".*layers\.1.*"),
    (["q_proj", "v_proj", "mlp"], None),
    (["q_proj", "model.layers.1.mlp.down_proj"], ["model.layers.0.self_attn.q_proj"]),
    (["layers.0.self_attn.q_proj"], None),
]


@pytest.mark.parametrize(("targets", "exclude"), TARGET_RULES, ids=[str(i) for i in range(len(TARGET_RULES))])
def test_targets_select_what_peft_selects(targets: Any, exclude: Any, llama_module_names: list[str]) -> None:
    cfg = AdapterConfig.from_dict({"r": 8, "lora_alpha": 16, "target_modules": targets, "exclude_modules": exclude})
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, exclude_modules=exclude)
    selected = [n for n in llama_module_names if cfg.targets(n)]
    assert selected == [n for n in llama_module_names if check_target_module_exists(peft_cfg, n)]
    assert selected  # every rule selects something on this model


# A small regex grammar over a small alphabet, so that Python's backtracking re answers quickly.
_ATOMS = st.sampled_from(
    ["a", "b", "_", r"\.", ".", "é", "1", "٣", r"\d", r"\w", r"\s", r"\W", r"\D", r"\S", "[ab]", "[^a]", r"[\d_]",
     r"[^\w]", "[a-c]", r"\x41", "(?i:a)", "(?s:.)", "(?a:\\w)", "K"]
)  # fmt: skip
_QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "*?", "+?", "??", "{2}", "{1,2}", "{,2}", "{2,}"])


def _regex_strategy() -> st.SearchStrategy[str]:
    atom = st.builds(lambda a, q: a + q, _ATOMS, _QUANTIFIERS)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.builds(lambda x, y: x + y, inner, inner),
            st.builds(lambda x, y: f"(?:{x}|{y})", inner, inner),
            st.builds(lambda x, q: f"({x}){q}", inner, _QUANTIFIERS),
        )

    body = st.recursive(atom, extend, max_leaves=6)
    anchors = st.sampled_from(["", "^", r"\A", "(?i)", "(?!b)", "(?=a)", "^(?!.*_b)"])
    ends = st.sampled_from(["", "$", r"\Z"])
    return st.builds(lambda a, b, e: a + b + e, anchors, body, ends)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pattern=_regex_strategy(), names=st.lists(st.text(alphabet="ab_.é1٣ K\u212a\u00a0", max_size=8), max_size=6))
def test_patterns_mean_what_python_re_means(pattern: str, names: list[str]) -> None:
    """Module names without a trailing newline: there the engine and Python's ``re`` agree exactly."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError:
        return  # refused with a message (e.g. a lookahead after the start is impossible here by construction)
    for name in names:
        assert compiled.match(name) == (re.match(pattern, name) is not None), (pattern, name)
        assert compiled.fullmatch(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


def test_python_whitespace_is_the_engine_s() -> None:
    spaces = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
    others = "".join(chr(c) for c in range(0x3001) if not chr(c).isspace() and not 0xD800 <= c <= 0xDFFF)
    assert compile_pattern(r"\s+").fullmatch(spaces)
    assert compile_pattern(r"\S+").fullmatch(others)
    assert not any(compile_pattern(r"\s").match(c) for c in others)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "a backreference"),
        (r".*(?<=q)_proj", "lookbehind"),
        (r".*\.(?!v)\w+_proj", "not at the start"),
        (r"q_proj++", "possessive"),
        (r"(?>q)_proj", "atomic group"),
        (r"(q)?(?(1)_proj|x)", "conditional"),
        (r"a{1001}", "more than 1000 times"),
        (r"a{99999999999}", "invalid regular expression: the repetition number is too large"),
        (r"[[:alpha:]]+", "ambiguous"),
        (r"q_proj(", "invalid regular expression: missing )"),
        (r"[", "invalid regular expression"),
        (r"a{3,2}", "invalid regular expression"),
        ("(" * 3000 + ")" * 3000, "nests groups too deeply"),
        ("a" * 100_001, "at most 100000"),
    ],
)
def test_unrunnable_or_invalid_patterns_are_refused_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(PatternError, match=re.escape(reason)):
        compile_pattern(pattern)


@pytest.mark.parametrize("key", ["(?i)Q_PROJ", "(v_proj", "v_proj[", "a{3,2}"])
def test_keys_peft_cannot_compile_are_refused(key: str, llama_lora: Path, copy_adapter: Callable[..., Path]) -> None:
    """PEFT builds ``(.*\\.)?({key})$`` and Python's ``re`` rejects these (a global flag is no longer at the start)."""
    with pytest.raises(re.error):
        get_pattern_key([key], Q0)
    d = copy_adapter(llama_lora)
    set_config(d, rank_pattern={key: 8})
    with pytest.raises(
        InvalidAdapterError, match=f"rank_pattern key {re.escape(repr(key))}: invalid regular expression"
    ):
        ah.load(d)


def test_word_boundary_runs_on_ascii_names_and_refuses_others() -> None:
    p = compile_pattern(r".*\bq_proj")
    assert p.fullmatch("model.layers.0.self_attn.q_proj") and not p.fullmatch("model.xq_proj")
    with pytest.raises(PatternError, match="not ASCII"):
        p.fullmatch("modèle.q_proj")
    assert compile_pattern(r"(?a).*\bq").fullmatch("é.q")  # ASCII boundaries asked for: exact anywhere


def test_a_name_with_a_lone_surrogate_is_refused_not_crashed_on() -> None:
    """Header names cannot hold one (refused when read), but a legacy pickle's keys could."""
    with pytest.raises(PatternError, match=re.escape("the name 'x.q\\\\ud800' holds a lone surrogate")):
        compile_pattern(".*q.*").match("x.q\ud800")
    cfg = AdapterConfig.from_dict(
        {"r": 8, "target_modules": ".*q.*", "rank_pattern": {"q": 4}, "alpha_pattern": {"q": 2}}
    )
    for lookup in (cfg.targets, cfg.rank_for, cfg.alpha_for):
        with pytest.raises(InvalidAdapterError, match="holds a lone surrogate"):
            lookup("x.q\ud800")


CATASTROPHIC = "(a+)+$"


def _adapter_with_long_module(src: Path, copy: Callable[..., Path], name_len: int) -> tuple[Path, str]:
    """A copy of ``src`` with one more LoRA module whose name is ``a`` * name_len + ``!``."""
    d = copy(src)
    tensors = load_file(d / WEIGHTS)
    long_name = "a" * name_len + "!"
    tensors[f"{PREFIX}{long_name}.lora_A.weight"] = torch.zeros(8, 4)
    tensors[f"{PREFIX}{long_name}.lora_B.weight"] = torch.zeros(4, 8)
    save_file(tensors, d / WEIGHTS)
    return d, long_name


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"])
def test_catastrophic_pattern_on_a_long_name_finishes_at_once(
    field: str, llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    """``(a+)+$`` against 'aaaa...!' takes Python's ``re`` exponential time (2**30 steps at 30 letters); here, with
    a 100,000-letter module name, loading, inspecting and validating take well under a second each."""
    d, long_name = _adapter_with_long_module(llama_lora, copy_adapter, 100_000)
    value: Any = {"rank_pattern": {CATASTROPHIC: 8}, "alpha_pattern": {CATASTROPHIC: 4.0}}.get(field, CATASTROPHIC)
    set_config(d, **{field: value})
    start = time.monotonic()
    adapter = ah.load(d)
    assert long_name in adapter.modules
    report = ah.validate(d, base=llama_base)
    result = cli("validate", str(d), "--base", str(llama_base), "--json")
    assert result.exit_code == 1, result.output  # the long module is not in the base
    assert time.monotonic() - start < 20  # a hang, not a speed claim: Python's re would not finish in years
    assert "module-missing" in {f.code for f in report.findings}


# ------------------------------------------------------------------------------- the table of bad inputs


@dataclass
class Case:
    """A damaged copy of an adapter: what loading it must raise and say."""

    path: Path
    exc: type[Exception]
    file: Path  # the file the message must name
    parts: list[str]  # what the message must say


Maker = Callable[[Path, Callable[..., Path]], Case]


def _config_case(parts: list[str], **changes: Any) -> Maker:
    def make(src: Path, copy: Callable[..., Path]) -> Case:
        d = copy(src)
        set_config(d, **changes)
        return Case(d, InvalidAdapterError, d, parts)

    return make


def _config_text_case(text: str, exc: type[Exception], parts: list[str], *, config_named: bool = True) -> Maker:
    def make(src: Path, copy: Callable[..., Path]) -> Case:
        d = copy(src)
        write_config(d, text)
        return Case(d, exc, d / CONFIG if config_named else d, parts)

    return make


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _weights_case(header: dict | str, data: bytes, parts: list[str]) -> Maker:
    def make(src: Path, copy: Callable[..., Path]) -> Case:
        d = copy(src)
        (d / WEIGHTS).write_bytes(st_bytes(header, data))
        return Case(d, CorruptFileError, d / WEIGHTS, parts)

    return make


def _tensors_case(edit: Callable[[dict[str, torch.Tensor]], None], parts: list[str]) -> Maker:
    def make(src: Path, copy: Callable[..., Path]) -> Case:
        d = copy(src)
        tensors = load_file(d / WEIGHTS)
        edit(tensors)
        save_file(tensors, d / WEIGHTS)
        return Case(d, InvalidAdapterError, d, parts)

    return make


def _entry(dtype: Any = "F32", shape: Any = (8, 64), offsets: Any = (0, 2048)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


_A0, _B0 = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def _rank_zero(t: dict[str, torch.Tensor]) -> None:
    t[_A0], t[_B0] = torch.zeros(0, 64), torch.zeros(64, 0)


CASES: dict[str, Maker] = {
    # field types, as PEFT's LoraConfig declares them
    "target_modules-int": _config_case(
        ["target_modules must be a list of module names, a regex string", "got 42"], target_modules=42
    ),
    "target_modules-mixed-list": _config_case(
        ["target_modules must be", "got ['q_proj', 3]"], target_modules=["q_proj", 3]
    ),
    "modules_to_save-str": _config_case(
        ["modules_to_save must be a list of module names or null, got 'lm_head'"], modules_to_save="lm_head"
    ),
    "exclude_modules-object": _config_case(
        ["exclude_modules must be a list of module names, a regex string"], exclude_modules={"a": 1}
    ),
    "layers_to_transform-str": _config_case(
        ["layers_to_transform must be a layer index, a list of them, or null, got '0'"], layers_to_transform="0"
    ),
    "layers_to_transform-bool-in-list": _config_case(
        ["layers_to_transform must be", "got [0, True]"], layers_to_transform=[0, True]
    ),
    "layers_pattern-int": _config_case(
        ["layers_pattern must be a string, a list of strings, or null, got 3"],
        layers_pattern=3,
        layers_to_transform=[0],
    ),
    "base_model-int": _config_case(
        ["base_model_name_or_path must be a string or null, got 5"], base_model_name_or_path=5
    ),
    "revision-list": _config_case(["revision must be a string or null, got ['main']"], revision=["main"]),
    "r-string": _config_case(["r must be a positive integer, got '8'"], r="8"),
    "r-bool": _config_case(["r must be a positive integer, got True"], r=True),
    "r-float": _config_case(["r must be a positive integer, got 8.0"], r=8.0),
    "r-zero": _config_case(["r must be a positive integer, got 0"], r=0),
    "lora_alpha-string": _config_case(["lora_alpha must be a number, got '16'"], lora_alpha="16"),
    "lora_alpha-bool": _config_case(["lora_alpha must be a number, got True"], lora_alpha=True),
    "lora_alpha-null": _config_case(["lora_alpha must be a number, got None"], lora_alpha=None),
    "rank_pattern-list": _config_case(
        ["rank_pattern must be an object mapping module patterns to values, got [4]"], rank_pattern=[4]
    ),
    "rank_pattern-zero": _config_case(
        ["rank_pattern['q_proj'] must be a positive integer (a rank), got 0"], rank_pattern={"q_proj": 0}
    ),
    "rank_pattern-float": _config_case(
        ["rank_pattern['q_proj'] must be a positive integer (a rank), got 8.0"], rank_pattern={"q_proj": 8.0}
    ),
    "rank_pattern-bool": _config_case(
        ["rank_pattern['q_proj'] must be a positive integer (a rank), got True"], rank_pattern={"q_proj": True}
    ),
    "alpha_pattern-string": _config_case(
        ["alpha_pattern['q_proj'] must be a number (an alpha), got '32'"], alpha_pattern={"q_proj": "32"}
    ),
    "use_rslora-string": _config_case(["use_rslora must be true or false, got 'yes'"], use_rslora="yes"),
    "use_dora-int": _config_case(["use_dora must be true or false, got 1"], use_dora=1),
    "fan_in_fan_out-null": _config_case(["fan_in_fan_out must be true or false, got None"], fan_in_fan_out=None),
    "peft_type-int": _config_case(["peft_type must be a string or null, got 3"], peft_type=3),
    "task_type-list": _config_case(["task_type must be a string or null, got ['CAUSAL_LM']"], task_type=["CAUSAL_LM"]),
    "bias-unknown": _config_case(['bias must be "none", "all" or "lora_only", got \'some\''], bias="some"),
    "lora_dropout-string": _config_case(["lora_dropout must be a number, got '0.1'"], lora_dropout="0.1"),
    "layer_replication-bad": _config_case(
        ["layer_replication must be a list of [start, end] pairs or null"], layer_replication=[[0]]
    ),
    # combinations peft.LoraConfig refuses
    "regex-targets-with-layers": _config_case(
        ["layers_to_transform cannot be used when target_modules is a regex string"],
        target_modules=".*q_proj",
        layers_to_transform=[0],
    ),
    "layers_pattern-alone": _config_case(["layers_pattern needs layers_to_transform"], layers_pattern="layers"),
    # patterns: invalid, or not runnable in linear time
    "target_modules-invalid-regex": _config_case(
        ["target_modules: invalid regular expression: missing ), unterminated subpattern"], target_modules=".*(q_proj"
    ),
    "exclude_modules-invalid-regex": _config_case(
        ["exclude_modules: invalid regular expression"], exclude_modules="["
    ),
    "rank_pattern-invalid-key": _config_case(
        ["rank_pattern key '(v_proj': invalid regular expression"], rank_pattern={"(v_proj": 4}
    ),
    "alpha_pattern-backreference": _config_case(
        ["alpha_pattern key '(a)\\\\1': the pattern uses a backreference, which cannot be matched in linear time"],
        alpha_pattern={"(a)\\1": 4},
    ),
    "target_modules-lookbehind": _config_case(
        ["target_modules: the pattern uses a lookahead or lookbehind that is not at the start"],
        target_modules=".*(?<=q)_proj",
    ),
    "exclude_modules-huge-repeat": _config_case(
        ["exclude_modules: invalid regular expression: the repetition number is too large"],
        exclude_modules="a{99999999999}",
    ),
    "rank_pattern-huge-repeat": _config_case(
        ["rank_pattern key 'q{99999999999}': invalid regular expression: the repetition number is too large"],
        rank_pattern={"q{99999999999}": 2},
    ),
    "header-dtype-list": _weights_case(
        {_A0: _entry(dtype=["F32"], shape=[1], offsets=[0, 4])}, bytes(4), [f"tensor {_A0!r}: unknown dtype ['F32']"]
    ),
    "header-dtype-object": _weights_case(
        {_A0: _entry(dtype={"F": 32}, shape=[1], offsets=[0, 4])},
        bytes(4),
        [f"tensor {_A0!r}: unknown dtype {{'F': 32}}"],
    ),
    "exclude_modules-possessive": _config_case(
        ["exclude_modules: the pattern uses a possessive repeat"], exclude_modules="v_proj++"
    ),
    # odd JSON
    "config-nested-too-deep-for-python": _config_text_case(
        '{"r": 8, "auto_mapping": ' + _deep(100_000) + "}",
        CorruptFileError,
        [f"{CONFIG} nests JSON arrays or objects too deeply"],
    ),
    "config-nested-deeper-than-64": _config_text_case(
        '{"r": 8, "x": ' + _deep(100) + "}", CorruptFileError, [f"{CONFIG} nests JSON more than 64 levels deep"]
    ),
    "config-number-of-5000-digits": _config_text_case(
        '{"r": 1' + "0" * 5000 + "}",
        CorruptFileError,
        [f"{CONFIG} holds a number that is too long (over 4300 digits)"],
    ),
    "config-lone-surrogate": _config_text_case(
        '{"r": 8, "target_modules": ["q_proj\\ud800"]}',
        CorruptFileError,
        [f"{CONFIG} holds a string with a lone surrogate (\\ud800)", "q_proj\\ud800"],
    ),
    # odd safetensors headers
    "header-nested-too-deep": _weights_case(
        '{"a": ' + _deep(100_000) + "}", b"", ["header nests JSON arrays or objects too deeply"]
    ),
    "header-offset-of-5000-digits": _weights_case(
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4' + "0" * 5000 + "]}}",
        bytes(4),
        ["header holds a number that is too long"],
    ),
    "header-lone-surrogate-name": _weights_case(
        {"a\ud800": _entry(shape=[1], offsets=[0, 4])},
        bytes(4),
        ["header holds a string with a lone surrogate (\\ud800)"],
    ),
    "header-bool-in-shape": _weights_case(
        {_A0: _entry(shape=[True, 4], offsets=[0, 16])},
        bytes(16),
        [f"tensor {_A0!r}: shape [True, 4] is not a list of sizes"],
    ),
    "header-bool-offset": _weights_case(
        {_A0: _entry(shape=[1], offsets=[False, 4])}, bytes(4), [f"tensor {_A0!r}: bad data_offsets [False, 4]"]
    ),
    "header-2**64-elements": _weights_case(
        {_A0: _entry(shape=[2**32, 2**32, 0], offsets=[0, 0])},
        b"",
        ["has more than 64 dimensions or more than 2**63 elements"],
    ),
    # odd tensors
    "rank-0-module": _tensors_case(_rank_zero, [f"module {Q0!r} has rank 0 (lora_A [0, 64]): PEFT refuses r=0"]),
    "empty-d_in": _tensors_case(
        _set(_A0, torch.zeros(8, 0)), [f"module {Q0!r}: lora_A [8, 0] has an empty dimension"]
    ),
    "integer-lora_A": _tensors_case(
        _set(_A0, torch.ones(8, 64, dtype=torch.int32)),
        [f"module {Q0!r}: lora_A is stored as I32; LoRA factors are floating point"],
    ),
    "bool-lora_B": _tensors_case(
        _set(_B0, torch.ones(64, 8, dtype=torch.bool)), [f"module {Q0!r}: lora_B is stored as BOOL"]
    ),
}


@pytest.fixture(params=list(CASES))
def bad(request: pytest.FixtureRequest, llama_lora: Path, copy_adapter: Callable[..., Path]) -> Case:
    return CASES[request.param](llama_lora, copy_adapter)


def test_bad_input_api(bad: Case, llama_base: Path) -> None:
    before = tree_digest(bad.path)
    for call in (
        lambda: ah.load(bad.path),
        lambda: ah.inspect(bad.path),
        lambda: ah.validate(bad.path, base=llama_base),
    ):
        with pytest.raises(Exception) as exc:
            call()
        assert type(exc.value) is bad.exc, repr(exc.value)
        message = str(exc.value)
        assert str(bad.file) in message
        for part in bad.parts:
            assert part in message
        assert "\n" not in message and message.isprintable()
        assert exc.value.path == bad.file  # type: ignore[attr-defined]
    assert tree_digest(bad.path) == before


@pytest.mark.parametrize("command", ["inspect", "validate", "reduce"])
def test_bad_input_cli(bad: Case, command: str, llama_base: Path, tmp_path: Path) -> None:
    before = tree_digest(bad.path)
    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", str(bad.path), "--json"],
        "validate": ["validate", str(bad.path), "--base", str(llama_base)],
        "reduce": ["reduce", str(bad.path), "--rank", "2", "-o", str(out)],
    }[command]
    message = cli_error(cli(*args))
    assert str(bad.file) in message
    for part in bad.parts:
        assert part in message
    assert tree_digest(bad.path) == before
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- PEFT is the reference


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": ".*layers\\.[01]\\.self_attn\\.(q|v)_proj"},
        {"target_modules": "^(?!.*layers\\.2).*\\.(q_proj|v_proj)$"},
        {"lora_alpha": 16.5, "revision": None, "modules_to_save": None, "exclude_modules": ["o_proj"]},
        {"rank_pattern": None, "alpha_pattern": None, "task_type": None, "init_lora_weights": "gaussian"},
        {"exclude_modules": ".*mlp.*", "layer_replication": None, "trainable_token_indices": None},
        {"layers_to_transform": [0, 1]},
        {"layers_to_transform": 1, "layers_pattern": "layers"},
        {"layers_to_transform": [0], "layers_pattern": ["layers", "h"], "bias": "lora_only", "use_rslora": True},
    ],
)
def test_configs_peft_accepts_are_accepted(changes: dict[str, Any], llama_lora: Path, copy_adapter: Callable) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, **changes)
    peft_cfg = LoraConfig.from_pretrained(d)
    adapter = ah.load(d)
    if "layers_to_transform" not in changes:  # the layer filter is PEFT's at model creation, not modelled here
        assert [n for n in adapter.modules if adapter.config.targets(n)] == [
            n for n in adapter.modules if check_target_module_exists(peft_cfg, n)
        ]


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": ".*q_proj", "layers_to_transform": [0]},
        {"target_modules": ".*q_proj", "layers_pattern": "layers", "layers_to_transform": [0]},
        {"layers_pattern": "layers"},
    ],
)
def test_combinations_peft_refuses_are_refused(
    changes: dict[str, Any], llama_lora: Path, copy_adapter: Callable
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, **changes)
    with pytest.raises(ValueError):
        LoraConfig.from_pretrained(d)
    with pytest.raises(InvalidAdapterError, match="PEFT refuses"):
        ah.load(d)
    cli_error(cli("inspect", str(d)))


def test_rank_zero_peft_refuses_too(llama_base: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base)
    with pytest.raises(ValueError, match="should be a positive integer"):
        get_peft_model(model, LoraConfig(r=8, rank_pattern={"q_proj": 0}, target_modules=["q_proj"]))


# ------------------------------------------------------------------------- scales: finite and in range

SCALE_CASES = [
    ("NaN alpha", '"lora_alpha": NaN', "alpha-not-finite", None),
    ("infinite alpha", '"lora_alpha": Infinity', "alpha-not-finite", None),
    ("-infinite alpha", '"lora_alpha": -Infinity', "alpha-not-finite", None),
    ("alpha 1e400 (read as inf)", '"lora_alpha": 1e400', "alpha-not-finite", None),
    ("alpha of 400 digits", '"lora_alpha": 1' + "0" * 400, "alpha-not-finite", None),
    ("alpha 2e6", '"lora_alpha": 2e6', "alpha-out-of-range", None),
    ("NaN in alpha_pattern", '"alpha_pattern": {"v_proj": NaN}', "alpha-not-finite", "v_proj"),
    ("huge alpha_pattern", '"alpha_pattern": {"v_proj": -1e300}', "alpha-out-of-range", "v_proj"),
    ("huge rank_pattern", '"rank_pattern": {"v_proj": ' + "9" * 50 + "}", "rank-out-of-range", "v_proj"),
    ("huge r", '"r": ' + "9" * 400, "rank-out-of-range", None),
]


def _with_raw(folder: Path, fragment: str) -> None:
    """Replace a key of the config by ``fragment`` written as raw JSON text (NaN, Infinity, long numbers)."""
    cfg = json.loads((folder / CONFIG).read_text())
    key = fragment.split('"')[1]
    cfg.pop(key, None)
    text = json.dumps(cfg)
    (folder / CONFIG).write_text(text[:-1] + ", " + fragment + "}")


@pytest.fixture(params=SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def bad_scale(request: pytest.FixtureRequest, llama_lora: Path, copy_adapter: Callable) -> tuple[Path, str, Any]:
    _, fragment, code, module = request.param
    d = copy_adapter(llama_lora)
    _with_raw(d, fragment)
    return d, code, module


def test_validate_reports_bad_scales_with_codes(bad_scale: tuple[Path, str, Any], llama_base: Path) -> None:
    d, code, module = bad_scale
    before = tree_digest(d)
    report = ah.validate(d, base=llama_base)
    assert not report.ok
    found = [f for f in report.errors if f.code == code]
    assert len(found) == 1 and found[0].module == module, report.findings
    result = cli("validate", str(d), "--base", str(llama_base), "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)  # strict JSON: no NaN leaks into the report
    assert code in {f["code"] for f in doc["findings"] if f["severity"] == "error"}
    assert tree_digest(d) == before


def _writing_commands(d: Path, base: Path, other: Path, out: Path) -> dict[str, list[str]]:
    return {
        "reduce": ["reduce", str(d), "--rank", "2", "-o", str(out)],
        "combine": ["combine", str(other), str(d), "-o", str(out)],
        "quantize": ["quantize", str(d), "--to", "int8", "-o", str(out)],
        "merge": ["merge", str(d), "--into", str(base), "-o", str(out)],
        "unmerge": ["unmerge", str(d), "--from", str(base), "-o", str(out)],
    }


@pytest.mark.parametrize("command", ["reduce", "combine", "quantize", "merge", "unmerge"])
def test_writing_commands_refuse_bad_scales(
    bad_scale: tuple[Path, str, Any], command: str, llama_lora: Path, llama_base: Path, tmp_path: Path
) -> None:
    d, code, _ = bad_scale
    out = tmp_path / "out"
    before = tree_digest(d)
    args = _writing_commands(d, llama_base, llama_lora, out)[command]
    message = cli_error(cli(*args))
    assert code in message or "says rank" in message, message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert tree_digest(d) == before


def test_api_writers_refuse_bad_scales(bad_scale: tuple[Path, str, Any], llama_base: Path, tmp_path: Path) -> None:
    d, code, _ = bad_scale
    for write in (
        lambda out: ah.reduce(d, out, rank=2),
        lambda out: ah.merge(d, base=llama_base, out=out),
    ):
        with pytest.raises((InvalidAdapterError, IncompatibleBaseError)) as exc:
            write(tmp_path / "out")
        assert code in str(exc.value) or "says rank" in str(exc.value)
        assert not (tmp_path / "out").exists()


def test_scales_of_good_adapters_are_computed_as_peft_does(llama_patterns: Path) -> None:
    adapter = ah.load(llama_patterns)
    assert {m.name: m.scale for m in adapter.modules.values()} == {
        "model.layers.0.self_attn.q_proj": 16 / 8,
        "model.layers.0.self_attn.v_proj": 16 / 4,
        "model.layers.0.mlp.up_proj": 32 / 8,
        "model.layers.1.self_attn.q_proj": 16 / 2,
        "model.layers.1.self_attn.v_proj": 16 / 4,
        "model.layers.1.mlp.up_proj": 32 / 8,
    }
    assert all(math.isfinite(m.scale) for m in adapter.modules.values())


# ---------------------------------------------------------------------------------- integer base weights


@pytest.fixture
def int_base(llama_base: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Llama whose layer-0 q_proj weight is stored as int32."""
    d = tmp_path / "int-base"
    shutil.copytree(llama_base, d)
    weights = d / "model.safetensors"
    tensors = load_file(weights)
    key = f"{Q0}.weight"
    tensors[key] = tensors[key].round().to(torch.int32)
    save_file(tensors, weights, metadata={"format": "pt"})
    return d


def test_integer_base_weight_is_reported_and_merge_refuses(llama_lora: Path, int_base: Path, tmp_path: Path) -> None:
    report = ah.validate(llama_lora, base=int_base)
    (finding,) = [f for f in report.errors if f.code == "base-weight-not-float"]
    assert finding.module == Q0 and f"stores {Q0}.weight as I32" in finding.message
    result = cli("validate", str(llama_lora), "--base", str(int_base))
    assert result.exit_code == 1 and "base-weight-not-float" in result.stdout

    before = tree_digest(int_base)
    out = tmp_path / "merged"
    with pytest.raises(IncompatibleBaseError, match="base-weight-not-float"):
        ah.merge(llama_lora, base=int_base, out=out)
    message = cli_error(cli("merge", str(llama_lora), "--into", str(int_base), "-o", str(out)))
    assert "base-weight-not-float" in message and str(int_base) in message
    assert not out.exists() and tree_digest(int_base) == before


# ----------------------------------------------------------------------------------- a large header


def test_header_of_200k_entries_reads_cleanly(tmp_path: Path) -> None:
    """Many entries: read with memory bounded by the 100 MB header limit (a million entries, 70 MB of header,
    peak at about 0.85 GB resident, as the safetensors library's reader does; measured outside the suite)."""
    n = 200_000
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n))
    f = tmp_path / "many.safetensors"
    f.write_bytes(st_bytes("{" + entries + "}", bytes(4 * n)))
    header = read_header(f)
    assert len(header.tensors) == n and header.tensors["t199999"].end == 4 * n


# ------------------------------------------------------------------- metadata JSON inside safetensors files


def rewrite_metadata(file: Path, **changes: str) -> None:
    """Set ``__metadata__`` entries of a safetensors file in place (tensor data and offsets unchanged)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.setdefault("__metadata__", {}).update(changes)
    file.write_bytes(st_bytes(header, raw[8 + n :]))


@pytest.fixture(scope="module")
def int8_adapter(llama_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "int8"
    ah.quantize(llama_lora, out, scheme="int8", block_size=64)
    return out


def _quant(doc: Any) -> str:
    return doc if isinstance(doc, str) else json.dumps(doc)


def _q(scheme: Any = "int8", block_size: Any = 64, **tensors: Any) -> dict[str, Any]:
    """Quantization metadata; ``a0=(dtype, shape)`` describes layer 0's q_proj lora_A."""
    names = {"a0": _A0, "nope": "nope"}
    described = {names[k]: {"dtype": dtype, "shape": shape} for k, (dtype, shape) in tensors.items()}
    return {"scheme": scheme, "block_size": block_size, "tensors": described}


QUANT_CASES = {
    "not-json": ("{", "adapterhub.quantization metadata is not valid JSON"),
    "nested": ('{"scheme": ' + _deep(100_000) + "}", "adapterhub.quantization metadata nests JSON"),
    "not-an-object": ([1], "expected an object with scheme, block_size and tensors"),
    "scheme": (_q("int9"), "scheme 'int9' is not one of int8, fp8, nf4"),
    "block-size-0": (_q(block_size=0), "block_size must be an integer from 1"),
    "block-size-bool": (_q(block_size=True), "got True"),
    "block-size-huge": (_q(block_size=10**30), "block_size must be an integer"),
    "dtype": (_q(a0=("I32", [8, 64])), "needs a dtype"),
    "shape": (_q(a0=("F32", [8, True])), "shape [8, True] is not a list of sizes"),
    "size": (_q(a0=("F32", [9, 64])), "of shape [9, 64] in int8 is stored as I8 x 512"),
    "scales": (_q(block_size=32, a0=("F32", [8, 64])), "has 8 F32 scales; int8 needs 16 F32"),
    "missing": (_q(nope=("F32", [8, 64])), "names tensor 'nope', but the file lacks it"),
    "wrong-scheme": (_q("nf4", a0=("F32", [8, 64])), "in nf4 is stored as I8 x 512"),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantization_metadata_is_checked_against_the_tensors(
    case: str, int8_adapter: Path, llama_base: Path, tmp_path: Path
) -> None:
    doc, part = QUANT_CASES[case]
    d = tmp_path / "q"
    shutil.copytree(int8_adapter, d)
    rewrite_metadata(d / WEIGHTS, **{"adapterhub.quantization": _quant(doc)})
    with pytest.raises(CorruptFileError, match=re.escape(part)) as exc:
        ah.load(d)
    assert exc.value.path == d / WEIGHTS
    before = tree_digest(d)
    for args in (["inspect", str(d)], ["dequantize", str(d), "-o", str(tmp_path / "out")]):
        message = cli_error(cli(*args))
        assert part in message and str(d / WEIGHTS) in message
    assert tree_digest(d) == before and not (tmp_path / "out").exists()


def test_kohya_names_metadata_is_untrusted_json(llama_lora: Path, tmp_path: Path) -> None:
    f = tmp_path / "k.safetensors"
    ah.convert(llama_lora, f, to="kohya")
    for value, part in [
        (_deep(100_000), "adapterhub.kohya_names metadata nests JSON arrays or objects too deeply"),
        ('{"a": "b\\ud800"}', "adapterhub.kohya_names metadata holds a string with a lone surrogate"),
        ('{"a": 1}', "bad adapterhub.kohya_names metadata (not an object of names)"),
    ]:
        rewrite_metadata(f, **{"adapterhub.kohya_names": value})
        with pytest.raises(CorruptFileError if "JSON" in part or "surrogate" in part else InvalidAdapterError) as exc:
            ah.load(f)
        assert part in str(exc.value)
        assert part in cli_error(cli("inspect", str(f)))


def _diffusers_file(folder: Path, metadata: str) -> Path:
    folder.mkdir()
    tensors = {"unet.blk.proj.lora_A.weight": torch.randn(4, 8), "unet.blk.proj.lora_B.weight": torch.randn(8, 4)}
    save_file(tensors, folder / "pytorch_lora_weights.safetensors", metadata={"lora_adapter_metadata": metadata})
    return folder


def test_diffusers_metadata_is_untrusted_json_and_its_scales_are_checked(tmp_path: Path) -> None:
    deep = _diffusers_file(tmp_path / "deep", '{"unet.r": ' + _deep(100_000) + "}")
    with pytest.raises(CorruptFileError, match=re.escape("lora_adapter_metadata metadata nests JSON")):
        ah.load(deep)
    typed = _diffusers_file(tmp_path / "typed", '{"unet.r": "4", "unet.lora_alpha": 4}')
    with pytest.raises(InvalidAdapterError, match=re.escape("r must be a positive integer, got '4'")):
        ah.load(typed)
    assert "r must be a positive integer" in cli_error(cli("inspect", str(typed)))
    nan = _diffusers_file(tmp_path / "nan", '{"unet.r": 4, "unet.lora_alpha": NaN}')
    adapter = ah.load(nan)  # read, so that validate reports it and writers refuse it
    assert math.isnan(adapter.modules["unet.blk.proj"].alpha)
    assert "alpha-not-finite" in cli_error(cli("reduce", str(nan), "--rank", "2", "-o", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
