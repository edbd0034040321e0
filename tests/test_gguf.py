"""`adapters convert --to gguf`: llama.cpp's LoRA GGUF, read back with gguf's own reader and compared with PEFT.

llama.cpp applies ``W + alpha / r_i * B_i A_i`` with one global alpha and each tensor's own rank
(llama-adapter.h ``get_scale``); every module's update computed that way from the file (q/k rows un-permuted for
the Llama family) must equal PEFT's dense delta in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures_models import build_lora_adapter
from peft import LoraConfig
from peft_helpers import dense_delta, lora_layers, peft_model, randomize_embedding_lora

from adapterhub_cli import api as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import UsageError
from adapterhub_cli.formats.gguf import ARCHITECTURES, unpermute_rows


gguf = pytest.importorskip("gguf")

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


def _read(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    fields: dict[str, object] = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            fields[name] = f.parts[f.data[0]].tolist()[0]
        else:
            fields[name] = [f.parts[i].tolist()[0] for i in f.data]
    tensors = {
        t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape.tolist())])
        for t in reader.tensors
    }
    return fields, tensors


def _convert(adapter: Path, base: Path, out: Path, *extra: str) -> object:
    return CliRunner().invoke(
        build_cli(), ["convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(out), *extra]
    )


def _check_against_peft(adapter: Path, base: Path, out: Path) -> int:
    res = _convert(adapter, base, out)
    assert res.exit_code == 0, res.output
    fields, tensors = _read(out)
    config = json.loads((base / "config.json").read_text())
    arch, permuted, _ = ARCHITECTURES[config["architectures"][0]]
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config["num_hidden_layers"]
    )
    layers = lora_layers(peft_model(base, adapter))
    assert len(tensors) == 2 * len(layers)
    for module, layer in layers.items():
        g = names.get_name(module)
        a = tensors[f"{g}.weight.lora_a"].to(torch.float64)
        b = tensors[f"{g}.weight.lora_b"].to(torch.float64)
        if g == "token_embd":
            a = a.T  # stored transposed for llama.cpp's get_rows path
        if permuted and g.endswith(("attn_q", "attn_k")):
            n_head = config["num_attention_heads"]
            b = unpermute_rows(b, n_head, n_head if g.endswith("attn_q") else config["num_key_value_heads"])
        rank = b.shape[1]  # llama.cpp: rank = b->ne[0]
        got = alpha / rank * (b @ a)
        if g == "token_embd":  # PEFT's embedding LoRA: A (r, vocab), B (dim, r); delta (B A)^T
            a0 = layer.lora_embedding_A["default"].detach().to(torch.float64)
            b0 = layer.lora_embedding_B["default"].detach().to(torch.float64)
            want = layer.scaling["default"] * (b0 @ a0)
        else:
            want = dense_delta(layer)
        # float32 storage of the baked factors: agreement to float32 rounding of the largest entry
        tol = 1e-6 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=tol, msg=lambda m, module=module: f"{module}: {m}")
    return len(layers)


@pytest.mark.parametrize("name", ["llama_lora", "llama_rslora", "llama_patterns", "llama_all_linear"])
def test_gguf_update_equals_peft_on_llama(name, request, llama_base, tmp_path):
    """rsLoRA, alpha_pattern and rank_pattern are baked into B; q/k rows permuted as llama.cpp's converter does."""
    adapter = request.getfixturevalue(name)
    assert _check_against_peft(adapter, llama_base, tmp_path / "a.gguf") > 0


def test_gguf_permutation_is_llama_cpp_s(llama_lora, llama_base, tmp_path):
    """The stored q rows are llama.cpp's LlamaModel.permute of B (not B itself): the round trip is not trivial."""
    out = tmp_path / "a.gguf"
    assert _convert(llama_lora, llama_base, out).exit_code == 0
    _, tensors = _read(out)
    lora = ah.load(llama_lora)
    f = lora.factors("model.layers.0.self_attn.q_proj")
    stored = tensors["blk.0.attn_q.weight.lora_b"].to(torch.float64)
    assert not torch.allclose(stored, f.B.to(torch.float64))
    torch.testing.assert_close(unpermute_rows(stored, 4, 4), f.B.to(torch.float64), rtol=0, atol=0)
    # plain LoRA (alpha/r everywhere): B keeps its values; A is untouched
    torch.testing.assert_close(
        tensors["blk.0.attn_v.weight.lora_b"], lora.factors("model.layers.0.self_attn.v_proj").B, rtol=0, atol=0
    )


def test_gguf_embeddings_and_lm_head_are_exported(llama_base, tmp_path):
    """llama.cpp exports LoRA on embed_tokens (token_embd, A transposed) and lm_head (output)."""
    from fixtures_models import load_base_model, randomize_adapter_weights
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_base_model(llama_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    )
    randomize_adapter_weights(model, seed=3)
    randomize_embedding_lora(model, seed=4)
    model.peft_config["default"].base_model_name_or_path = str(llama_base)
    adapter = tmp_path / "emb"
    model.save_pretrained(adapter)
    assert _check_against_peft(adapter, llama_base, tmp_path / "a.gguf") == 4


def _family_base(kind: str, out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    cls_config, cls_model = {
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[kind]
    config = getattr(transformers, cls_config)(**TINY, head_dim=16)
    model = getattr(transformers, cls_model)(config)
    model.eval()
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_gguf_families(kind, tmp_path):
    base = _family_base(kind, tmp_path / "base")
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        alpha_pattern={"k_proj": 3},
        rank_pattern={"down_proj": 2},
    )
    adapter = build_lora_adapter(base, tmp_path / "lora", cfg, seed=11)
    assert _check_against_peft(adapter, base, tmp_path / "a.gguf") == 10


def test_gguf_refusals_are_clean(llama_dora, roberta_lora, roberta_base, llama_lora, llama_base, tmp_path):
    cases = [
        (llama_dora, llama_base, "a.gguf", "DoRA"),
        (roberta_lora, roberta_base, "b.gguf", "architecture"),
        (llama_lora, tmp_path / "nowhere", "c.gguf", "config.json"),
        (llama_lora, llama_base, "d.safetensors", ".gguf"),
    ]
    for adapter, base, name, words in cases:
        res = _convert(adapter, base, tmp_path / name)
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
        assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gguf_api_and_provenance(llama_lora, llama_base, tmp_path):
    out = ah.convert(llama_lora, tmp_path / "x.gguf", to="gguf", base=llama_base)
    assert out.path == tmp_path / "x.gguf"
    fields, _ = _read(out.path)
    assert json.loads(fields["adapterhub.provenance"])["operation"] == "convert"


# --------------------------------------------------------------- against llama.cpp's own convert_lora_to_gguf.py

VENDOR = Path(__file__).parent / "vendor" / "llama.cpp"
LLAMA_CASES = ["llama_lora", "llama_all_linear", "llama_rslora", "llama_patterns"]
FAMILIES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def llama_cpp_outputs(request, llama_base, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """case -> (adapter, base, the GGUF llama.cpp's vendored convert_lora_to_gguf.py wrote for it).

    The converter (with its own gguf-py) runs offline in one subprocess that executes the script once per case
    (runpy, as ``python convert_lora_to_gguf.py --base BASE --outfile OUT ADAPTER``), so torch and transformers
    are imported once."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("llama_cpp")
    cases = {name: (request.getfixturevalue(name), llama_base) for name in LLAMA_CASES}
    for kind in FAMILIES:
        base = _family_base(kind, root / kind / "base")
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
        cases[kind] = (build_lora_adapter(base, root / kind / "lora", cfg, seed=12), base)
    jobs = [[str(base), str(root / f"{name}.gguf"), str(adapter)] for name, (adapter, base) in cases.items()]
    driver = (
        "import json, runpy, sys\n"
        "script = sys.argv[1]\n"
        "for base, out, adapter in json.loads(sys.argv[2]):\n"
        "    sys.argv = [script, '--base', base, '--outfile', out, adapter]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{VENDOR / 'gguf-py'}{os.pathsep}{VENDOR}", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", driver, str(VENDOR / "convert_lora_to_gguf.py"), json.dumps(jobs)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return {name: (adapter, base, root / f"{name}.gguf") for name, (adapter, base) in cases.items()}


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_gguf_matches_llama_cpp_converter(name, llama_cpp_outputs, tmp_path):
    """Same architecture, tensor names, shapes, alpha and A factors as llama.cpp's converter; B equal too (the same
    q/k permutation) up to each module's baked ratio s_i * r_i / alpha, which is 1 for plain LoRA. llama.cpp's
    converter drops rsLoRA and alpha_pattern (its file gives a different update); ours keeps PEFT's."""
    adapter, base, ref_path = llama_cpp_outputs[name]
    assert _convert(adapter, base, tmp_path / "ours.gguf").exit_code == 0
    ref_fields, ref = _read(ref_path)
    ours_fields, ours = _read(tmp_path / "ours.gguf")
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert ours_fields[key] == ref_fields[key], key
    assert sorted(ours) == sorted(ref)
    lora = ah.load(adapter)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    alpha = float(ref_fields["adapter.lora.alpha"])
    baked = False
    for module, m in lora.modules.items():
        g = names.get_name(module)
        a, b = f"{g}.weight.lora_a", f"{g}.weight.lora_b"
        assert ours[a].shape == ref[a].shape and ours[b].shape == ref[b].shape
        torch.testing.assert_close(ours[a], ref[a], rtol=0, atol=0)
        ratio = m.scale * m.rank / alpha
        baked |= ratio != 1.0
        torch.testing.assert_close(ours[b].double(), ref[b].double() * ratio, rtol=1e-6, atol=1e-9)
    assert baked == (name in ("llama_rslora", "llama_patterns"))


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_families_match_llama_cpp_converter(kind, llama_cpp_outputs, tmp_path):
    """Plain LoRA on each family: the same file contents as llama.cpp's converter, tensor for tensor."""
    adapter, base, ref_path = llama_cpp_outputs[kind]
    assert _convert(adapter, base, tmp_path / "ours.gguf").exit_code == 0
    ref_fields, ref = _read(ref_path)
    ours_fields, ours = _read(tmp_path / "ours.gguf")
    assert ours_fields["general.architecture"] == ref_fields["general.architecture"]
    assert ours_fields["adapter.lora.alpha"] == ref_fields["adapter.lora.alpha"]
    assert sorted(ours) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_gguf_file_is_named_when_read(llama_lora, llama_base, tmp_path):
    """A .gguf is recognised (magic bytes) and refused by name: this tool writes GGUF, it does not read it."""
    out = tmp_path / "a.gguf"
    assert _convert(llama_lora, llama_base, out).exit_code == 0
    res = CliRunner().invoke(build_cli(), ["inspect", str(out)])
    assert res.exit_code == 2 and "GGUF" in res.output and "Traceback" not in res.output


def test_overwrite_replaces_an_earlier_gguf_output_only(llama_lora, llama_base, tmp_path):
    out = tmp_path / "a.gguf"
    ah.convert(llama_lora, out, to="gguf", base=llama_base)
    first = out.read_bytes()
    ah.convert(llama_lora, out, to="gguf", base=llama_base, overwrite=True)  # ours: replaced
    assert out.read_bytes() == first  # byte-for-byte reproducible
    foreign = tmp_path / "b.gguf"
    foreign.write_bytes(b"GGUF not ours")
    with pytest.raises(UsageError, match="not written by adapters"):
        ah.convert(llama_lora, foreign, to="gguf", base=llama_base, overwrite=True)
    assert foreign.read_bytes() == b"GGUF not ours"
