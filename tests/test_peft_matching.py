"""PEFT's matching rules, exactly: for each case the adapter is loaded with ``PeftModel.from_pretrained`` on the
tiny base, and ``validate``'s verdict and ``merge``'s behaviour are compared with what PEFT does.

PEFT (``inject_adapter``) wraps the modules ``target_modules`` selects in the model transformers built from the
base, then loads ``base_model.model.<module>.lora_*`` keys onto them by exact name: a saved name with an extra or
missing leading segment is not applied (the model is unchanged; PEFT warns of missing adapter keys), and a config
that selects nothing is refused ("Target modules ... not found in the base model"). transformers itself tolerates
one prefix, the model's ``base_model_prefix``, between a head model and its bare model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli as cli
from peft import PeftModel
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.errors import IncompatibleBaseError, UsageError


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "hash-cache"))


def set_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def rename_keys(folder: Path, rename: Callable[[str], str]) -> None:
    """Rewrite every saved module name ``base_model.model.<name>...`` as ``base_model.model.<rename(name)>...``."""
    tensors = load_file(folder / WEIGHTS)
    save_file(
        {PREFIX + rename(k.removeprefix(PREFIX)): v for k, v in tensors.items()},
        folder / WEIGHTS,
        metadata={"format": "pt"},
    )


def load_model(base: Path, auto: str = "causal-lm") -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    cls = {"causal-lm": AutoModelForCausalLM, "bare": AutoModel}[auto]
    return cls.from_pretrained(str(base)).eval()


def peft_apply(base: Path, adapter: Path, auto: str = "causal-lm") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load ``adapter`` onto ``base`` with PEFT and merge it: (the weights PEFT changed, PEFT's warnings)."""
    model = load_model(base, auto)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    after = merged.state_dict()
    changed = {k: after[k] for k in before if k in after and not torch.equal(before[k], after[k])}
    return changed, [str(w.message) for w in caught]


def missing_keys_warned(messages: list[str]) -> bool:
    return any("Found missing adapter keys" in m for m in messages)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# ------------------------------------------------------------------------------ exact names: the control


def test_exact_names_apply_and_validate(llama_lora: Path, llama_base: Path) -> None:
    changed, messages = peft_apply(llama_base, llama_lora)
    assert len(changed) == 4 and not missing_keys_warned(messages)
    report = ah.validate(llama_lora, base=llama_base)
    assert report.ok and report.findings == []


# ------------------------------------------------------------------------------ an extra leading segment


@pytest.mark.parametrize("extra", ["foo.", "unet.", "base_model.model."])
def test_extra_leading_segment_is_not_applied_by_peft_and_is_an_error(
    extra: str, llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    d = copy_adapter(llama_lora)
    rename_keys(d, lambda name: extra + name)

    changed, messages = peft_apply(llama_base, d)
    assert changed == {}  # PEFT loads it and applies nothing
    assert missing_keys_warned(messages)

    report = ah.validate(d, base=llama_base)
    assert not report.ok
    assert {f.code for f in report.errors} == {"module-missing"}
    assert len(report.errors) == 4
    hint = [f for f in report.findings if f.code == "name-prefix"]
    assert len(hint) == 1
    assert f"these names match after removing the prefix {extra!r}" in hint[0].message
    assert f"--strip-prefix {extra} -o OUT" in hint[0].message
    assert f"--strip-prefix {extra}" in report.errors[0].message

    # merge refuses what PEFT would not apply, writing nothing
    out = tmp_path / "merged"
    with pytest.raises(IncompatibleBaseError, match="module-missing"):
        ah.merge(d, base=llama_base, out=out)
    assert not out.exists()
    result = cli("merge", str(d), "--into", str(llama_base), "-o", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--strip-prefix" in result.output
    assert not out.exists()

    # the hint's command rewrites the names; PEFT then applies exactly the original adapter
    fixed = tmp_path / "fixed"
    result = cli("convert", str(d), "--to", "peft", "--strip-prefix", extra, "-o", str(fixed))
    assert result.exit_code == 0, result.output
    assert ah.validate(fixed, base=llama_base).ok
    want, _ = peft_apply(llama_base, llama_lora)
    got, messages = peft_apply(llama_base, fixed)
    assert not missing_keys_warned(messages)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------ a missing leading segment


def test_bare_model_names_on_a_head_checkpoint(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """Names without ``model.`` (as saved from a PEFT model on ``LlamaModel``) on a ``LlamaForCausalLM`` checkpoint:
    PEFT applies them on the bare model (``AutoModel``, where transformers removes the prefix), not on the head
    model. task_type CAUSAL_LM (the head model) makes it an error; no task_type a warning."""
    d = copy_adapter(llama_lora)
    rename_keys(d, lambda name: name.removeprefix("model."))
    assert json.loads((d / CONFIG).read_text())["task_type"] == "CAUSAL_LM"

    changed, messages = peft_apply(llama_base, d)
    assert changed == {} and missing_keys_warned(messages)

    report = ah.validate(d, base=llama_base)
    assert {f.code for f in report.errors} == {"module-missing"} and len(report.errors) == 4
    assert "--add-prefix model." in report.errors[0].message
    with pytest.raises(IncompatibleBaseError):
        ah.merge(d, base=llama_base, out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    fixed = tmp_path / "fixed"
    result = cli("convert", str(d), "--to", "peft", "--add-prefix", "model.", "-o", str(fixed))
    assert result.exit_code == 0, result.output
    assert ah.validate(fixed, base=llama_base).ok
    changed, messages = peft_apply(llama_base, fixed)
    assert len(changed) == 4 and not missing_keys_warned(messages)

    set_config(d, task_type=None)  # PeftModelForCausalLM cannot wrap a bare LlamaModel
    changed, messages = peft_apply(llama_base, d, auto="bare")
    assert len(changed) == 4 and not missing_keys_warned(messages)
    report = ah.validate(d, base=llama_base)
    assert report.ok
    assert [f.code for f in report.warnings] == ["bare-model-names"]
    assert "AutoModel" in report.warnings[0].message


@pytest.fixture(scope="module")
def bare_llama_base(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as ``LlamaModel``: keys without ``model.``, architectures ``["LlamaModel"]``."""
    out = tmp_path_factory.mktemp("bare") / "llama-model"
    load_model(llama_base).model.save_pretrained(out)
    assert not any(k.startswith("model.") for k in load_file(out / "model.safetensors"))
    return out


def test_head_names_on_a_bare_checkpoint_match_as_transformers_loads_it(
    llama_lora: Path, bare_llama_base: Path, tmp_path: Path
) -> None:
    """transformers adds ``model.`` when it loads a ``LlamaModel`` checkpoint as ``LlamaForCausalLM``: the adapter
    applies, validate says so, and merge writes the same weights PEFT computes."""
    changed, messages = peft_apply(bare_llama_base, llama_lora)
    assert len(changed) == 4 and not missing_keys_warned(messages)
    report = ah.validate(llama_lora, base=bare_llama_base)
    assert report.ok, report.errors
    assert not [f for f in report.findings if f.module and f.module.startswith("model.layers")]

    out = tmp_path / "merged"
    ah.merge(llama_lora, base=bare_llama_base, out=out)
    merged = read_folder(out)
    assert sorted(merged) == sorted(load_file(bare_llama_base / "model.safetensors"))
    for key, value in changed.items():
        torch.testing.assert_close(merged[key.removeprefix("model.")], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ target_modules


def test_a_target_entry_matching_nothing_is_fine_when_another_matches(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, target_modules=["q_proj", "v_proj", "c_attn", "query"])  # a multi-architecture list
    changed, messages = peft_apply(llama_base, d)
    assert len(changed) == 4 and not missing_keys_warned(messages)
    report = ah.validate(d, base=llama_base)
    assert report.ok and report.warnings == []
    assert [(f.code, f.severity) for f in report.findings] == [("target-unused", "info")]
    assert "'c_attn', 'query'" in report.findings[0].message


def test_targets_matching_nothing_are_refused_like_peft(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, target_modules=["c_attn", "query"])
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(load_model(llama_base), str(d))
    report = ah.validate(d, base=llama_base)
    assert "targets-not-found" in {f.code for f in report.errors}
    with pytest.raises(IncompatibleBaseError):
        ah.merge(d, base=llama_base, out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_target_regex_matching_nothing_is_refused(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, target_modules=r"transformer\.h\.\d+\.attn\.c_attn")
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(load_model(llama_base), str(d))
    assert "targets-not-found" in {f.code for f in ah.validate(d, base=llama_base).errors}


# ------------------------------------------------------------------------------ convert: the rewriting option


def test_strip_prefix_refuses_names_without_it(
    llama_lora: Path, tmp_path: Path, copy_adapter: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    result = cli("convert", str(llama_lora), "--to", "peft", "--strip-prefix", "unet.", "-o", str(out))
    assert result.exit_code == 2
    assert "does not start with 'unet.'" in result.output and "Traceback" not in result.output
    assert not out.exists()
    for bad in ("", "a..b", "."):
        result = cli("convert", str(llama_lora), "--to", "peft", "--add-prefix", bad, "-o", str(out))
        assert result.exit_code == 2, (bad, result.output)
        assert not out.exists()
    from adapterhub_cli.ops.convert import rename_modules

    with pytest.raises(UsageError):
        rename_modules(ah.load(llama_lora))


def test_strip_prefix_rewrites_full_name_targets_and_patterns(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """Full-name target entries and pattern keys written with the prefix lose it too, so PEFT selects the same
    modules with the same scales."""
    d = copy_adapter(llama_lora)
    rename_keys(d, lambda name: "unet." + name)
    names = [f"unet.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    set_config(d, target_modules=names, alpha_pattern={"unet.model.layers.1.self_attn.v_proj": 4})
    fixed = tmp_path / "fixed"
    result = cli("convert", str(d), "--to", "peft", "--strip-prefix", "unet", "-o", str(fixed))
    assert result.exit_code == 0, result.output
    cfg = json.loads((fixed / CONFIG).read_text())
    assert cfg["target_modules"] == sorted(n.removeprefix("unet.") for n in names)
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 4}
    before, after = ah.load(d), ah.load(fixed)
    assert {n.removeprefix("unet."): m.scale for n, m in before.modules.items()} == {
        n: m.scale for n, m in after.modules.items()
    }
    assert ah.validate(fixed, base=llama_base).ok
    changed, messages = peft_apply(llama_base, fixed)
    assert len(changed) == 4 and not missing_keys_warned(messages)
    layer = PeftModel.from_pretrained(load_model(llama_base), str(fixed)).base_model.model.model.layers[1]
    assert layer.self_attn.v_proj.scaling["default"] == 4 / 8


def test_find_weight_tolerates_only_what_transformers_does(llama_base: Path, bare_llama_base: Path) -> None:
    from adapterhub_cli.artifact.checkpoint import open_base

    head, bare = open_base(llama_base), open_base(bare_llama_base)
    q = "model.layers.0.self_attn.q_proj"
    assert head.weight_match(q) == (q + ".weight", "exact")
    assert bare.weight_match(q) == ("layers.0.self_attn.q_proj.weight", "prefix-added")
    assert head.weight_match("layers.0.self_attn.q_proj") == (q + ".weight", "prefix-removed")
    for wrong in ("foo." + q, "unet." + q, "base_model.model." + q, "self_attn.q_proj", "0.self_attn.q_proj"):
        assert head.find_weight(wrong) is None, wrong
    assert head.near_match("foo." + q) == ("strip", "foo.")
    assert head.near_match("self_attn.q_proj") is None  # two layers end so: no unique hint


def test_gpt2_missing_transformer_prefix_and_a_partly_prefixed_adapter(
    gpt2_lora: Path, gpt2_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """GPT-2's base_model_prefix is ``transformer``: names without it are the bare model's (task_type CAUSAL_LM:
    an error PEFT confirms); a prefix on only some names leaves the others matching, and only the prefixed ones
    are errors."""
    d = copy_adapter(gpt2_lora)
    rename_keys(d, lambda name: name.removeprefix("transformer."))
    assert [f.code for f in ah.validate(d, base=gpt2_base).warnings] == ["bare-model-names"]  # no task_type
    set_config(d, task_type="CAUSAL_LM")
    changed, messages = peft_apply(gpt2_base, d)
    assert changed == {} and missing_keys_warned(messages)
    report = ah.validate(d, base=gpt2_base)
    assert {f.code for f in report.errors} == {"module-missing"}
    assert "--add-prefix transformer." in report.errors[0].message

    d = copy_adapter(gpt2_lora, "partly")
    rename_keys(d, lambda name: "extra." + name if ".h.0." in name else name)
    changed, messages = peft_apply(gpt2_base, d)
    assert changed and all(".h.1." in k for k in changed) and missing_keys_warned(messages)
    report = ah.validate(d, base=gpt2_base)
    assert {f.module for f in report.errors} == {m for m in ah.load(d).modules if m.startswith("extra.")}
    with pytest.raises(IncompatibleBaseError):
        ah.merge(d, base=gpt2_base, out=tmp_path / "merged")


def test_layer_replication_modules_match_the_layers_peft_copies(llama_base: Path, tmp_path: Path) -> None:
    """With layer_replication the adapted model has more layers than the checkpoint (PEFT copies them): each module
    matches the base layer its copy shares, so validate reports no module-missing, and PEFT applies every module."""
    import fixtures_models as fm
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    adapter = fm.build_lora_adapter(llama_base, tmp_path / "rep", config, seed=3)
    assert any(".layers.2." in n for n in ah.load(adapter).modules)
    report = ah.validate(adapter, base=llama_base)
    assert not [f for f in report.findings if f.code == "module-missing"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_model(llama_base), str(adapter))
    assert not missing_keys_warned([str(w.message) for w in caught])


# ------------------------------------------------------------------- modules_to_save names are skipped by matching


def test_modules_to_save_names_are_not_targeted_like_peft(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """PEFT's check_target_module_exists skips a module listed in modules_to_save (its LoRA tensors are ignored):
    validate says which, and why; merge refuses to apply what PEFT would not."""
    d = copy_adapter(llama_lora)
    set_config(d, modules_to_save=["v_proj"])
    base = read_folder(llama_base)  # PEFT loads a modules_to_save copy: give it the base's own (unchanged) weights
    with_copies = read_folder(d) | {
        f"base_model.model.{k}": base[k].clone() for k in base if k.endswith("self_attn.v_proj.weight")
    }
    save_file(with_copies, str(d / "adapter_model.safetensors"))
    changed, _ = peft_apply(llama_base, d)
    lora = ah.load(d, strict=False)
    applied = {m for m in lora.modules if lora.config.targets(m)}
    assert {k.removesuffix(".weight") for k in changed} == applied  # q_proj only: PEFT ignored v_proj's LoRA
    assert applied and all(m.endswith("q_proj") for m in applied)
    (f,) = [f for f in ah.validate(d, base=llama_base).findings if f.code == "untargeted-tensors"]
    assert f.severity == "error" and f.module.endswith("v_proj") and "modules_to_save excludes it" in f.message
    with pytest.raises(IncompatibleBaseError):
        ah.merge(d, base=llama_base, out=tmp_path / "merged")


def test_targets_only_in_modules_to_save_are_refused_like_peft(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    d = copy_adapter(llama_lora)
    set_config(d, modules_to_save=["q_proj", "v_proj"])
    with pytest.raises(NoMatchingPeftModuleError, match="No modules were targeted"):
        PeftModel.from_pretrained(load_model(llama_base), str(d))
    (f,) = [f for f in ah.validate(d, base=llama_base).findings if f.code == "targets-not-found"]
    assert "modules_to_save" in f.message and "No modules were targeted" in f.message
