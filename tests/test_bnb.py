"""bitsandbytes checkpoints: layout, logical view, bit-exact dequantization, quantized output transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


bnb = pytest.importorskip("bitsandbytes")

from bnb_fixtures import SCHEMES, build_tiny_llama, dict_view, load_quantized, write_checkpoint  # noqa: E402
from safetensors import safe_open  # noqa: E402

from adapterhub_cli.artifact.checkpoint import open_base  # noqa: E402
from adapterhub_cli.artifact.safetensors import read_header  # noqa: E402
from adapterhub_cli.errors import CorruptFileError, InvalidAdapterError, UsageError  # noqa: E402
from adapterhub_cli.merge import bnb as B  # noqa: E402


SCHEME_OF = {"nf4": "nf4", "nf4dq": "nf4", "fp4": "fp4", "int8": "int8"}
DOUBLE = {"nf4": False, "nf4dq": True, "fp4": False, "int8": False}


class _Models:
    """The tiny bf16 base and its transformers-quantized saves, built once; loaded models cached."""

    def __init__(self, root: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.base = build_tiny_llama(root / "base")
        self.saved: dict[str, Path] = {}
        self._loaded: dict[str, object] = {}
        for name in SCHEMES:
            model = load_quantized(self.base, name)
            model.save_pretrained(root / name)
            self.saved[name] = root / name
        self._auto = AutoModelForCausalLM

    def loaded(self, name: str):
        """The quantized save loaded back by transformers (no forward run: CPU forwards may repack 4-bit data)."""
        if name not in self._loaded:
            self._loaded[name] = self._auto.from_pretrained(self.saved[name], device_map="cpu")
        return self._loaded[name]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> _Models:
    return _Models(tmp_path_factory.mktemp("bnb"))


def _reader(path: Path):
    handle = safe_open(str(path / "model.safetensors"), "pt")
    return handle.get_tensor


def _reference(model, key: str, name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of the layer transformers loaded."""
    weight = model.get_submodule(key.removesuffix(".weight")).weight
    if name == "int8":
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


# ----------------------------------------------------------------------------- reading transformers' files


@pytest.mark.parametrize("name", list(SCHEMES))
def test_config_and_layout(models, name):
    view = open_base(models.saved[name])
    scheme = SCHEME_OF[name]
    assert B.bnb_scheme(view.config) == scheme
    assert B.bnb_scheme(open_base(models.base).config) is None
    assert view.config["quantization_config"] == B.quantization_config(scheme, "bfloat16", double_quant=DOUBLE[name])
    comps = B.companions(view)
    key = "model.layers.0.mlp.down_proj.weight"  # (128, 256): 32768 values, 512 blocks of 64
    if scheme == "int8":
        assert comps[key] == ["model.layers.0.mlp.down_proj.SCB", "model.layers.0.mlp.down_proj.weight_format"]
        assert view.tensors[key].dtype == "I8" and view.tensors[key].shape == (128, 256)
        assert view.tensors["model.layers.0.mlp.down_proj.SCB"].shape == (128,)
        assert view.tensors["model.layers.0.mlp.down_proj.weight_format"].shape == ()
    else:
        planned = B.planned_entries(key, (128, 256), scheme, compute_dtype=torch.bfloat16, double_quant=DOUBLE[name])
        assert sorted([key, *comps[key]]) == sorted(k for k, _, _ in planned)
        for stored_key, dtype, shape in planned:
            info = view.tensors[stored_key]
            if ".quant_state." in stored_key:  # transformers' blob length varies with nested_offset's digits
                assert info.dtype == "U8" and len(info.shape) == 1
            else:
                assert (info.dtype, info.shape) == (dtype, shape), stored_key
    assert all(view.tensors[k].dtype == "BF16" for k in ("lm_head.weight", "model.embed_tokens.weight"))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_logical_view_matches_bf16_original(models, name):
    original = open_base(models.base)
    stored = open_base(models.saved[name])
    logical = B.logical_view(stored)
    assert {k: (t.dtype, t.shape) for k, t in logical.tensors.items()} == {
        k: (t.dtype, t.shape) for k, t in original.tensors.items()
    }
    assert set(logical.shard_of) == set(logical.tensors)
    assert all(p == models.saved[name] / "model.safetensors" for p in logical.shard_of.values())
    assert logical.module_names() == original.module_names()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_is_bit_identical_to_bitsandbytes(models, name):
    view = open_base(models.saved[name])
    logical = B.logical_view(view)
    model = models.loaded(name)
    load = _reader(models.saved[name])
    comps = B.companions(view)
    assert len(comps) == 14  # 7 linear layers x 2
    for key in comps:
        ours = B.dequantize_weight(load, key, view)
        ref = _reference(model, key, name)
        if name == "int8":  # bitsandbytes returns float32; the logical dtype is the model's
            ref = ref.to(torch.bfloat16)
        assert ours.dtype == ref.dtype == torch.bfloat16
        assert tuple(ours.shape) == logical.tensors[key].shape
        assert torch.equal(ours.view(torch.int16), ref.view(torch.int16)), key  # bits, signed zeros included


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_requantizing_a_dequantized_weight_reproduces_the_stored_tensors(models, name):
    view = open_base(models.saved[name])
    load = _reader(models.saved[name])
    for key in B.companions(view):
        weight = B.dequantize_weight(load, key, view)
        again = B.quantize_weight(weight, key, SCHEME_OF[name], compute_dtype=torch.bfloat16)
        for stored_key, t in again.items():
            assert torch.equal(t, load(stored_key)), stored_key


def test_fp4_round_trip_differs_only_in_the_sign_of_zero(models):
    """fp4 has codes for +0 and -0; a dequantized -0 requantizes to +0, so codes move but values do not,
    and the second round trip is exact."""
    view = open_base(models.saved["fp4"])
    load = _reader(models.saved["fp4"])
    for key in B.companions(view):
        weight = B.dequantize_weight(load, key, view)
        once = B.quantize_weight(weight, key, "fp4", compute_dtype=torch.bfloat16)
        stored = load(key).view(-1)
        moved = once[key].view(-1) ^ stored
        assert bool(((moved & 0x77) == 0).all())  # only bit 3 of a nibble: code 8 (-0) <-> code 0 (+0)
        assert torch.equal(once[key + ".absmax"], load(key + ".absmax"))
        back = B.dequantize_weight(once.__getitem__, key, dict_view(once))
        assert torch.equal(back, weight)
        twice = B.quantize_weight(back, key, "fp4", compute_dtype=torch.bfloat16)
        assert all(torch.equal(twice[k], once[k]) for k in once)


def test_double_quant_round_trip_keeps_codes_and_moves_values_slightly(models):
    """The per-block absmax is re-derived from rounded values and re-quantized to 8 bits, so the nested state
    changes a little; the 4-bit codes do not."""
    view = open_base(models.saved["nf4dq"])
    load = _reader(models.saved["nf4dq"])
    for key in B.companions(view):
        weight = B.dequantize_weight(load, key, view)
        again = B.quantize_weight(weight, key, "nf4", compute_dtype=torch.bfloat16, double_quant=True)
        assert torch.equal(again[key], load(key))
        stored_state = json.loads(bytes(load(key + ".quant_state.bitsandbytes__nf4").tolist()))
        new_state = json.loads(bytes(again[key + ".quant_state.bitsandbytes__nf4"].tolist()))
        assert set(new_state) == set(stored_state)
        assert {k: v for k, v in new_state.items() if k != "nested_offset"} == {
            k: v for k, v in stored_state.items() if k != "nested_offset"
        }
        back = B.dequantize_weight(again.__getitem__, key, dict_view(again))
        assert float((back.float() - weight.float()).norm() / weight.float().norm()) < 3e-3


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128), (5, 7), (300, 70)])
def test_planned_entries_match_quantize_weight(scheme, double_quant, dtype, shape):
    if scheme == "int8" and double_quant:
        with pytest.raises(UsageError, match="4-bit"):
            B.planned_entries("m.weight", shape, scheme, compute_dtype=dtype, double_quant=True)
        return
    planned = B.planned_entries("m.weight", shape, scheme, compute_dtype=dtype, double_quant=double_quant)
    names = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32"}
    torch.manual_seed(1)
    for scale in (1e-30, 0.02, 3e3, 0.0):  # the nested offset's digits vary with the data; the plan must not
        w = torch.randn(shape) * scale
        out = B.quantize_weight(w, "m.weight", scheme, compute_dtype=dtype, double_quant=double_quant)
        assert [(k, names[t.dtype], tuple(t.shape)) for k, t in out.items()] == planned


@pytest.mark.parametrize("name", ["nf4", "nf4dq", "int8"])
def test_quantized_folder_loads_in_transformers(models, name, tmp_path):
    """Quantize every weight should_quantize picks from the bf16 base, copy the rest, add quantization_config:
    transformers loads it, its layers dequantize to what we wrote, and it computes what transformers' own
    quantized save computes."""
    scheme, double = SCHEME_OF[name], DOUBLE[name]
    base = open_base(models.base)
    load = _reader(models.base)
    tensors: dict[str, torch.Tensor] = {}
    planned: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in base.tensors.items():
        if B.should_quantize(key, info.shape, base.config):
            shape = (info.shape[0], info.shape[1])
            for k, dtype, s in B.planned_entries(key, shape, scheme, compute_dtype="BF16", double_quant=double):
                planned[k] = (dtype, s)
            tensors.update(
                B.quantize_weight(load(key), key, scheme, compute_dtype=torch.bfloat16, double_quant=double)
            )
        else:
            tensors[key] = load(key)
            planned[key] = (info.dtype, info.shape)
    config = dict(base.config, quantization_config=B.quantization_config(scheme, "bfloat16", double_quant=double))
    folder = write_checkpoint(tmp_path / "out", tensors, config)
    header = read_header(folder / "model.safetensors")
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == planned

    view = open_base(folder)
    assert B.logical_view(view).tensors.keys() == base.tensors.keys()
    ours = models._auto.from_pretrained(folder, device_map="cpu")
    theirs = models._auto.from_pretrained(models.saved[name], device_map="cpu")  # a fresh one: we run it
    written = _reader(folder)
    for key in B.companions(view):
        expected = B.dequantize_weight(written, key, view)
        got = _reference(ours, key, name)
        assert torch.equal(got.to(expected.dtype), expected), key
        assert torch.equal(got, _reference(theirs, key, name)), key  # same bits as transformers' own quantization
    ids = torch.arange(32).reshape(1, 32)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_should_quantize_agrees_with_transformers(models, name):
    base = open_base(models.base)
    picked = {k for k, t in base.tensors.items() if B.should_quantize(k, t.shape, base.config)}
    assert picked == set(B.companions(open_base(models.saved[name])))


def test_should_quantize_rules():
    plain: dict = {}
    assert B.should_quantize("model.layers.0.mlp.up_proj.weight", (256, 128), plain)
    assert not B.should_quantize("model.layers.0.mlp.up_proj.bias", (256,), plain)
    assert not B.should_quantize("model.norm.weight", (128,), plain)
    assert not B.should_quantize("model.embed_tokens.weight", (256, 128), plain)
    assert not B.should_quantize("transformer.wte.weight", (256, 128), plain)
    assert not B.should_quantize("bert.embeddings.word_embeddings.weight", (256, 128), plain)
    assert not B.should_quantize("lm_head.weight", (256, 128), plain)
    skip = {
        "quantization_config": {"llm_int8_skip_modules": ["model.layers.1", "up_proj", r"model\.layers\.\d+\.mlp"]}
    }
    assert not B.should_quantize("model.layers.1.self_attn.q_proj.weight", (128, 128), skip)  # prefix
    assert B.should_quantize("model.layers.11.self_attn.q_proj.weight", (128, 128), skip)  # ends at a boundary
    assert not B.should_quantize("model.layers.3.self_attn.up_proj.weight", (128, 128), skip)  # suffix
    assert not B.should_quantize("model.layers.3.mlp.down_proj.weight", (128, 128), skip)  # regex
    assert B.should_quantize("lm_head.weight", (256, 128), skip)  # an explicit list replaces the defaults


def test_skip_module_matching_is_transformers_own():
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = ["model.layers.1", "up_proj", r"model\.layers\.\d+\.mlp", "mlp", "self_attn.o", "lm_head"]
    modules = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.3.mlp.up_proj",
        "model.layers.3.mlp.down_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.3.self_attn.o",
        "lm_head",
        "model.mlp",
    ]
    for pattern in patterns:
        config = {"quantization_config": {"llm_int8_skip_modules": [pattern]}}
        for module in modules:
            expected = should_convert_module(module, [pattern])
            assert B.should_quantize(module + ".weight", (64, 64), config) == expected, (pattern, module)


# ----------------------------------------------------------------------------- errors


def test_bad_input_errors(models, tmp_path):
    view = open_base(models.saved["nf4"])
    load = _reader(models.saved["nf4"])
    with pytest.raises(InvalidAdapterError, match="not a bitsandbytes-quantized weight"):
        B.dequantize_weight(load, "lm_head.weight", view)
    key = "model.layers.0.self_attn.q_proj.weight"
    blob = key + ".quant_state.bitsandbytes__nf4"

    def broken_blob(k):
        return torch.tensor(list(b"{not json"), dtype=torch.uint8) if k == blob else load(k)

    with pytest.raises(CorruptFileError, match="not a bitsandbytes quant state"):
        B.dequantize_weight(broken_blob, key, view)

    def other_map(k):
        return torch.zeros(16) if k.endswith(".quant_map") else load(k)

    with pytest.raises(CorruptFileError, match="table"):
        B.dequantize_weight(other_map, key, view)

    tensors = {k: load(k) for k in view.tensors if k != key + ".absmax"}
    with pytest.raises(CorruptFileError, match="absmax"):
        B.companions(open_base(write_checkpoint(tmp_path / "cut", tensors, view.config)))

    w = torch.randn(64, 64)
    with pytest.raises(UsageError, match="scheme"):
        B.quantize_weight(w, "m.weight", "nf3", compute_dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="block size"):
        B.quantize_weight(w, "m.weight", "nf4", compute_dtype=torch.bfloat16, blocksize=48)
    with pytest.raises(UsageError, match="compute dtype"):
        B.quantize_weight(w, "m.weight", "nf4", compute_dtype=torch.int8)
    with pytest.raises(UsageError, match="NaN"):
        B.quantize_weight(torch.full((64, 64), float("nan")), "m.weight", "nf4", compute_dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="2-D"):
        B.planned_entries("m.weight", (64,), "nf4", compute_dtype="BF16")  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapterError, match="bnb_4bit_quant_type"):
        B.bnb_scheme(
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "nf3",
                }
            }
        )
    assert B.bnb_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4}}) is None


# ----------------------------------------------------------------------------- what merging costs


def test_merge_error_against_the_bf16_original(models):
    """A LoRA delta (|dW| = 5% of |W|) merged into the dequantized nf4 weight differs from the same delta merged
    into the bf16 original by the base's nf4 error (~9%); requantizing the merged weight to nf4 loses most of
    the delta itself."""
    original = _reader(models.base)
    view = open_base(models.saved["nf4"])
    load = _reader(models.saved["nf4"])
    torch.manual_seed(0)
    merged_err, delta_err = [], []
    for key in B.companions(view):
        w = original(key).float()
        wq = B.dequantize_weight(load, key, view).float()
        delta = torch.randn(w.shape[0], 16) @ torch.randn(16, w.shape[1])
        delta *= 0.05 * w.norm() / delta.norm()
        ref = (w + delta).bfloat16().float()
        merged = (wq + delta).bfloat16()
        merged_err.append(float((merged.float() - ref).norm() / ref.norm()))
        requant = B.quantize_weight(merged, key, "nf4", compute_dtype=torch.bfloat16)
        back = B.dequantize_weight(requant.__getitem__, key, dict_view(requant)).float()
        delta_err.append(float((back - wq - delta).norm() / delta.norm()))
    assert 0.08 < sum(merged_err) / len(merged_err) < 0.11
    assert sum(delta_err) / len(delta_err) > 0.9


def _transformers_skips(pattern: str, module: str) -> bool:
    """transformers' own rule (should_convert_module), on Python's re: the reference."""
    import re

    try:
        return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error:
        return module.startswith(pattern) and module[len(pattern) : len(pattern) + 1] in ("", ".")


@pytest.mark.parametrize(
    "pattern",
    ["lm_head", "model.layers.1", "model.layers.1.", r"model\.layers\.\d+\.mlp", "layers.1", "mlp", "[", "lm_", ".*"],
)
def test_skip_modules_match_transformers(pattern):
    modules = ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.10.mlp.up_proj", "model.embed_tokens"]
    for module in modules:
        want = not (_transformers_skips(pattern, module) or module.endswith(pattern))
        assert B._should_convert(module, [pattern]) == want, (pattern, module)


def test_a_catastrophic_skip_pattern_from_a_base_config_cannot_hang_a_merge():
    import time

    started = time.perf_counter()
    assert B._should_convert("a" * 5000 + "!", ["(a+)+$"])  # backtracking would take longer than the universe
    assert time.perf_counter() - started < 1.0
    with pytest.raises(InvalidAdapterError, match="llm_int8_skip_modules"):
        B._should_convert("model.layers.0", [r"(a)\1"])  # a backreference: refused, not run
