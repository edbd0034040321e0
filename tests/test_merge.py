"""`merge` / `unmerge`: the streaming engine reproduces PEFT's ``merge_and_unload`` bit for bit.

The reference for every comparison is PEFT itself: the base loaded with transformers in the dtype under test,
``PeftModel.from_pretrained(...).merge_and_unload()`` and ``save_pretrained``. Our output must hold the same tensors
(same names, dtypes and bits). Logits of the merged checkpoint loaded with transformers must match the PEFT model
with the adapter active and unmerged, within the storage dtype's rounding.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import status_and_output as cli
from click.testing import CliRunner
from fixtures_models import LLAMA_KWARGS, load_base_model, randomize_adapter_weights
from peft import LoraConfig, PeftModel, get_peft_model
from peft_helpers import (
    FITTING_ADAPTERS,
    load_base,
    logits,
    lora_layers,
    randomize_embedding_lora,
    read_checkpoint,
)

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import IncompatibleBaseError, UsageError


COMPUTE = importlib.import_module("adapterhub_cli.merge.compute")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: adapter fixture -> (base fixture, task)
ADAPTERS = FITTING_ADAPTERS
#: Largest |logit difference| between the merged checkpoint and the unmerged PEFT model, relative to max |logit|.
LOGIT_RTOL = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 4e-3}
MERGE_RESULT_FIELDS = {
    "path",
    "tensors",
    "tensors_merged",
    "tensors_replaced",
    "modules",
    "shards",
    "bytes_written",
    "seconds",
    "peak_rss_mib",
    "device",
    "untied",
    "warnings",
}


# ----------------------------------------------------------------------------- helpers


def peft_merge(
    base_dir: Path,
    adapters: list[Path],
    out: Path,
    *,
    task: str = "causal-lm",
    dtype: torch.dtype | None = None,
    weights: list[float] | None = None,
) -> PeftModel:
    """PEFT's merge: load every adapter (``a0``, ``a1``, ...), scale each by its weight, ``merge_and_unload`` them in
    order and ``save_pretrained`` into ``out``. Returns the merged transformers model."""
    names = [f"a{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base_dir, task, dtype), str(adapters[0]), adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(str(adapter), adapter_name=name)
    if weights is not None:
        for layer in lora_layers(model).values():
            for name, w in zip(names, weights, strict=True):
                if name in layer.scaling:
                    layer.scaling[name] *= w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied layers in the adapter
        merged = model.merge_and_unload(adapter_names=names)
    merged.save_pretrained(out)
    return merged


def unmerged_logits(base_dir: Path, adapter: Path, task: str = "causal-lm", dtype: torch.dtype | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base_dir, task, dtype), str(adapter))
    model.eval()
    return logits(model)


def assert_same_tensors(ours: Path, ref: Path, *, only_ours: frozenset[str] = frozenset()) -> dict:
    """Every tensor present in both checkpoints is bit-identical with the same dtype; the key sets differ only by
    ``only_ours`` (tensors our output stores explicitly and transformers leaves out as tied)."""
    a, b = read_checkpoint(ours), read_checkpoint(ref)
    assert set(a) - set(b) == set(only_ours)
    assert set(b) <= set(a)
    for key in b:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), f"{key}: max |diff| {(a[key].double() - b[key].double()).abs().max()}"
    return a


def rel_max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max())


# ------------------------------------------------------------------ session fixtures


@pytest.fixture(scope="session")
def typed_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, str, str], Path]:
    """``typed_base(base_dir, task, dtype)``: the base re-saved by transformers in ``dtype`` (cached)."""
    cache: dict[tuple[Path, str], Path] = {}

    def get(base_dir: Path, task: str, dtype: str) -> Path:
        if dtype == "fp32":
            return base_dir
        if (base_dir, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"{base_dir.name}_{dtype}")
            load_base(base_dir, task, DTYPES[dtype]).save_pretrained(out)
            cache[base_dir, dtype] = out
        return cache[base_dir, dtype]

    return get


@pytest.fixture(scope="session")
def merged_pair(
    typed_base: Callable[[Path, str, str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Path, Path, str, str], tuple[Path, Path, Path]]:
    """``merged_pair(adapter, base, task, dtype)`` -> (our output, PEFT's output, the typed base) (cached)."""
    cache: dict[tuple[Path, str], tuple[Path, Path, Path]] = {}

    def get(adapter: Path, base_dir: Path, task: str, dtype: str) -> tuple[Path, Path, Path]:
        if (adapter, dtype) not in cache:
            base = typed_base(base_dir, task, dtype)
            root = tmp_path_factory.mktemp(f"merge_{adapter.name}_{dtype}")
            ah.merge(adapter, base=base, out=root / "ours")
            peft_merge(base, [adapter], root / "peft", task=task, dtype=DTYPES[dtype])
            cache[adapter, dtype] = (root / "ours", root / "peft", base)
        return cache[adapter, dtype]

    return get


@dataclass(frozen=True)
class Case:
    adapter: Path
    base: Path  # the base in the dtype under test
    ours: Path
    peft: Path
    task: str
    dtype: str


@pytest.fixture
def case(request: pytest.FixtureRequest, merged_pair) -> Callable[[str, str], Case]:
    """``case(adapter_fixture_name, dtype)``: our merge and PEFT's of that adapter into its base in ``dtype``."""

    def get(adapter_name: str, dtype: str) -> Case:
        base_name, task = ADAPTERS[adapter_name]
        adapter = request.getfixturevalue(adapter_name)
        ours, ref, base = merged_pair(adapter, request.getfixturevalue(base_name), task, dtype)
        return Case(adapter, base, ours, ref, task, dtype)

    return get


# ------------------------------------------------------------------------ equality


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_bit_identical_to_peft_merge_and_unload(adapter_name, dtype, case):
    c = case(adapter_name, dtype)
    merged = assert_same_tensors(c.ours, c.peft)
    stored = read_checkpoint(c.base)
    assert set(merged) == set(stored)
    assert all(merged[k].dtype == stored[k].dtype == DTYPES[dtype] for k in merged)
    changed = {k for k in merged if not torch.equal(merged[k], stored[k])}
    assert changed  # the adapter did something
    if adapter_name == "roberta_lora":  # modules_to_save: the saved classifier replaced the base one
        assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= changed


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_logits_match_unmerged_peft(adapter_name, dtype, case):
    c = case(adapter_name, dtype)
    model = load_base(c.ours, c.task)
    assert next(model.parameters()).dtype == DTYPES[dtype]
    got = logits(model)
    expected = unmerged_logits(c.base, c.adapter, c.task, DTYPES[dtype])
    assert rel_max_diff(got, expected) <= LOGIT_RTOL[dtype]


# ------------------------------------------------------------------- several adapters


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weighted_adapters_bit_identical_to_peft(llama_base, llama_lora, llama_rslora, typed_base, dtype, tmp_path):
    """Adapters merge in the order given, each rounding to the weight's dtype in turn, as PEFT's
    ``merge_and_unload(adapter_names=[...])`` does with each layer's ``scaling`` multiplied by the weight."""
    base = typed_base(llama_base, "causal-lm", dtype)
    adapters, weights = [llama_lora, llama_rslora], [0.7, 1.3]
    result = ah.merge(adapters, base=base, out=tmp_path / "ours", weights=weights)
    peft_merge(base, adapters, tmp_path / "peft", dtype=DTYPES[dtype], weights=weights)
    merged = assert_same_tensors(tmp_path / "ours", tmp_path / "peft")
    # q/v get both adapters, k/o only rslora: 2 layers x (2 + 4) module updates into 2 x 4 tensors
    assert (result.modules, result.tensors_merged, result.tensors) == (12, 8, len(merged))

    # the order matters only through rounding: reversed, each element moves by at most a couple of ulps
    ah.merge(adapters[::-1], base=base, out=tmp_path / "reversed", weights=weights[::-1])
    rev = read_checkpoint(tmp_path / "reversed")
    for key, t in merged.items():
        assert (rev[key].float() - t.float()).abs().max() <= 2 * torch.finfo(t.dtype).eps * t.float().abs().max(), key


# ----------------------------------------------------------------------------- sharding


def test_sharded_output_equals_single_file(llama_base, llama_base_sharded, llama_lora, tmp_path):
    single = ah.merge(llama_lora, base=llama_base, out=tmp_path / "single")
    assert single.shards == 1
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [
        ".adapters-output",  # marks an output of this tool: --overwrite replaces only those
        "README.md",  # the merged model's card (tests/test_lineage.py)
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    for side in ("config.json", "generation_config.json"):  # copied unchanged
        assert (tmp_path / "single" / side).read_bytes() == (llama_base / side).read_bytes()

    sharded = ah.merge(llama_lora, base=llama_base_sharded, out=tmp_path / "sharded", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert sharded.shards == len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    tensors = read_checkpoint(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        assert (tmp_path / "sharded" / shard).stat().st_size <= 100_000 + 4096  # tensors + header

    reference = read_checkpoint(tmp_path / "single")
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)
    torch.testing.assert_close(logits(load_base(tmp_path / "sharded")), logits(load_base(tmp_path / "single")))

    # a sharded base merged with the default shard size gives one model.safetensors and no index
    ah.merge(llama_lora, base=llama_base_sharded, out=tmp_path / "one")
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    one = read_checkpoint(tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert all(torch.equal(one[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------ dtype conversion


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("adapter_name", ["llama_lora", "gpt2_lora", "roberta_lora"])
def test_dtype_conversion_equals_peft_on_converted_base(adapter_name, dtype, case, tmp_path):
    """``dtype="bf16"`` on an fp32 base gives what PEFT gives on the base loaded in bf16."""
    fp32 = case(adapter_name, "fp32")
    result = ah.merge(fp32.adapter, base=fp32.base, out=tmp_path / "out", dtype=dtype)
    merged = assert_same_tensors(tmp_path / "out", case(adapter_name, dtype).peft)
    assert {t.dtype for t in merged.values()} == {DTYPES[dtype]}
    assert result.bytes_written < sum(p.stat().st_size for p in fp32.base.glob("*.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == str(DTYPES[dtype]).removeprefix("torch.")


def test_dtype_upcast_equals_peft_on_upcast_base(llama_base, llama_lora, typed_base, tmp_path):
    """``dtype="fp32"`` on a bf16 base: PEFT on the bf16 checkpoint loaded in float32."""
    bf16 = typed_base(llama_base, "causal-lm", "bf16")
    ah.merge(llama_lora, base=bf16, out=tmp_path / "out", dtype="fp32")
    peft_merge(bf16, [llama_lora], tmp_path / "peft", dtype=torch.float32)
    merged = assert_same_tensors(tmp_path / "out", tmp_path / "peft")
    assert {t.dtype for t in merged.values()} == {torch.float32}


def test_dtype_conversion_loads_in_new_dtype(llama_base, llama_lora, tmp_path):
    ah.merge(llama_lora, base=llama_base, out=tmp_path / "out", dtype="bf16")
    assert next(load_base(tmp_path / "out").parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------- tied embeddings


def _embedding_adapter(
    base_dir: Path, out: Path, target_modules: list[str], seed: int, save_embedding_layers: bool | str = "auto"
) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a tied layer is part of the adapter
        model = get_peft_model(load_base_model(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    randomize_adapter_weights(model, seed=seed)
    randomize_embedding_lora(model, seed=seed)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True as embedding layers found"
        model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


@pytest.fixture(scope="session")
def gpt2_wte_lora(gpt2_base: Path, models_root: Path) -> Path:
    """Embedding LoRA on GPT-2's tied ``wte`` (plus c_attn), non-zero update."""
    return _embedding_adapter(gpt2_base, models_root / "gpt2_wte_lora", ["wte", "c_attn"], seed=11)


@pytest.fixture(scope="session")
def llama_tied_base(models_root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_KWARGS, tie_word_embeddings=True))
    model.save_pretrained(models_root / "llama_tied_base")
    return models_root / "llama_tied_base"


@pytest.fixture(scope="session")
def llama_tied_head_lora(llama_tied_base: Path, models_root: Path) -> Path:
    """LoRA on ``lm_head`` (tied to embed_tokens in the base) and q_proj, saved without a copy of the head."""
    out = models_root / "llama_tied_head_lora"
    return _embedding_adapter(llama_tied_base, out, ["lm_head", "q_proj"], seed=12, save_embedding_layers=False)


@pytest.fixture(scope="session")
def llama_embed_head_lora(llama_base: Path, models_root: Path) -> Path:
    """LoRA on embed_tokens, lm_head and q_proj of the untied llama, saved as PEFT does by default: with copies
    of both base layers (``*.base_layer.weight``)."""
    out = _embedding_adapter(
        llama_base, models_root / "llama_embed_head_lora", ["embed_tokens", "lm_head", "q_proj"], 13
    )
    saved = set(ah.load(out).extra_tensors)
    assert saved == {"lm_head.base_layer.weight", "model.embed_tokens.base_layer.weight"}
    return out


def test_tied_gpt2_embedding_adapter_unties_head(gpt2_base, gpt2_wte_lora, tmp_path):
    base = read_checkpoint(gpt2_base)
    assert "lm_head.weight" not in base and json.loads((gpt2_base / "config.json").read_text())["tie_word_embeddings"]
    result = ah.merge(gpt2_wte_lora, base=gpt2_base, out=tmp_path / "ours")
    assert result.untied == ["lm_head.weight"] and result.warnings
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False

    peft_merged = peft_merge(gpt2_base, [gpt2_wte_lora], tmp_path / "peft")
    ours = assert_same_tensors(tmp_path / "ours", tmp_path / "peft", only_ours=frozenset({"lm_head.weight"}))
    assert torch.equal(ours["lm_head.weight"], base["transformer.wte.weight"])  # the head keeps the original
    assert not torch.equal(ours["transformer.wte.weight"], base["transformer.wte.weight"])  # the input side moved

    expected = unmerged_logits(gpt2_base, gpt2_wte_lora)
    model = load_base(tmp_path / "ours")
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert rel_max_diff(logits(model), expected) <= LOGIT_RTOL["fp32"]
    # PEFT's own merge_and_unload adds the embedding update to the shared tensor, so its head moves too
    assert torch.equal(peft_merged.lm_head.weight, peft_merged.transformer.wte.weight)
    assert rel_max_diff(logits(peft_merged), expected) > 100 * LOGIT_RTOL["fp32"]


def test_tied_head_adapter_passes_validation(llama_tied_base, llama_tied_head_lora, tmp_path):
    ah.merge(llama_tied_head_lora, base=llama_tied_base, out=tmp_path / "ours")


def test_tied_llama_head_adapter_leaves_embedding(llama_tied_base, llama_tied_head_lora, tmp_path):
    base = read_checkpoint(llama_tied_base)
    assert "lm_head.weight" not in base
    result = ah.merge(llama_tied_head_lora, base=llama_tied_base, out=tmp_path / "ours")
    assert result.untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False
    ours = read_checkpoint(tmp_path / "ours")
    embed = base["model.embed_tokens.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"], embed)

    peft_merged = peft_merge(llama_tied_base, [llama_tied_head_lora], tmp_path / "peft")
    # lm_head = embed + the head's update, with PEFT's arithmetic (PEFT writes it into the shared tensor)
    assert torch.equal(ours["lm_head.weight"], peft_merged.lm_head.weight.detach())
    assert not torch.equal(ours["lm_head.weight"], embed)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ours[q0], read_checkpoint(tmp_path / "peft")[q0])

    expected = unmerged_logits(llama_tied_base, llama_tied_head_lora)
    assert rel_max_diff(logits(load_base(tmp_path / "ours")), expected) <= LOGIT_RTOL["fp32"]
    # PEFT's merge changes the (shared) input embedding too
    assert rel_max_diff(logits(peft_merged), expected) > 100 * LOGIT_RTOL["fp32"]


def test_embedding_and_head_adapter_with_saved_base_layers(llama_base, llama_embed_head_lora, tmp_path):
    ah.merge(llama_embed_head_lora, base=llama_base, out=tmp_path / "ours")
    peft_merge(llama_base, [llama_embed_head_lora], tmp_path / "peft")
    assert_same_tensors(tmp_path / "ours", tmp_path / "peft")
    expected = unmerged_logits(llama_base, llama_embed_head_lora)
    assert rel_max_diff(logits(load_base(tmp_path / "ours")), expected) <= LOGIT_RTOL["fp32"]


# ---------------------------------------------------------------------------------- unmerge


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t.dtype`` at each element's magnitude (one unit in the last place), as float32."""
    _, exp = torch.frexp(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny))
    return torch.ldexp(torch.full(t.shape, torch.finfo(t.dtype).eps), exp - 1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("adapter_name", ["llama_lora", "gpt2_lora"])
def test_unmerge_gives_base_back(adapter_name, dtype, case, tmp_path):
    c = case(adapter_name, dtype)
    result = ah.unmerge(c.adapter, merged=c.ours, out=tmp_path / "back")
    back, base, merged = read_checkpoint(tmp_path / "back"), read_checkpoint(c.base), read_checkpoint(c.ours)
    assert set(back) == set(base) and result.tensors_merged > 0
    touched = {k for k in base if not torch.equal(merged[k], base[k])}
    assert result.tensors_merged == len(touched)
    for k in set(base) - touched:
        assert torch.equal(back[k], base[k])

    # PEFT's own round trip (merge_adapter, unmerge_adapter) gives the same bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(c.base, c.task, DTYPES[dtype]), str(c.adapter))
    model.merge_adapter()
    model.unmerge_adapter()
    state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    worst_abs, worst_ulps = 0.0, 0.0
    for k in touched:
        assert back[k].dtype == base[k].dtype
        assert torch.equal(back[k], state[k]), k
        # not exact even in fp32: W + d and (W + d) - d each round once; measure in units in the last place of
        # the larger of |W| and |W + d| (the rounding happens at that magnitude)
        error = (back[k].double() - base[k].double()).abs()
        magnitude = torch.maximum(base[k].abs(), merged[k].abs())
        worst_abs = max(worst_abs, float(error.max()))
        worst_ulps = max(worst_ulps, float((error / ulp(magnitude)).max()))
    print(f"unmerge {adapter_name} {dtype}: largest |error| {worst_abs:.3g} = {worst_ulps:.2f} ulp")
    assert worst_ulps <= 1.5


def test_unmerge_dora_is_refused(llama_base, llama_dora, case, tmp_path):
    merged = case("llama_dora", "fp32").ours
    with pytest.raises(UsageError, match="DoRA"):
        ah.unmerge(llama_dora, merged=merged, out=tmp_path / "back")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ validation


def test_misfit_is_refused_before_anything_is_written(llama_base, llama_lora_wide, tmp_path):
    with pytest.raises(IncompatibleBaseError, match="shape-mismatch"):
        ah.merge(llama_lora_wide, base=llama_base, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ CLI


def test_cli_merge_json_and_unmerge(llama_base, llama_lora, tmp_path):
    result = CliRunner().invoke(
        build_cli(), ["merge", str(llama_lora), "--into", str(llama_base), "-o", str(tmp_path / "m"), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == MERGE_RESULT_FIELDS
    assert data["path"] == str(tmp_path / "m")
    assert (data["modules"], data["tensors_merged"], data["tensors_replaced"], data["shards"]) == (4, 4, 0, 1)
    assert data["tensors"] == len(read_checkpoint(llama_base)) and data["device"] == "cpu"
    assert data["bytes_written"] == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert data["untied"] == [] and data["warnings"] == []

    result = CliRunner().invoke(
        build_cli(),
        ["unmerge", str(llama_lora), "--from", str(tmp_path / "m"), "-o", str(tmp_path / "back"), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors_merged"] == 4


def test_cli_merge_human_output_and_weights(llama_base, llama_lora, llama_rslora, tmp_path):
    code, output = cli(
        "merge", llama_lora, llama_rslora, "--into", llama_base, "-o", tmp_path / "m", "--weights", "0.7,1.3"
    )
    assert code == 0, output
    assert "merged 12 module updates into 8 tensors" in output
    assert str(tmp_path / "m") in output and "1 shard(s)" in output
    ah.merge([llama_lora, llama_rslora], base=llama_base, out=tmp_path / "api", weights=[0.7, 1.3])
    a, b = read_checkpoint(tmp_path / "m"), read_checkpoint(tmp_path / "api")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "0.5,1"], "one weight per adapter"),
        (["--weights", "half"], "comma-separated numbers"),
        (["--dtype", "int8"], "int8"),
        (["--max-shard-size", "lots"], "bad size"),
        (["--device", "tpu"], "unknown device"),
        (["--device", "mps"], "cpu or cuda only"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
        (["--device", "cuda:99"], "cuda:99"),
    ],
)
def test_cli_bad_arguments_exit_2(llama_base, llama_lora, tmp_path, args, message):
    code, output = cli("merge", llama_lora, "--into", llama_base, "-o", tmp_path / "m", *args)
    assert code == 2 and message in output and "Traceback" not in output
    assert not (tmp_path / "m").exists()


def test_cli_bad_input_exit_2(llama_base, llama_lora, llama_lora_wide, llama_dora, tmp_path):
    code, output = cli("merge", llama_lora_wide, "--into", llama_base, "-o", tmp_path / "m")
    assert code == 2 and "shape-mismatch" in output and "Traceback" not in output
    code, output = cli("merge", llama_lora, "--into", tmp_path / "nowhere", "-o", tmp_path / "m")
    assert code == 2 and "not found" in output
    code, output = cli("merge", llama_lora, "--into", llama_base, "-o", llama_base)
    assert code == 2 and "base folder" in output
    ah.merge(llama_dora, base=llama_base, out=tmp_path / "dora")
    code, output = cli("unmerge", llama_dora, "--from", tmp_path / "dora", "-o", tmp_path / "back")
    assert code == 2 and "DoRA" in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora"]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_threaded_row_split_is_bit_identical_to_one_call(fan_in_fan_out):
    from lora_ops import merge_lora

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 1500, generator=g), torch.randn(3000, 16, generator=g) * 0.01
    w = (torch.randn(1500, 3000, generator=g) if fan_in_fan_out else torch.randn(3000, 1500, generator=g)).bfloat16()
    merger = COMPUTE._Merger([], "cpu", workers=2)
    try:
        got = merger._merge_lora(w.clone(), a, b, 1.7, fan_in_fan_out, merge_lora)  # in place: w stays as is
    finally:
        merger.close()
    assert torch.equal(got, merge_lora(w, a, b, 1.7, fan_in_fan_out=fan_in_fan_out))


def test_block_sums_that_overflow_on_finite_values_fall_back_to_the_element_wise_check():
    """A sum can overflow on large finite values: require_finite then checks element by element (passes), and a
    real NaN behind non-finite sums is refused."""
    import torch

    from adapterhub_cli.errors import InvalidAdapterError
    from adapterhub_cli.merge.compute import require_finite
    from adapterhub_cli.merge.plan import TensorPlan

    p = TensorPlan(name="w", source="w", dtype="BF16", shape=(2, 2))
    big = torch.full((2, 2), 3e38, dtype=torch.bfloat16)  # finite; its sum is not
    require_finite(big, p, [], base_dtype="BF16", sums=[float("inf")])
    require_finite(big, p, [], base_dtype="BF16", sums=[1.0])  # finite sums: no further pass
    bad = big.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InvalidAdapterError, match="NaN or inf"):
        require_finite(bad, p, [], base_dtype="BF16", sums=[float("nan")])
