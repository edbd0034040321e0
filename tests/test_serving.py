"""`validate --target gguf|vllm`: what llama.cpp and vLLM would refuse or silently lose (artifact/serving.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_models import build_lora_adapter, load_base_model, randomize_adapter_weights
from peft import LoraConfig, get_peft_model
from peft_helpers import randomize_embedding_lora

from adapterhub_cli import api as ah
from adapterhub_cli.cli.main import build_cli


def _codes(adapter: Path, base: Path, target: str, **kw: object) -> dict[str, str]:
    report = ah.validate(adapter, base=base, target=target, **kw)
    return {f.code: f.severity for f in report.findings if f.code.startswith(target)}


def _cli(*args: str) -> object:
    return CliRunner().invoke(build_cli(), list(args))


@pytest.fixture(scope="module")
def llama_embed_lora(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA on embed_tokens and lm_head (PEFT also saves their base_layer copies: save_embedding_layers)."""
    import torch

    torch.manual_seed(0)
    model = get_peft_model(
        load_base_model(llama_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    )
    randomize_adapter_weights(model, seed=3)
    randomize_embedding_lora(model, seed=4)
    out = tmp_path_factory.mktemp("embed") / "lora"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_saved_embed(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    return build_lora_adapter(llama_base, tmp_path_factory.mktemp("saved") / "lora", cfg, seed=5)


# --------------------------------------------------------------------------------------------------- gguf


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_gguf_flags_quantized_factors(scheme, llama_lora, llama_base, tmp_path):
    q = tmp_path / "q"
    ah.quantize(llama_lora, q, scheme=scheme)
    assert _codes(q, llama_base, "gguf") == {"gguf-quantized": "error"}
    # ... which convert --to gguf handles: it reads the factors dequantized
    ah.convert(q, tmp_path / "q.gguf", to="gguf", base=llama_base)


def test_gguf_casts_are_not_flagged(llama_lora, llama_base, tmp_path):
    ah.quantize(llama_lora, tmp_path / "bf16", scheme="bf16")
    assert _codes(tmp_path / "bf16", llama_base, "gguf") == {}


def test_gguf_embedding_lora_is_not_flagged(llama_embed_lora, llama_saved_embed, llama_base, tmp_path):
    """llama.cpp exports lora_embedding_A/B (token_embd) and lm_head LoRA (output); full copies it refuses."""
    assert _codes(llama_embed_lora, llama_base, "gguf") == {}
    ah.convert(llama_embed_lora, tmp_path / "e.gguf", to="gguf", base=llama_base)
    assert _codes(llama_saved_embed, llama_base, "gguf") == {"gguf-modules-to-save": "error"}


def test_gguf_tied_lm_head(tmp_path):
    """A Gemma base ties lm_head to the embeddings: llama.cpp's converter refuses a LoRA on it, and so do we."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size = 2, 16, 128
    GemmaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lora = build_lora_adapter(
        tmp_path / "base",
        tmp_path / "lora",
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]),
        seed=1,
    )
    assert _codes(lora, tmp_path / "base", "gguf")["gguf-tied-lm-head"] == "error"
    res = _cli("convert", str(lora), "--to", "gguf", "--base", str(tmp_path / "base"), "-o", str(tmp_path / "x.gguf"))
    assert res.exit_code == 2 and "tied" in res.output and not (tmp_path / "x.gguf").exists()


def test_gguf_scale_findings_point_to_convert(llama_rslora, llama_patterns, llama_base):
    for adapter in (llama_rslora, llama_patterns):
        report = ah.validate(adapter, base=llama_base, target="gguf")
        msgs = [f.message for f in report.findings if f.code in ("gguf-rslora", "gguf-alpha-pattern")]
        assert msgs and all("convert ADAPTER --to gguf" in m for m in msgs)


def test_target_gguf_and_alias_agree(llama_rslora, llama_base):
    a = _cli("validate", str(llama_rslora), "--base", str(llama_base), "--target", "gguf", "--json")
    b = _cli("validate", str(llama_rslora), "--base", str(llama_base), "--gguf", "--json")
    assert a.exit_code == b.exit_code == 1
    assert json.loads(a.stdout)["findings"] == json.loads(b.stdout)["findings"]


# --------------------------------------------------------------------------------------------------- vLLM


def test_vllm_plain_lora_is_clean(llama_lora, llama_base):
    assert _codes(llama_lora, llama_base, "vllm") == {}


def test_vllm_refusals(
    llama_dora, llama_saved_embed, llama_patterns, llama_base, roberta_lora, roberta_base, copy_adapter
):
    assert _codes(llama_dora, llama_base, "vllm")["vllm-dora"] == "error"
    assert _codes(llama_saved_embed, llama_base, "vllm")["vllm-modules-to-save"] == "error"
    assert _codes(llama_patterns, llama_base, "vllm") == {"vllm-pattern-ignored": "warning"}
    # a classifier head is what vLLM does accept (on a classification model); PEFT 0.22 and later also list
    # pre_classifier in every classification adapter's modules_to_save, which vLLM refuses as written
    head = copy_adapter(roberta_lora)
    for listed, want in (
        (["classifier"], {"vllm-classification-head": "info"}),
        (["classifier", "score", "pre_classifier"], {"vllm-modules-to-save": "error"}),
    ):
        cfg = json.loads((head / "adapter_config.json").read_text())
        cfg["modules_to_save"] = listed
        (head / "adapter_config.json").write_text(json.dumps(cfg))
        assert _codes(head, roberta_base, "vllm") == want
    report = ah.validate(head, base=roberta_base, target="vllm")
    (f,) = [f for f in report.findings if f.code == "vllm-modules-to-save"]
    assert "pre_classifier" in f.message and "remove the entry from adapter_config.json" in f.message


def test_vllm_rank_limit(llama_base, tmp_path):
    lora = build_lora_adapter(
        llama_base, tmp_path / "r24", LoraConfig(r=24, lora_alpha=8, target_modules=["q_proj"]), seed=2
    )
    report = ah.validate(lora, base=llama_base, target="vllm")
    (f,) = [f for f in report.findings if f.code == "vllm-rank-too-high"]
    assert "--max-lora-rank 32" in f.message and not report.ok
    assert _codes(lora, llama_base, "vllm", max_lora_rank=32) == {}
    res = _cli("validate", str(lora), "--base", str(llama_base), "--target", "vllm", "--max-lora-rank", "32")
    assert res.exit_code == 0, res.output


def test_vllm_quantized_and_init(llama_lora, llama_base, copy_adapter, tmp_path):
    ah.quantize(llama_lora, tmp_path / "q", scheme="int8")
    assert _codes(tmp_path / "q", llama_base, "vllm") == {"vllm-quantized": "error"}
    pissa = copy_adapter(llama_lora)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (pissa / "adapter_config.json").write_text(json.dumps(cfg))
    assert _codes(pissa, llama_base, "vllm") == {"vllm-init-unsupported": "error"}


def test_vllm_embedding_lora_warns(llama_embed_lora, llama_base):
    assert _codes(llama_embed_lora, llama_base, "vllm") == {"vllm-embedding-lora": "warning"}


def test_both_targets_and_bad_input(llama_dora, llama_base):
    res = _cli(
        "validate", str(llama_dora), "--base", str(llama_base), "--target", "gguf", "--target", "vllm", "--json"
    )
    codes = {f["code"] for f in json.loads(res.stdout)["findings"]}
    assert {"gguf-dora", "vllm-dora"} <= codes and res.exit_code == 1
    for bad in (["--target", "tgi"], ["--target", "vllm", "--max-lora-rank", "0"]):
        res = _cli("validate", str(llama_dora), "--base", str(llama_base), *bad)
        assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(ah.UsageError, match="known targets: gguf, vllm"):
        ah.validate(llama_dora, base=llama_base, target="tgi")


# ------------------------------------------------------------- vLLM: rank, keys, files, vocabulary, dropped modules


def _vllm(adapter: Path, base: Path, **kw: object) -> list[object]:
    return [f for f in ah.validate(adapter, base=base, target="vllm", **kw).findings if f.code.startswith("vllm")]


def test_vllm_rank_mismatch(llama_lora, llama_base, llama_patterns, copy_adapter):
    """A config whose r disagrees with the tensors: PEFT refuses to load it, vLLM (lora_weights.py from_config)
    takes the config's r for the scale and serves it silently; rank_pattern that agrees is not flagged."""
    from peft import PeftModel

    bad = copy_adapter(llama_lora)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 16
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_base_model(llama_base), str(bad))
    (f,) = [f for f in _vllm(bad, llama_base) if f.code == "vllm-rank-mismatch"]
    assert f.severity == "error" and "alpha/16" in f.message and f.module in ah.load(bad, strict=False).modules
    assert "vllm-rank-mismatch" not in _codes(llama_patterns, llama_base, "vllm")


def test_vllm_bad_tensor_key(llama_base, tmp_path):
    """Factors saved from ``model.state_dict()`` keep PEFT's adapter name (``lora_A.default.weight``): vLLM's
    parse_fine_tuned_lora_name refuses them; `convert --to peft` writes PEFT's names, which it reads."""
    import shutil

    import torch
    from safetensors.torch import save_file

    good = build_lora_adapter(
        llama_base, tmp_path / "good", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=3
    )
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(llama_base), str(good))
    raw = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    assert raw and all(".default." in k for k in raw)
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(good / "adapter_config.json", named / "adapter_config.json")
    save_file(raw, str(named / "adapter_model.safetensors"))
    assert _codes(good, llama_base, "vllm") == {}
    (f,) = [f for f in _vllm(named, llama_base) if f.code == "vllm-bad-tensor-key"]
    assert f.severity == "error" and ".lora_A.default.weight" in f.module + f.message
    ah.convert(named, tmp_path / "fixed", to="peft")
    assert _codes(tmp_path / "fixed", llama_base, "vllm") == {}
    fixed = ah.load(tmp_path / "fixed")
    for name, m in ah.load(good).modules.items():  # the same factors under PEFT's names
        assert torch.equal(fixed.tensor(fixed.modules[name].B.name), ah.load(good).tensor(m.B.name))


def test_vllm_missing_weights(llama_lora, llama_base, tmp_path):
    """vLLM reads adapter_config.json and adapter_model.safetensors from one folder: a bare file is not found."""
    import shutil

    bare = tmp_path / "bare.safetensors"
    shutil.copy(llama_lora / "adapter_model.safetensors", bare)
    (f,) = [f for f in _vllm(bare, llama_base) if f.code == "vllm-missing-weights"]
    assert f.severity == "error" and "bare tensor file" in f.message
    assert "vllm-missing-weights" not in _codes(llama_lora, llama_base, "vllm")


def test_vllm_vocab_mismatch(llama_base, llama_lora, copy_adapter, tmp_path):
    """An embedding LoRA trained on a resized vocabulary (136 tokens) against the 128-token base: vLLM refuses it
    (lora_model.py from_lora_tensors); on the resized base it is fine. Added tokens past the base's vocabulary and
    new_embeddings files (never read since vLLM 0.12) are named."""
    import torch

    model = load_base_model(llama_base)
    model.resize_token_embeddings(136)
    model.save_pretrained(tmp_path / "resized")
    torch.manual_seed(0)
    peft = get_peft_model(
        load_base_model(tmp_path / "resized"), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    )
    randomize_adapter_weights(peft, seed=2)
    randomize_embedding_lora(peft, seed=3)
    peft.save_pretrained(tmp_path / "emb")
    (f,) = [f for f in _vllm(tmp_path / "emb", llama_base) if f.code == "vllm-vocab-mismatch"]
    assert f.severity == "error" and "136" in f.message and "128" in f.message
    assert "vllm-vocab-mismatch" not in _codes(tmp_path / "emb", tmp_path / "resized", "vllm")

    added = copy_adapter(llama_lora)
    (added / "added_tokens.json").write_text(json.dumps({"<tool>": 128, "<eot>": 129}))
    (f,) = [f for f in _vllm(added, llama_base) if f.code == "vllm-vocab-mismatch"]
    assert f.severity == "error" and "2 tokens" in f.message
    inside = copy_adapter(llama_lora)
    (inside / "added_tokens.json").write_text(json.dumps({"<pad>": 5}))  # an id the base has: nothing to lose
    assert "vllm-vocab-mismatch" not in _codes(inside, llama_base, "vllm")
    (inside / "new_embeddings.safetensors").write_bytes((llama_lora / "adapter_model.safetensors").read_bytes())
    assert _codes(inside, llama_base, "vllm")["vllm-vocab-mismatch"] == "warning"


@pytest.mark.parametrize(
    ("deploy", "dropped"),
    [
        (["q_proj", "v_proj"], set()),
        (["qkv_proj"], set()),  # vLLM's packed layer holds q, k and v
        (["k_proj"], set()),  # ... and a child named selects the whole packed layer
        (["o_proj", "down_proj"], {"q_proj", "v_proj"}),
        (["v_proj", "gate_up_proj"], set()),
    ],
)
def test_vllm_target_filter_drop(llama_lora, llama_base, deploy, dropped):
    """vllm/lora/utils.py is_in_target_modules on the packed layers vLLM builds (qkv_proj, gate_up_proj)."""
    found = [f for f in _vllm(llama_lora, llama_base, lora_target_modules=deploy) if f.code.endswith("filter-drop")]
    if not dropped:
        assert found == []
        return
    (f,) = found
    assert f.severity == "error"  # every module dropped: the adapter changes nothing
    assert f"{len(ah.load(llama_lora).modules)} of" in f.message and str(sorted(dropped)) in f.message


def test_vllm_target_filter_cli(llama_patterns, llama_base):
    """Some modules dropped: a warning (exit 0); q_proj selects vLLM's whole qkv_proj layer, not gate_up_proj."""
    res = _cli(
        "validate", str(llama_patterns), "--base", str(llama_base), "--target", "vllm", "--lora-target-modules",
        "q_proj,o_proj", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (f,) = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "vllm-target-filter-drop"]
    assert f["severity"] == "warning" and "['up_proj']" in f["message"] and f["module"].endswith("up_proj")
    res = _cli(
        "validate", str(llama_patterns), "--base", str(llama_base), "--target", "vllm", "--lora-target-modules",
        "qkv_proj", "--lora-target-modules", "up_proj", "--json",
    )  # fmt: skip
    assert res.exit_code == 0 and "vllm-target-filter-drop" not in res.stdout


# --------------------------------------------- a multimodal base, an unsupported one, against llama.cpp's converter

VENDOR = Path(__file__).parent / "vendor" / "llama.cpp"


def _llama_cpp_convert(base: Path, adapter: Path, out: Path) -> tuple[int, str]:
    """Run the vendored llama.cpp convert_lora_to_gguf.py offline: (exit status, its log)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{VENDOR / 'gguf-py'}{os.pathsep}{VENDOR}", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(VENDOR / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile", str(out)]
    res = subprocess.run([*cmd, str(adapter)], env=env, capture_output=True, text=True, timeout=600, check=False)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LLaVA (CLIP vision tower + projector + Llama) and a PEFT LoRA on q_proj (both towers) and the
    projector's linear_1."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=127)
    ).save_pretrained(root / "base")
    model = get_peft_model(
        LlavaForConditionalGeneration.from_pretrained(root / "base"),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "linear_1"]),
    )
    randomize_adapter_weights(model, seed=7)
    model.save_pretrained(root / "lora")
    return root / "base", root / "lora"


def test_gguf_filtered_modules_as_llama_cpp_drops_them(llava, tmp_path):
    """llama.cpp's converter skips the vision tower's and the projector's LoRA without a word (its GGUF holds only
    the language model's): validate names exactly those modules."""
    import gguf

    base, lora = llava
    code, log = _llama_cpp_convert(base, lora, tmp_path / "ref.gguf")
    assert code == 0, log[-2000:]
    written = {t.name for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    modules = ah.load(lora).modules
    assert len(written) == 2 * sum("language_model" in n for n in modules) < 2 * len(modules)
    (f,) = [f for f in ah.validate(lora, base=base, target="gguf").findings if f.code == "gguf-filtered-modules"]
    assert f.severity == "warning" and f"{len(modules) - len(written) // 2} of {len(modules)}" in f.message
    assert "language_model" not in f.module
    assert "gguf-unsupported-arch" not in _codes(lora, base, "gguf")  # LLaVA converts (its language model)


def test_vllm_tower_modules_are_dropped(llava):
    base, lora = llava
    (f,) = [f for f in _vllm(lora, base) if f.code == "vllm-target-filter-drop"]
    assert f.severity == "warning" and "--enable-tower-connector-lora" in f.message
    assert "2 modules" in f.message and "language_model" not in f.module  # the tower's q_proj and the projector


def test_gguf_unsupported_arch_as_llama_cpp_refuses(tmp_path):
    """An OPT base: llama.cpp's converter stops with "Model OPTForCausalLM is not supported"; validate says so."""
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128,
            word_embed_proj_dim=32, max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "base")  # fmt: skip
    lora = build_lora_adapter(
        tmp_path / "base", tmp_path / "lora", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), seed=1
    )
    code, log = _llama_cpp_convert(tmp_path / "base", lora, tmp_path / "ref.gguf")
    assert code != 0 and "OPTForCausalLM is not supported" in log
    (f,) = [f for f in ah.validate(lora, base=tmp_path / "base", target="gguf").findings if "arch" in f.code]
    assert f.code == "gguf-unsupported-arch" and f.severity == "error" and "OPTForCausalLM" in f.message


def test_llama_cpp_architectures_are_the_converters():
    """Our copy of the converter's architecture table equals the vendored converter's TEXT_MODEL_MAP."""
    import subprocess
    import sys

    from adapterhub_cli.artifact.serving import LLAMA_CPP_TEXT_ARCHITECTURES, llama_cpp_architecture

    code = (
        "import json, sys; sys.path[:0] = sys.argv[1:]; from conversion import TEXT_MODEL_MAP as m; "
        "print(json.dumps(sorted(m)))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(VENDOR), str(VENDOR / "gguf-py")], capture_output=True, text=True, check=True
    )
    assert set(json.loads(res.stdout)) == LLAMA_CPP_TEXT_ARCHITECTURES
    # conversion/base.py get_model_architecture: text_config's architectures win, except for a few wrappers
    wrapped = {"architectures": ["SomeVLM"], "text_config": {"architectures": ["LlamaForCausalLM"]}}
    assert llama_cpp_architecture(wrapped) == "LlamaForCausalLM"
    kimi = {"architectures": ["KimiK3ForConditionalGeneration"], "text_config": {"architectures": ["X"]}}
    assert llama_cpp_architecture(kimi) == "KimiK3ForConditionalGeneration"


def test_vllm_pickled_weights_check_target_modules(llama_lora, llama_base, tmp_path):
    """adapter_model.bin: vLLM checks target_modules (not the tensors) against the model's modules, so a list
    written for several architectures is refused; the same adapter as safetensors is fine, as it is for PEFT."""
    import shutil

    import torch
    from safetensors.torch import load_file

    multi = tmp_path / "multi"
    shutil.copytree(llama_lora, multi)
    cfg = json.loads((multi / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "query", "value"]  # Llama and BERT names
    (multi / "adapter_config.json").write_text(json.dumps(cfg))
    assert "vllm-unexpected-module" not in _codes(multi, llama_base, "vllm")
    pickled = tmp_path / "pickled"
    shutil.copytree(multi, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    lora = ah.load(pickled, allow_pickle=True)
    (f,) = [
        f for f in ah.validate(lora, base=llama_base, target="vllm").findings if f.code == "vllm-unexpected-module"
    ]
    assert f.severity == "error" and "['query', 'value']" in f.message and f.module == "query"
    ah.convert(lora, tmp_path / "st", to="peft")  # as safetensors: vLLM checks the tensors, all Llama modules
    assert "vllm-unexpected-module" not in _codes(tmp_path / "st", llama_base, "vllm")
