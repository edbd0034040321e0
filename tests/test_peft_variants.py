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
import torch
from cli_helpers import status_and_output as cli
from fixtures_models import build_lora_adapter, load_base_model
from peft import PeftModel
from peft_helpers import load_base, read_checkpoint

import adapterhub_cli as ah
from adapterhub_cli.errors import AdaptersError, InvalidAdapterError


CONFIG = "adapter_config.json"


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


# ------------------------------------------------------------------------------------------ 2. lora_bias


def peft_merged_tensors(base: Path, adapter: Path, task: str, dtype: torch.dtype, out: Path) -> dict:
    """PEFT's reference: the base in ``dtype``, the adapter loaded, ``merge_and_unload()``, ``save_pretrained``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base, task, dtype), str(adapter))
        model.merge_and_unload().save_pretrained(out)
    return read_checkpoint(out)


@pytest.fixture(scope="module")
def bias_adapters(llama_base, gpt2_base, roberta_base, tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """lora_bias=True adapters saved by PEFT: name -> (adapter, base, task)."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("lora_bias")
    specs = {
        "roberta": (
            roberta_base,
            "seq-cls",
            LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", lora_bias=True),
        ),
        "gpt2": (
            gpt2_base,
            "causal-lm",
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True),
        ),
        "llama": (
            llama_base,
            "causal-lm",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
        ),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llama: "the targeted layer has no bias"
        for name, (base, task, config) in specs.items():
            out[name] = (build_lora_adapter(base, root / name, config, seed=21, task=task), base, task)
    return out


def test_lora_bias_read_as_the_bias_of_lora_b(bias_adapters):
    adapter, base, task = bias_adapters["roberta"]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        bias_keys = [k for k in f.keys() if k.endswith("lora_B.bias")]
    assert len(bias_keys) == 4  # query and value in 2 layers
    lora = ah.load(adapter)
    assert len(lora.modules) == 4
    model = peft_loads(base, adapter, task)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_B")}
    for name, m in lora.modules.items():
        assert m.bias is not None and m.bias.shape == (m.d_out,)
        assert torch.equal(lora.tensor(m.bias.name), layers[name].lora_B["default"].bias.detach())
    assert not any("lora_" in k for k in lora.extra_tensors)  # only the classifier (modules_to_save)


def test_lora_bias_shown_by_inspect(bias_adapters):
    adapter, _, _ = bias_adapters["roberta"]
    report = ah.inspect(adapter, modules=True)
    assert report.lora_bias is True
    stored = read_checkpoint(adapter)
    assert report.num_parameters == sum(t.numel() for t in stored.values())  # the biases are counted once
    code, text = cli("inspect", adapter, "--modules", "--no-hash")
    assert code == 0, text
    assert "lora_B has a bias" in text
    code, text = cli("inspect", adapter, "--json", "--no-hash")
    assert code == 0 and json.loads(text)["lora_bias"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["roberta", "gpt2"])
def test_lora_bias_merge_bit_identical_to_peft(bias_adapters, name, dtype, tmp_path):
    """merge adds scale * lora_B.bias to each layer's bias, bit for bit as PEFT's merge_and_unload."""
    adapter, base, task = bias_adapters[name]
    typed = tmp_path / "base"
    load_base(base, task, dtype).save_pretrained(typed)
    ref = peft_merged_tensors(typed, adapter, task, dtype, tmp_path / "peft")
    ah.merge(adapter, base=typed, out=tmp_path / "ours")
    ours = read_checkpoint(tmp_path / "ours")
    assert set(ref) <= set(ours)
    changed = 0
    base_tensors = read_checkpoint(typed)
    for key, t in ref.items():
        assert ours[key].dtype == t.dtype, key
        assert torch.equal(ours[key], t), key
        targeted = key.endswith(("query.bias", "value.bias", "c_attn.bias"))
        changed += targeted and not torch.equal(t, base_tensors[key])
    assert changed == (4 if name == "roberta" else 2)  # every targeted layer's bias moved


def test_lora_bias_unmerge_gives_base_back(bias_adapters, tmp_path):
    adapter, base, _ = bias_adapters["roberta"]
    ah.merge(adapter, base=base, out=tmp_path / "merged")
    ah.unmerge(adapter, merged=tmp_path / "merged", out=tmp_path / "back")
    back, orig = read_checkpoint(tmp_path / "back"), read_checkpoint(base)
    for key in orig:
        if key.endswith(("query.bias", "value.bias")):
            assert torch.allclose(back[key], orig[key], atol=1e-6), key


def test_lora_bias_on_layers_without_bias_refused_like_peft(bias_adapters, tmp_path):
    adapter, base, task = bias_adapters["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_loads(base, adapter, task)
        with pytest.raises(RuntimeError, match="base layer has no bias"):
            model.merge_and_unload()
    code, text = cli("merge", adapter, "--into", base, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in text
    assert "base layer has no bias" in " ".join(text.split())
    assert not (tmp_path / "out").exists()


def test_lora_bias_reduce_keeps_the_bias_term(bias_adapters, tmp_path):
    """reduce keeps lora_B.bias, rescaled so PEFT's bias term scale * bias is unchanged at the new rank."""
    adapter, base, task = bias_adapters["roberta"]
    ah.reduce(adapter, out=tmp_path / "r2", rank=2)
    before, after = peft_loads(base, adapter, task), peft_loads(base, tmp_path / "r2", task)

    def terms(model: PeftModel) -> dict[str, torch.Tensor]:
        return {
            n: m.lora_B["default"].bias.detach().double() * m.scaling["default"]
            for n, m in model.named_modules()
            if hasattr(m, "lora_B") and "default" in m.lora_B
        }

    t0, t1 = terms(before), terms(after)
    assert set(t0) == set(t1) and len(t0) == 4
    for n in t0:
        assert after.get_submodule(n).lora_A["default"].weight.shape[0] == 2
        assert torch.allclose(t0[n], t1[n], rtol=1e-6, atol=0), n


def test_lora_bias_combine_refused_by_name(bias_adapters, tmp_path):
    adapter, _, _ = bias_adapters["roberta"]
    with pytest.raises(AdaptersError, match="lora_bias"):
        ah.combine([adapter, adapter], out=tmp_path / "c", weights=[0.5, 0.5])
    code, text = cli("combine", adapter, adapter, "-o", tmp_path / "c")
    assert code == 2 and "lora_bias" in text and "Traceback" not in text
    assert not (tmp_path / "c").exists()


def test_lora_bias_with_dora_refused_like_peft(llama_dora, copy_adapter):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="not supported for DoRA"):
        LoraConfig(use_dora=True, lora_bias=True)
    adapter = copy_adapter(llama_dora)
    set_config(adapter, lora_bias=True)
    with pytest.raises(InvalidAdapterError, match="not supported for DoRA"):
        ah.load(adapter)


# ------------------------------------------------------------------------------ 3. aLoRA, layer_replication


def build(base: Path, out: Path, task: str = "causal-lm", **kwargs: Any) -> Path:
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_lora_adapter(base, out, LoraConfig(**kwargs), seed=31, task=task)


def test_alora_shown_by_inspect_and_merge_refused_like_peft(llama_base, tmp_path):
    adapter = build(
        llama_base,
        tmp_path / "alora",
        r=4,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        alora_invocation_tokens=[5, 6],
    )
    model = peft_loads(llama_base, adapter)
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        model.merge_and_unload()
    report = ah.inspect(adapter)
    assert report.alora_invocation_tokens == [5, 6]
    code, text = cli("inspect", adapter, "--no-hash")
    assert code == 0 and "aLoRA" in text and "[5, 6]" in text
    code, text = cli("merge", adapter, "--into", llama_base, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in text
    assert "aLoRA does not support merging" in " ".join(text.split())
    assert not (tmp_path / "out").exists()


def test_layer_replication_merge_refused_as_peft_means_to(llama_base, tmp_path):
    """PEFT's LoraModel._check_merge_allowed means to refuse ("Cannot merge LORA layers when base model layers are
    replicated"), but peft 0.21 reads the flag from the wrong dict and merges: the replicated layers share their
    base weights, so each copy's update lands in every copy and the merged model is not the adapted one."""
    from peft_helpers import logits

    adapter = build(llama_base, tmp_path / "rep", r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    model = peft_loads(llama_base, adapter)
    adapted = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    assert not torch.allclose(logits(merged), adapted, atol=1e-4)
    code, text = cli("merge", adapter, "--into", llama_base, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in text
    assert "layers are replicated" in " ".join(text.split())
    assert not (tmp_path / "out").exists()
    code, text = cli("merge", adapter, "--into", llama_base, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in text
    assert "layers are replicated" in " ".join(text.split())
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 4. trainable_token_indices


def perturb_tokens(adapter: Path) -> None:
    """Move the saved token rows away from the base's (PEFT saves them as initialised: copies of the originals)."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    gen = torch.Generator().manual_seed(5)
    for k, t in tensors.items():
        if k.endswith("trainable_tokens_delta"):
            tensors[k] = t + 0.1 * torch.randn(t.shape, generator=gen)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainable_tokens_merge_bit_identical_to_peft(llama_base, dtype, tmp_path):
    """merge replaces the trained embedding rows (PEFT's TrainableTokensLayer.merge) and adds the LoRA updates."""
    adapter = build(llama_base, tmp_path / "tt", r=4, target_modules=["q_proj"], trainable_token_indices=[5, 3, 9])
    perturb_tokens(adapter)
    typed = tmp_path / "base"
    load_base(llama_base, "causal-lm", dtype).save_pretrained(typed)
    ref = peft_merged_tensors(typed, adapter, "causal-lm", dtype, tmp_path / "peft")
    ah.merge(adapter, base=typed, out=tmp_path / "ours")
    ours, orig = read_checkpoint(tmp_path / "ours"), read_checkpoint(typed)
    assert set(ref) <= set(ours)
    for key, t in ref.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    emb = "model.embed_tokens.weight"
    changed = (ours[emb] != orig[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 5, 9]


def test_trainable_tokens_unmerge_refused(llama_base, tmp_path):
    adapter = build(llama_base, tmp_path / "tt", r=4, target_modules=["q_proj"], trainable_token_indices=[5, 3])
    ah.merge(adapter, base=llama_base, out=tmp_path / "merged")
    code, text = cli("unmerge", adapter, "--from", tmp_path / "merged", "-o", tmp_path / "back")
    assert code == 2 and "Traceback" not in text and "trainable_token_indices" in text
    assert not (tmp_path / "back").exists()


# ----------------------------------------------------------------------------------------------- 5. BD-LoRA


def test_bdlora_refused_by_name(llama_base, tmp_path):
    from peft.tuners.lora.config import BdLoraConfig

    bd = BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
    adapter = build(llama_base, tmp_path / "bd", r=4, target_modules=["q_proj", "o_proj"], use_bdlora=bd)
    peft_loads(llama_base, adapter)  # PEFT loads it: its q_proj lora_B holds only the diagonal blocks
    assert_refused_everywhere(adapter, llama_base, tmp_path / "out", ["BD-LoRA", "block-diagonal"])


# -------------------------------------------------------------- 5. exclude_modules, layers_to_transform, ...


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        {"target_modules": ["q_proj", "up_proj"], "exclude_modules": r".*layers\.1\..*"},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]},
        {"target_modules": ["q_proj", "model.layers.1.self_attn.k_proj"], "layers_to_transform": [0]},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": ["lm_head", "q_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=lambda kw: "-".join(f"{k}" for k in kw),
)
def test_targets_select_what_peft_selects(llama_base, kwargs, tmp_path):
    """For every module of the base, ``AdapterConfig.targets`` agrees with PEFT's check_target_module_exists, and
    the adapter PEFT saves with that config holds exactly the modules both select."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from adapterhub_cli.artifact.config import AdapterConfig

    peft_config = LoraConfig(r=4, **kwargs)
    adapter = build(llama_base, tmp_path / "a", r=4, **kwargs)
    ours = AdapterConfig.from_dict(json.loads((adapter / CONFIG).read_text()))
    names = [n for n, _ in load_base_model(llama_base).named_modules() if n]
    for name in names:
        assert ours.targets(name) == bool(check_target_module_exists(peft_config, name)), name
    lora = ah.load(adapter)
    assert set(lora.modules) == {n for n in names if ours.targets(n)}


def test_layer_replication_modules_map_to_the_base_layers_peft_uses(llama_base, tmp_path):
    """With layer_replication, adapter module ``layers.i`` sits on base layer ``stacked[i]``: ``base_module``
    names the base weight PEFT's replicated layer shares, and every module has one (no false module-missing)."""
    ranges = [[0, 2], [1, 2]]
    adapter = build(llama_base, tmp_path / "rep", r=4, target_modules=["q_proj", "v_proj"], layer_replication=ranges)
    lora = ah.load(adapter)
    base = read_checkpoint(llama_base)
    assert any(".layers.2." in n for n in lora.modules)  # a layer the base does not have
    model = peft_loads(llama_base, adapter)
    for name in lora.modules:
        source = lora.config.base_module(name)
        assert source + ".weight" in base, name
        peft_weight = model.base_model.model.get_submodule(name).base_layer.weight.detach()
        assert torch.equal(peft_weight, base[source + ".weight"]), name
    report = ah.inspect(adapter)
    assert report.layer_replication == ranges
    code, text = cli("inspect", adapter, "--no-hash")
    assert code == 0 and "layer_replication" in text


def test_trainable_tokens_shown_by_inspect(llama_base, tmp_path):
    adapter = build(llama_base, tmp_path / "tt", r=4, target_modules=["q_proj"], trainable_token_indices=[5, 3])
    assert ah.inspect(adapter).trainable_token_indices == [5, 3]
    code, text = cli("inspect", adapter, "--no-hash")
    assert code == 0 and "trainable tokens" in text and "[5, 3]" in text


def test_old_keys_ignored_like_peft(llama_base, llama_lora, copy_adapter):
    """merge_weights and an all-true enable_lora (PEFT < 0.4) are ignored by today's PEFT: loaded, with a warning."""
    adapter = copy_adapter(llama_lora)
    set_config(adapter, merge_weights=True, enable_lora=[True, True, True])
    peft_loads(llama_base, adapter)
    lora = ah.load(adapter)
    assert any("merge_weights" in w and "enable_lora" in w for w in lora.warnings)
    assert ah.validate(adapter, base=llama_base).ok


def test_partial_enable_lora_refused_by_name(llama_base, llama_lora, copy_adapter, tmp_path):
    adapter = copy_adapter(llama_lora)
    set_config(adapter, enable_lora=[True, False, True])
    assert_refused_everywhere(adapter, llama_base, tmp_path / "out", ["enable_lora", "MergedLinear"])


def test_megatron_config_named(llama_lora, copy_adapter):
    adapter = copy_adapter(llama_lora)
    set_config(adapter, megatron_config={"tensor_model_parallel_size": 2}, megatron_core="megatron.core")
    assert any("megatron_config" in w for w in ah.load(adapter).warnings)


def test_combine_refuses_mixed_alora_and_lora(llama_base, llama_lora, tmp_path):
    """aLoRA acts only after its invocation tokens: it cannot be blended with a plain LoRA (or another aLoRA with
    other tokens); two aLoRAs with the same tokens combine, and the output keeps the tokens (PEFT loads it)."""
    kwargs: dict[str, Any] = {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    a1 = build(llama_base, tmp_path / "a1", alora_invocation_tokens=[5, 6], **kwargs)
    a2 = build(llama_base, tmp_path / "a2", alora_invocation_tokens=[7], **kwargs)
    code, text = cli("combine", a1, llama_lora, "-o", tmp_path / "c")
    assert code == 2 and "alora_invocation_tokens" in text and "Traceback" not in text
    code, text = cli("combine", a1, a2, "-o", tmp_path / "c")
    assert code == 2 and "alora_invocation_tokens" in text
    assert not (tmp_path / "c").exists()
    ah.combine([a1, a1], out=tmp_path / "same", weights=[0.5, 0.5])
    assert ah.inspect(tmp_path / "same").alora_invocation_tokens == [5, 6]
    peft_loads(llama_base, tmp_path / "same")


def test_reduce_keeps_alora_and_trainable_tokens(llama_base, tmp_path):
    """reduce keeps aLoRA's invocation tokens and the trainable token rows: PEFT loads the outputs, with the same
    tokens and the same rows."""
    alora = build(
        llama_base,
        tmp_path / "alora",
        r=4,
        target_modules=["q_proj"],
        task_type="CAUSAL_LM",
        alora_invocation_tokens=[5, 6],
    )
    ah.reduce(alora, out=tmp_path / "alora2", rank=2)
    assert peft_loads(llama_base, tmp_path / "alora2").peft_config["default"].alora_invocation_tokens == [5, 6]
    tokens = build(llama_base, tmp_path / "tt", r=4, target_modules=["q_proj"], trainable_token_indices=[5, 3])
    perturb_tokens(tokens)
    ah.reduce(tokens, out=tmp_path / "tt2", rank=2)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert torch.equal(read_checkpoint(tmp_path / "tt2")[key], read_checkpoint(tokens)[key])
    model = peft_loads(llama_base, tmp_path / "tt2")
    assert model.peft_config["default"].trainable_token_indices == [5, 3]


@pytest.mark.parametrize(
    ("adapter", "base", "wrong"),
    [("llama_lora", "llama_base", True), ("gpt2_lora", "gpt2_base", False)],
    ids=["linear-flag-true", "conv1d-flag-false"],
)
def test_a_wrong_fan_in_fan_out_merges_as_peft_corrects_it(request, copy_adapter, tmp_path, adapter, base, wrong):
    """PEFT sets fan_in_fan_out to False for a torch.nn.Linear and to True for a Conv1D, whatever the config says
    (with a warning); shapes cannot tell for a square weight (Llama's q_proj / o_proj, GPT-2's attention c_proj),
    so the merge takes the layer's class from the base's model type, as PEFT sees it. validate warns."""
    base_dir: Path = request.getfixturevalue(base)
    d = copy_adapter(request.getfixturevalue(adapter), f"fifo-{adapter}")
    set_config(d, fan_in_fan_out=wrong)
    report = ah.validate(d, base=base_dir)
    assert report.ok and any(f.code == "fan-in-fan-out" for f in report.findings)
    ours = read_checkpoint(ah.merge(d, base=base_dir, out=tmp_path / "ours").path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_merged_tensors(base_dir, d, "causal-lm", torch.float32, tmp_path / "peft")
    square = 0
    for key, t in theirs.items():
        assert torch.equal(ours[key], t), key
        square += t.dim() == 2 and t.shape[0] == t.shape[1] and not key.endswith(("wte.weight", "embed_tokens.weight"))
    assert square  # (a square weight was among those merged)
