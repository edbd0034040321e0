"""Validation of an adapter against a base checkpoint, cross-checked against what PEFT itself does.

Every verdict here is compared with ``peft.PeftModel.from_pretrained`` on the real models: an adapter we
pass loads in PEFT with no missing or unexpected LoRA keys, and a misfit we flag as an error makes PEFT
fail (size mismatch) or lose weights (missing / unexpected keys).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fixtures_models as fm
import pytest
import torch
from cli_helpers import run_cli as cli
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

LLAMA_ADAPTERS = ["llama_lora", "llama_rslora", "llama_patterns", "llama_dora", "llama_all_linear"]
GOOD = [
    *[(name, "llama_base", "causal-lm") for name in LLAMA_ADAPTERS],
    *[(name, "llama_base_sharded", "causal-lm") for name in LLAMA_ADAPTERS],
    ("gpt2_lora", "gpt2_base", "causal-lm"),
    ("roberta_lora", "roberta_base", "seq-cls"),
    ("llama_lora_wide", "llama_base_wide", "causal-lm"),
]
MODULE_COUNT = {
    "llama_lora": 4,
    "llama_rslora": 8,
    "llama_patterns": 6,
    "llama_dora": 4,
    "llama_all_linear": 14,
    "gpt2_lora": 6,
    "roberta_lora": 4,
    "llama_lora_wide": 4,
}


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "hash-cache"))


def set_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def codes(report: ah.ValidationReport) -> list[tuple[str, str, str | None]]:
    return [(f.code, f.severity, f.module) for f in report.findings]


def peft_load(base: Path, adapter: Path, task: str = "causal-lm") -> tuple[Any, Any, list[str]]:
    """Load ``adapter`` onto ``base`` with PEFT; return (model, load result of a second load, warnings)."""
    model = fm.load_base_model(base, task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
        result = peft_model.load_adapter(str(adapter), adapter_name="check")
    messages = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    return peft_model, result, messages


def assert_peft_loads_cleanly(base: Path, adapter: Path, task: str = "causal-lm") -> Any:
    peft_model, result, messages = peft_load(base, adapter, task)
    assert result.missing_keys == []
    assert [k for k in result.unexpected_keys if "lora_" in k] == []
    assert not [m for m in messages if "missing adapter keys" in m]
    return peft_model, messages


# ------------------------------------------------------------------------------ good adapters


@pytest.mark.parametrize(("adapter_name", "base_name", "task"), GOOD)
def test_good_adapter_passes(request: pytest.FixtureRequest, adapter_name: str, base_name: str, task: str) -> None:
    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(base_name)
    report = ah.validate(adapter, base=base)
    assert report.ok
    assert report.errors == []
    assert report.adapter == str(adapter)
    assert report.base == str(base)
    if base_name == "llama_base_sharded":
        # The adapter declares the single-file llama_base folder: a different path, so only a warning.
        assert codes(report) == [("base-name-mismatch", "warning", None)]
    else:
        assert report.findings == []

    result = cli("validate", str(adapter), "--base", str(base))
    assert result.exit_code == 0, result.output
    assert "OK: the adapter fits the base" in result.stdout
    assert f"{MODULE_COUNT[adapter_name]} modules checked" in result.stdout


@pytest.mark.parametrize(("adapter_name", "base_name", "task"), GOOD)
def test_peft_agrees_good_adapter_loads(
    request: pytest.FixtureRequest, adapter_name: str, base_name: str, task: str
) -> None:
    adapter: Path = request.getfixturevalue(adapter_name)
    base: Path = request.getfixturevalue(base_name)
    peft_model, messages = assert_peft_loads_cleanly(base, adapter, task)
    assert messages == []
    # The weights PEFT loaded are the file's, module by module.
    state = peft_model.state_dict()
    ours = ah.load(adapter)
    assert len(ours.modules) == MODULE_COUNT[adapter_name]
    for name in ours.modules:
        f = ours.factors(name)
        peft_a = state[f"{PREFIX}{name}.lora_A.default.weight"]
        assert torch.equal(peft_a.reshape(peft_a.shape[0], -1), f.A)


def test_sharded_base_is_read_through_the_index(llama_base_sharded: Path, llama_base: Path) -> None:
    sharded, single = ah.open_base(llama_base_sharded), ah.open_base(llama_base)
    assert {k: t.shape for k, t in sharded.tensors.items()} == {k: t.shape for k, t in single.tensors.items()}
    assert len(set(sharded.shard_of.values())) >= 3
    assert sharded.find_weight("model.layers.1.self_attn.v_proj") == "model.layers.1.self_attn.v_proj.weight"


# ------------------------------------------------------------------------------ fan_in_fan_out


def test_gpt2_fan_in_fan_out_flipped_is_a_warning(
    gpt2_lora: Path, gpt2_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(gpt2_lora)
    set_config(d, fan_in_fan_out=False)
    report = ah.validate(d, base=gpt2_base)
    assert report.ok
    assert report.errors == []
    # attn.c_proj is square (64 x 64): its shape cannot tell the orientation, the base's model type (gpt2, whose
    # c_attn / c_proj / c_fc are Conv1D layers) does, as it does for PEFT
    assert sorted(codes(report)) == sorted(
        ("fan-in-fan-out", "warning", f"transformer.h.{i}.{m}")
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    )
    assert "set fan_in_fan_out to true" in report.findings[0].message
    result = cli("validate", str(d), "--base", str(gpt2_base))
    assert result.exit_code == 0
    assert "6 warning(s)" in result.stdout

    # PEFT agrees: it loads the adapter, warns, and corrects the flag itself.
    peft_model, messages = assert_peft_loads_cleanly(gpt2_base, d)
    assert any("fan_in_fan_out is set to False but the target module is `Conv1D`" in m for m in messages)
    c_attn = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out is True


def test_llama_fan_in_fan_out_set_on_linear_is_a_warning(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, fan_in_fan_out=True)
    report = ah.validate(d, base=llama_base)
    assert report.ok
    flagged = {f.module for f in report.findings if f.code == "fan-in-fan-out"}
    # v_proj (32 x 64) can only be (d_out, d_in); q_proj is square and cannot tell.
    assert {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"} <= flagged
    assert all("set fan_in_fan_out to false" in f.message for f in report.findings if f.code == "fan-in-fan-out")
    _, messages = assert_peft_loads_cleanly(llama_base, d)
    assert any("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`" in m for m in messages)


# ------------------------------------------------------------------------------ modules_to_save


def test_roberta_classifier_with_other_label_count(
    roberta_lora: Path, roberta_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(roberta_lora)
    gen = torch.Generator().manual_seed(0)

    def three_labels(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}classifier.out_proj.weight"] = torch.randn(3, 64, generator=gen)
        t[f"{PREFIX}classifier.out_proj.bias"] = torch.randn(3, generator=gen)

    rewrite_tensors(d, three_labels)
    report = ah.validate(d, base=roberta_base)
    assert not report.ok
    assert codes(report) == [
        ("modules-to-save-shape", "error", "classifier.out_proj.bias"),
        ("modules-to-save-shape", "error", "classifier.out_proj.weight"),
    ]
    by_module = {f.module: f.message for f in report.findings}
    assert by_module["classifier.out_proj.weight"] == (
        "saved tensor classifier.out_proj.weight has shape [3, 64] but the base has [2, 64]: the vocabulary or "
        "label count differs (3 rows saved, 2 in the base): resize the base first "
        "(model.resize_token_embeddings(3)) or use the matching base"
    )
    assert "has shape [3] but the base has [2]" in by_module["classifier.out_proj.bias"]

    result = cli("validate", str(d), "--base", str(roberta_base), "--json")
    assert result.exit_code == 1
    assert {f["code"] for f in json.loads(result.stdout)["findings"]} == {"modules-to-save-shape"}

    # PEFT agrees: the saved classifier does not fit.
    with pytest.raises(RuntimeError, match=r"size mismatch for .*classifier\.modules_to_save\.default\.out_proj"):
        peft_load(roberta_base, d, "seq-cls")


def test_roberta_base_with_three_labels(roberta_lora: Path, tmp_path: Path) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    base = tmp_path / "roberta3"
    RobertaForSequenceClassification(RobertaConfig(**{**fm.ROBERTA_KWARGS, "num_labels": 3})).save_pretrained(base)
    report = ah.validate(roberta_lora, base=base)
    errors = {f.module: f for f in report.errors}
    assert set(errors) == {"classifier.out_proj.weight", "classifier.out_proj.bias"}
    assert all(f.code == "modules-to-save-shape" for f in errors.values())
    assert "(2 rows saved, 3 in the base)" in errors["classifier.out_proj.weight"].message
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_load(base, roberta_lora, "seq-cls")


def test_modules_to_save_missing(roberta_lora: Path, roberta_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(roberta_lora)
    rewrite_tensors(d, lambda t: [t.pop(k) for k in list(t) if ".classifier." in k])
    report = ah.validate(d, base=roberta_base)
    assert not report.ok
    assert codes(report) == [("modules-to-save-missing", "error", "classifier")]
    with pytest.raises(KeyError, match="classifier"):  # PEFT 0.21 looks the saved copy up
        peft_load(roberta_base, d, "seq-cls")


def test_extra_tensor_shapes(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_lora)

    def add(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}model.norm.weight"] = torch.ones(32)  # the base's is [64]
        t[f"{PREFIX}model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # the base has no bias

    rewrite_tensors(d, add)
    report = ah.validate(d, base=llama_base)
    assert codes(report) == [
        ("unexpected-key", "warning", "model.layers.0.self_attn.q_proj.bias"),
        ("extra-tensor-shape", "error", "model.norm.weight"),
    ]
    assert "has shape [32] but the base has [64]" in report.errors[0].message


# ------------------------------------------------------------------------------ declared base


def test_declared_base_mismatch_is_a_warning(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    report = ah.validate(d, base=llama_base)
    assert report.ok
    assert codes(report) == [("base-name-mismatch", "warning", None)]
    assert "'meta-llama/Llama-3.1-8B'" in report.findings[0].message
    assert str(llama_base) in report.findings[0].message


def test_declared_hub_name_matching_the_folder(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, base_model_name_or_path=f"some-org/{llama_base.name}")
    assert ah.validate(d, base=llama_base).findings == []


def test_undeclared_base_is_info(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, base_model_name_or_path=None)
    report = ah.validate(d, base=llama_base)
    assert report.ok
    assert codes(report) == [("base-undeclared", "info", None)]


# ------------------------------------------------------------------------------ misfits vs PEFT


def test_wide_adapter_peft_agrees(llama_lora_wide: Path, llama_base: Path) -> None:
    report = ah.validate(llama_lora_wide, base=llama_base)
    assert {f.code for f in report.errors} == {"shape-mismatch"}
    assert len(report.errors) == 4
    with pytest.raises(RuntimeError, match=r"size mismatch for .*q_proj\.lora_A\.default\.weight"):
        peft_load(llama_base, llama_lora_wide)


def test_dora_without_magnitudes(llama_dora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_dora)
    rewrite_tensors(d, lambda t: [t.pop(k) for k in list(t) if "lora_magnitude_vector" in k])
    report = ah.validate(d, base=llama_base)
    assert codes(report) == [("dora-magnitude-missing", "error", "model.layers.0.self_attn.q_proj")]
    assert "4 modules have no lora_magnitude_vector" in report.errors[0].message
    _, result, messages = peft_load(llama_base, d)
    assert len(result.missing_keys) == 4
    assert all("lora_magnitude_vector" in k for k in result.missing_keys)
    assert any("Found missing adapter keys" in m for m in messages)


def test_dora_tensors_without_the_flag(llama_dora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_dora)
    set_config(d, use_dora=False)
    report = ah.validate(d, base=llama_base)
    assert codes(report) == [("dora-flag-missing", "error", None)]
    _, result, _ = peft_load(llama_base, d)
    assert len([k for k in result.unexpected_keys if "lora_magnitude_vector" in k]) == 4


def test_dora_magnitude_of_wrong_shape(llama_dora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_dora)
    key = f"{PREFIX}model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    rewrite_tensors(d, lambda t: t.update({key: torch.ones(64)}))
    report = ah.validate(d, base=llama_base)
    assert codes(report) == [("magnitude-shape", "error", "model.layers.0.self_attn.v_proj")]
    assert "DoRA magnitude has shape [64], expected [32]" in report.errors[0].message
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_load(llama_base, d)


def test_untargeted_tensors(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    d = copy_adapter(llama_lora)
    set_config(d, target_modules=["q_proj"])
    report = ah.validate(d, base=llama_base)
    assert not report.ok
    assert codes(report) == [("untargeted-tensors", "error", "model.layers.0.self_attn.v_proj")]
    msg = report.findings[0].message
    assert "2 modules have LoRA tensors PEFT does not apply" in msg and "target_modules does not select them" in msg
    peft_model, result, _ = peft_load(llama_base, d)
    assert sorted({k.split(".lora_")[0] for k in result.unexpected_keys}) == [
        f"{PREFIX}model.layers.0.self_attn.v_proj",
        f"{PREFIX}model.layers.1.self_attn.v_proj",
    ]
    assert not [n for n, _ in peft_model.named_modules() if "v_proj.lora_A" in n]  # v_proj is not wrapped
    # PEFT does not apply them, so merge refuses rather than apply them
    out = tmp_path / "merged"
    with pytest.raises(ah.IncompatibleBaseError, match="untargeted-tensors"):
        ah.merge(d, base=llama_base, out=out)
    assert not out.exists()


def test_module_the_base_lacks(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    d = copy_adapter(llama_lora)

    def move(t: dict[str, torch.Tensor]) -> None:
        for part in ("lora_A", "lora_B"):
            t[f"{PREFIX}model.layers.7.self_attn.q_proj.{part}.weight"] = t.pop(
                f"{PREFIX}model.layers.1.self_attn.q_proj.{part}.weight"
            )

    rewrite_tensors(d, move)
    report = ah.validate(d, base=llama_base)
    assert codes(report) == [("module-missing", "error", "model.layers.7.self_attn.q_proj")]
    _, result, _ = peft_load(llama_base, d)
    assert any("layers.7.self_attn.q_proj" in k for k in result.unexpected_keys)
    assert any("layers.1.self_attn.q_proj" in k for k in result.missing_keys)


# ------------------------------------------------------------------------------ weights


def test_untrained_and_zero_modules(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    one = copy_adapter(llama_lora)
    rewrite_tensors(one, lambda t: t[f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"].zero_())
    report = ah.validate(one, base=llama_base)
    assert report.ok
    assert codes(report) == [("zero-modules", "info", "model.layers.1.self_attn.v_proj")]

    every = copy_adapter(llama_lora)
    rewrite_tensors(every, lambda t: [v.zero_() for k, v in t.items() if ".lora_B." in k])
    report = ah.validate(every, base=llama_base)
    assert report.ok
    assert codes(report) == [("untrained", "warning", None)]
    assert ah.validate(every, base=llama_base, check_weights=False).findings == []


def test_check_weights_false_skips_non_finite(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]
) -> None:
    d = copy_adapter(llama_lora)
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    rewrite_tensors(d, lambda t: t[key].fill_(float("nan")))
    full = ah.validate(d, base=llama_base)
    assert codes(full) == [("non-finite", "error", key)]
    assert f"tensor {key} holds 512 NaN and 0 inf values" in full.errors[0].message
    assert ah.validate(d, base=llama_base, check_weights=False).findings == []


# ------------------------------------------------------------------------------ output


def test_cli_json_output(llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path]) -> None:
    result = cli("validate", str(llama_lora), "--base", str(llama_base), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc == {"adapter": str(llama_lora), "base": str(llama_base), "ok": True, "findings": []}

    d = copy_adapter(llama_lora)
    set_config(d, target_modules=["nonexistent_proj"], base_model_name_or_path="other/model")
    result = cli("validate", str(d), "--base", str(llama_base), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert set(doc) == {"adapter", "base", "ok", "findings"}
    assert doc["ok"] is False
    for f in doc["findings"]:
        assert set(f) == {"code", "severity", "module", "message"}
        assert f["severity"] in {"error", "warning", "info"}
        assert isinstance(f["message"], str)
        assert f["message"]
    assert [(f["code"], f["severity"], f["module"]) for f in doc["findings"]] == [
        ("targets-not-found", "error", None),
        ("untargeted-tensors", "error", "model.layers.0.self_attn.q_proj"),
        ("base-name-mismatch", "warning", None),
    ]


def test_cli_table_output(llama_lora_wide: Path, llama_base: Path) -> None:
    result = cli("validate", str(llama_lora_wide), "--base", str(llama_base))
    assert result.exit_code == 1
    assert result.stdout.count("shape-mismatch") == 4
    assert "4 error(s) (1 warning(s)); 4 modules checked" in result.stdout
    assert result.stderr == ""


def test_validate_accepts_loaded_objects(llama_lora: Path, llama_base: Path) -> None:
    report = ah.validate(ah.load(llama_lora), base=ah.open_base(llama_base))
    assert report.ok
    assert report.findings == []


# ----------------------------------------------------------------------------------------------- gguf-ready


def _gguf_codes(adapter_dir, base_dir) -> set[str]:
    return {f.code for f in ah.validate(adapter_dir, base=base_dir, gguf=True).findings if f.code.startswith("gguf")}


def test_gguf_ready_flags_what_llama_cpp_loses_or_refuses(
    llama_lora, llama_rslora, llama_patterns, llama_dora, roberta_lora, llama_base, roberta_base
):
    assert _gguf_codes(llama_lora, llama_base) == set()  # plain LoRA converts as is
    assert _gguf_codes(llama_rslora, llama_base) == {"gguf-rslora"}
    assert _gguf_codes(llama_patterns, llama_base) == {"gguf-alpha-pattern", "gguf-rank-pattern"}
    assert "gguf-dora" in _gguf_codes(llama_dora, llama_base)
    assert "gguf-modules-to-save" in _gguf_codes(roberta_lora, roberta_base)
    report = ah.validate(llama_patterns, base=llama_base, gguf=True)
    assert not report.ok and all(f.severity == "info" for f in report.findings if f.code == "gguf-rank-pattern")
    assert ah.validate(llama_patterns, base=llama_base).ok  # without --gguf these are no problems


def test_gguf_flag_in_cli(llama_rslora, llama_lora, llama_base):
    runner = CliRunner()
    res = runner.invoke(build_cli(), ["validate", str(llama_rslora), "--base", str(llama_base), "--gguf", "--json"])
    assert res.exit_code == 1
    assert "gguf-rslora" in {f["code"] for f in json.loads(res.stdout)["findings"]}
    res = runner.invoke(build_cli(), ["validate", str(llama_lora), "--base", str(llama_base), "--gguf"])
    assert res.exit_code == 0, res.output


def test_conv_dora_magnitude_shape_is_peft_s(tmp_path):
    """PEFT stores a Conv2d's DoRA magnitude as (1, d_out, 1, 1): validate accepts it (merge refuses conv DoRA
    for its own reason, named by the merge)."""
    from test_merge_conv import build_conv_case

    base, adapter = build_conv_case(tmp_path, use_dora=True)
    report = ah.validate(adapter, base=base)
    assert not [f for f in report.findings if f.code == "magnitude-shape"], report.findings
    assert ah.load(adapter).modules["conv_in"].magnitude.shape[1] > 1  # the 4-d shape really was checked


def test_bitsandbytes_int8_base_is_not_an_integer_weight_misfit(tmp_path: Path) -> None:
    """A LoRA on integer base weights is an error (``base-weight-not-float``), except for bitsandbytes' int8
    storage, which its ``quantization_config`` declares and merge dequantizes."""
    pytest.importorskip("bitsandbytes")
    from bnb_fixtures import build_tiny_llama, load_quantized
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bf16 = build_tiny_llama(tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_quantized(bf16, "int8").save_pretrained(tmp_path / "int8")
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    stored = ah.validate(tmp_path / "lora", base=tmp_path / "int8")
    assert any(t.dtype == "I8" for t in ah.open_base(tmp_path / "int8").tensors.values())
    assert "base-weight-not-float" not in {f.code for f in stored.findings}


# ------------------------------------------------------------------------------ architecture-mismatch (issue 14)


def test_llama_adapter_on_gpt2_names_the_architectures(llama_lora, gpt2_base, llama_base):
    """A Llama adapter against a GPT-2 base: PEFT refuses it; validate's first finding names both architectures and
    the per-module misfits are one line, not one per module."""
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    with pytest.raises((NoMatchingPeftModuleError, ValueError), match="not found in the base model"):
        PeftModel.from_pretrained(fm.load_base_model(gpt2_base), str(llama_lora))
    report = ah.validate(llama_lora, base=gpt2_base)
    first = report.findings[0]
    assert first.code == "architecture-mismatch" and first.severity == "error"
    assert "LlamaForCausalLM" in first.message and "GPT2LMHeadModel" in first.message
    n = len(ah.load(llama_lora).modules)
    assert f"{n} of its {n} modules" in first.message
    codes = [f.code for f in report.findings]
    assert codes.count("module-missing") == 1 and "base-name-mismatch" not in codes
    assert len(report.findings) <= 4
    res = CliRunner().invoke(build_cli(), ["validate", str(llama_lora), "--base", str(gpt2_base), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["findings"][0]["code"] == "architecture-mismatch"


def test_architecture_from_module_names_when_the_declared_base_is_remote(llama_lora, gpt2_base, copy_adapter):
    """A Hub id as declared base (not read: validate reads no network): the names' family says it."""
    a = copy_adapter(llama_lora)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    first = ah.validate(a, base=gpt2_base).findings[0]
    assert (
        first.code == "architecture-mismatch" and "Llama-style" in first.message and "GPT2LMHeadModel" in first.message
    )


def test_no_architecture_finding_within_a_family(llama_lora, llama_lora_wide, llama_base, llama_base_wide):
    """Same architecture, other sizes (shape misfits) or the right base: no architecture-mismatch."""
    for adapter, base in ((llama_lora, llama_base_wide), (llama_lora, llama_base), (llama_lora_wide, llama_base)):
        assert "architecture-mismatch" not in {f.code for f in ah.validate(adapter, base=base).findings}
