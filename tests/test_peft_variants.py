"""Every config variant PEFT writes is handled or refused by name, with PEFT itself as the reference.

Each case builds a real adapter with ``peft`` on the tiny bases (seeded), then checks what ``load`` / ``inspect``
/ ``validate`` / ``merge`` / ``reduce`` / ``combine`` do against what PEFT does with the same files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fixtures_models import build_lora_adapter, load_base_model
from peft import PeftModel

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import AdaptersError, InvalidAdapterError


CONFIG = "adapter_config.json"


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(build_cli(), [str(a) for a in args])
    return result.exit_code, result.output


def set_config(folder: Path, drop: tuple[str, ...] = (), **changes: object) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def peft_loads(base: Path, adapter: Path, task: str = "causal-lm") -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base_model(base, task), str(adapter))
    model.eval()
    return model


def assert_refused_everywhere(adapter: Path, base: Path, out: Path, words: list[str]) -> None:
    """The API raises a typed error naming ``words``; inspect, validate and merge exit 2 with one message, no
    traceback, nothing written."""
    with pytest.raises(AdaptersError) as e:
        ah.load(adapter)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    for args in (["inspect", adapter], ["validate", adapter, "--base", base], ["merge", adapter, "--into", base]):
        code, text = cli(*args, *(["-o", out] if args[0] == "merge" else []))
        assert code == 2, (args, text)
        assert "Traceback" not in text
        for w in words:
            assert w in " ".join(text.split()), (w, text)
    assert not out.exists()


# ------------------------------------------------------------------------------ 1. peft_type and r


@pytest.fixture(scope="module")
def other_methods(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real non-LoRA adapters saved by PEFT on the tiny llama."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PrefixTuningConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("other_methods")
    configs: dict[str, Any] = {
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "LOHA": LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "LOKR": LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "ADALORA": AdaLoraConfig(init_r=4, target_modules=["q_proj", "v_proj"], total_step=10),
        "PROMPT_TUNING": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "PREFIX_TUNING": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    out = {}
    for name, config in configs.items():
        out[name] = build_lora_adapter(llama_base, root / name.lower(), config, seed=11)
    return out


@pytest.mark.parametrize(
    "peft_type, words",
    [
        ("IA3", ["IA3", "not LoRA"]),
        ("LOHA", ["LoHa", "not LoRA"]),
        ("LOKR", ["LoKr", "not LoRA"]),
        ("ADALORA", ["AdaLoRA", "not LoRA"]),
        ("PROMPT_TUNING", ["prompt tuning", "virtual tokens"]),
        ("PREFIX_TUNING", ["prefix tuning", "virtual tokens"]),
    ],
)
def test_other_peft_methods_refused_by_name(other_methods, llama_base, peft_type, words, tmp_path):
    adapter = other_methods[peft_type]
    assert json.loads((adapter / CONFIG).read_text())["peft_type"] == peft_type
    peft_loads(llama_base, adapter)  # PEFT loads it: a real adapter of that method
    assert_refused_everywhere(adapter, llama_base, tmp_path / "out", words)


def test_config_without_peft_type_refused_like_peft(llama_base, llama_lora, copy_adapter, tmp_path):
    adapter = copy_adapter(llama_lora)
    set_config(adapter, drop=("peft_type",))
    with pytest.raises(KeyError, match="peft_type"):
        peft_loads(llama_base, adapter)
    assert_refused_everywhere(adapter, llama_base, tmp_path / "out", ["no peft_type"])


def test_config_without_r_takes_peft_default(llama_base, llama_lora, copy_adapter, tmp_path):
    """PEFT's LoraConfig defaults r to 8: a rank-8 adapter without r loads in PEFT and here (with a warning)."""
    adapter = copy_adapter(llama_lora)
    set_config(adapter, drop=("r",))
    model = peft_loads(llama_base, adapter)
    assert model.peft_config["default"].r == 8
    lora = ah.load(adapter)
    assert lora.config.r == 8
    assert any("no r" in w for w in lora.warnings)
    assert ah.validate(adapter, base=llama_base).ok


def test_config_without_r_and_another_rank_refused_like_peft(llama_base, llama_all_linear, copy_adapter, tmp_path):
    """Without r, PEFT builds rank-8 layers: rank-4 tensors do not load (size mismatch); validate reports the
    rank mismatch as an error and merge refuses it."""
    adapter = copy_adapter(llama_all_linear)
    set_config(adapter, drop=("r",))
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_loads(llama_base, adapter)
    report = ah.validate(adapter, base=llama_base)
    assert not report.ok
    assert "rank-mismatch" in {f.code for f in report.findings if f.severity == "error"}
    code, text = cli("merge", adapter, "--into", llama_base, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_unknown_peft_type_refused(llama_lora, copy_adapter):
    adapter = copy_adapter(llama_lora)
    set_config(adapter, peft_type="NOT_A_METHOD")
    with pytest.raises(InvalidAdapterError, match="not a PEFT method"):
        ah.load(adapter)
