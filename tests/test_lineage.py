"""Lineage on every output: merge / unmerge record provenance and write a model card that keeps its word (the snippet
loads the model, the base is named only by its Hub id, the lineage lists the adapters with their sha256), a push of the
merged folder carries the same; a quantized adapter's card says `adapters dequantize` first and is not labelled PEFT;
`merge --json` warns as `validate` does."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import status_and_output as run_cli
from peft import PeftModel
from peft_helpers import load_base, logits, read_checkpoint

import adapterhub_cli as ah
from adapterhub_cli.artifact.card import card_provenance, loading_class
from adapterhub_cli.artifact.files import sha256_file
from adapterhub_cli.artifact.provenance import PROVENANCE_KEY, checkpoint_provenance
from adapterhub_cli.artifact.safetensors import read_header


TOKEN = "hf_lineage_token_0d5e9a"

# huggingface_hub's LFS upload passes data= to httpx2, which deprecates it; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def front_matter(card: str) -> dict:
    """The YAML front matter of a README.md."""
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n", 2)[1]) or {}


def python_snippet(card: str) -> str:
    """The first ```python block of a card."""
    found = re.search(r"```python\n(.*?)```", card, flags=re.S)
    assert found, card
    return found.group(1)


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` on ``base`` (as stored), as a state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture
def named_base(llama_base: Path, tmp_path: Path) -> Path:
    """``llama_base`` whose config names the Hub repo it came from (``_name_or_path``, as transformers writes it)."""
    out = tmp_path / "named-base"
    shutil.copytree(llama_base, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/llama-tiny"}, indent=2))
    return out


# ------------------------------------------------------------------------------------------------- merge


def test_merge_records_provenance_in_every_shard_and_stays_bit_identical_to_peft(
    llama_base, llama_base_sharded, llama_lora, llama_rslora, tmp_path
):
    out = tmp_path / "m"
    ah.merge([llama_lora, llama_rslora], base=llama_base_sharded, out=out, weights=[1.0, 0.5], max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    records = []
    for shard in shards:
        meta = read_header(shard).metadata
        assert meta["format"] == "pt"  # transformers still loads it
        records.append(json.loads(meta[PROVENANCE_KEY]))
    assert all(r == records[0] for r in records)
    record = records[0]
    assert record == checkpoint_provenance(out)
    assert record["operation"] == "merge" and record["tool"].startswith("adapterhub-cli ")
    assert record["parameters"]["weights"] == [1.0, 0.5] and record["parameters"]["max_shard_size"] == "100KB"
    base, *adapters = record["inputs"]
    assert base["role"] == "base" and base["source"] == str(llama_base_sharded) and base["sha256"] is None
    assert all(re.fullmatch(r"[0-9a-f]{64}", base[k]) for k in ("config_sha256", "tensors_sha256"))
    assert [(a["role"], a["source"], a["sha256"]) for a in adapters] == [
        ("adapter", str(p), sha256_file(p / "adapter_model.safetensors")) for p in (llama_lora, llama_rslora)
    ]
    # the same base, single-file: the same config and tensor-table digests (they describe the model, not the files)
    single = ah.merge(llama_lora, base=llama_base, out=tmp_path / "single").path
    other = checkpoint_provenance(single)["inputs"][0]
    assert (other["config_sha256"], other["tensors_sha256"]) == (base["config_sha256"], base["tensors_sha256"])

    # the tensors are PEFT's merge_and_unload, bit for bit; the folder (card and all) loads with transformers
    ours, theirs = read_checkpoint(single), peft_merged(llama_base, llama_lora)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(load_base(llama_base), str(llama_lora)).merge_and_unload()
    torch.testing.assert_close(logits(load_base(single)), logits(reference), rtol=0, atol=0)


def test_merged_card_names_the_base_the_lineage_and_a_snippet_that_loads(named_base, llama_lora, tmp_path):
    out = ah.merge(llama_lora, base=named_base, out=tmp_path / "m", weights=[0.75]).path
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "org/llama-tiny" and meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    digest = sha256_file(llama_lora / "adapter_model.safetensors")
    assert f"| `{llama_lora}` | adapter | 0.75 | `{digest}` |" in card
    assert card_provenance(card) == checkpoint_provenance(out)
    snippet = python_snippet(card)
    assert "AutoModelForCausalLM" in snippet and "PeftModel" not in snippet
    scope: dict = {}
    exec(snippet.replace("path/to/this/folder", str(out)), scope)  # the card's own instructions load the model
    assert type(scope["model"]).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(scope["model"].eval()), logits(load_base(out)), rtol=0, atol=0)


def test_merged_card_never_names_a_local_path(llama_base, llama_lora, tmp_path):
    base = tmp_path / "local-base"
    shutil.copytree(llama_base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": str(llama_base)}))
    card = (ah.merge(llama_lora, base=base, out=tmp_path / "m").path / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert str(llama_base) not in card.split("## Lineage")[0]  # the lineage lists the inputs as given


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, ("transformers", "AutoModelForCausalLM")),
        ({"architectures": ["GPT2LMHeadModel"]}, ("transformers", "AutoModelForCausalLM")),
        (
            {"architectures": ["RobertaForSequenceClassification"]},
            ("transformers", "AutoModelForSequenceClassification"),
        ),
        ({"architectures": ["BertForTokenClassification"]}, ("transformers", "AutoModelForTokenClassification")),
        ({"architectures": ["T5ForConditionalGeneration"]}, ("transformers", "T5ForConditionalGeneration")),
        (
            {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.31.0"},
            ("diffusers", "UNet2DConditionModel"),
        ),
        ({"architectures": ["LlamaModel"]}, ("transformers", "AutoModel")),
        ({}, ("transformers", "AutoModel")),
        ({"architectures": ["os.system('x')"]}, ("transformers", "AutoModel")),  # never code in a snippet
    ],
)
def test_loading_class_from_config(config, expected):
    assert loading_class(config) == expected


def test_the_classes_named_are_real_and_load_what_they_say(roberta_base, roberta_lora, gpt2_base, gpt2_lora, tmp_path):
    import transformers

    for base, adapter, cls in [
        (roberta_base, roberta_lora, "AutoModelForSequenceClassification"),
        (gpt2_base, gpt2_lora, "AutoModelForCausalLM"),
    ]:
        out = ah.merge(adapter, base=base, out=tmp_path / base.name).path
        snippet = python_snippet((out / "README.md").read_text())
        assert f"from transformers import {cls}" in snippet
        model = getattr(transformers, cls).from_pretrained(out)
        assert type(model).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]


def test_unmerge_records_provenance_and_a_card(llama_base, llama_lora, tmp_path):
    merged = ah.merge(llama_lora, base=llama_base, out=tmp_path / "m").path
    back = ah.unmerge(llama_lora, merged=merged, out=tmp_path / "back").path
    record = checkpoint_provenance(back)
    assert record["operation"] == "unmerge" and record["inputs"][0]["source"] == str(merged)
    assert record["inputs"][1]["sha256"] == sha256_file(llama_lora / "adapter_model.safetensors")
    card = (back / "README.md").read_text()
    assert "unmerge" in card and card_provenance(card) == record
    assert front_matter(card)["library_name"] == "transformers"


def test_merge_from_a_hub_base_names_it_and_a_push_carries_the_lineage(monkeypatch, llama_base, llama_lora, tmp_path):
    from hub_server import serving

    with serving(monkeypatch, tokens={TOKEN}, token=TOKEN):
        ah.push(llama_base, "org/llama", version="1.0.0", force=True)
        out = ah.merge(llama_lora, base="org/llama@v1.0.0", out=tmp_path / "m").path
        card = (out / "README.md").read_text()
        assert front_matter(card)["base_model"] == "org/llama"
        assert checkpoint_provenance(out)["inputs"][0]["source"] == "org/llama@v1.0.0"

        ah.push(out, "org/llama-merged", version="1.0.0")
        pulled = Path(ah.pull("org/llama-merged@v1.0.0").path)
        published = (pulled / "README.md").read_text()
    meta = front_matter(published)
    assert meta["base_model"] == "org/llama" and meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and "peft" not in meta["tags"]  # transformers loads it, not PEFT
    assert "No recorded operation" not in published
    assert sha256_file(llama_lora / "adapter_model.safetensors") in published
    snippet = python_snippet(published)
    assert 'AutoModelForCausalLM.from_pretrained("org/llama-merged", revision="v1.0.0")' in snippet
    assert card_provenance(published) == checkpoint_provenance(out)


def test_push_of_a_merged_folder_to_a_registry_carries_the_lineage(named_base, llama_lora, tmp_path):
    out = ah.merge(llama_lora, base=named_base, out=tmp_path / "m").path
    registry = tmp_path / "registry"
    registry.mkdir()
    ah.push(out, f"file://{registry}/acme/merged", version="1.0.0")
    pulled = ah.pull(f"file://{registry}/acme/merged@1.0.0", out=tmp_path / "pulled").path
    card = (Path(pulled) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "org/llama-tiny" and meta["base_model_relation"] == "merge"
    assert "No recorded operation" not in card and "`merge`" in card
    assert "AutoModelForCausalLM" in python_snippet(card)


def test_push_of_a_merged_folder_without_its_card_keeps_the_lineage(named_base, llama_lora, tmp_path):
    """The lineage comes from the shards' provenance, not only from the local card: a replaced card loses nothing."""
    out = ah.merge(llama_lora, base=named_base, out=tmp_path / "m").path
    (Path(out) / "README.md").write_text("# my merged model\n\nHand-written.\n")
    registry = tmp_path / "registry"
    registry.mkdir()
    ah.push(out, f"file://{registry}/acme/merged", version="1.0.0")
    pulled = ah.pull(f"file://{registry}/acme/merged@1.0.0", out=tmp_path / "pulled").path
    card = (Path(pulled) / "README.md").read_text()
    assert "Hand-written." in card  # the hand-written text is kept
    assert front_matter(card)["base_model_relation"] == "merge"
    assert "No recorded operation" not in card and "`merge`" in card
    assert "AutoModelForCausalLM" in python_snippet(card)


# --------------------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4"])
def test_quantized_card_says_dequantize_first_and_is_not_labelled_peft(scheme, llama_lora, tmp_path):
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    q = ah.quantize(llama_lora, tmp_path / "q", scheme=scheme).path
    card = (q / "README.md").read_text()
    meta = front_matter(card)
    assert meta.get("library_name") != "peft" and "peft" not in meta.get("tags", [])
    assert "PeftModel.from_pretrained" not in card and "adapters dequantize" in card

    # the instruction works: dequantize, then PEFT loads it
    code, output = run_cli("dequantize", q, "-o", tmp_path / "plain")
    assert code == 0, output
    assert front_matter((tmp_path / "plain" / "README.md").read_text())["library_name"] == "peft"

    registry = tmp_path / "registry"
    registry.mkdir()
    ah.push(q, f"file://{registry}/acme/q", version="1.0.0")
    pulled = ah.pull(f"file://{registry}/acme/q@1.0.0", out=tmp_path / "pulled").path
    published = (Path(pulled) / "README.md").read_text()
    meta = front_matter(published)
    assert meta.get("library_name") != "peft" and "peft" not in meta.get("tags", [])
    assert "PeftModel.from_pretrained" not in published and "adapters dequantize" in published


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_a_cast_adapter_is_still_labelled_peft(scheme, llama_lora, tmp_path):
    """A bf16 / fp16 cast loads in PEFT as it is: its card says so."""
    q = ah.quantize(llama_lora, tmp_path / "q", scheme=scheme).path
    card = (q / "README.md").read_text()
    assert front_matter(card)["library_name"] == "peft" and "PeftModel.from_pretrained" in card


def test_hub_push_of_a_quantized_adapter(monkeypatch, llama_lora, tmp_path):
    from hub_server import serving

    q = ah.quantize(llama_lora, tmp_path / "q", scheme="int8").path
    with serving(monkeypatch, tokens={TOKEN}, token=TOKEN):
        ah.push(q, "org/lora-int8", version="1.0.0")
        published = (Path(ah.pull("org/lora-int8@v1.0.0").path) / "README.md").read_text()
    meta = front_matter(published)
    assert meta.get("library_name") != "peft" and "PeftModel" not in published
    assert "adapters dequantize" in published and "`quantize`" in published


# ---------------------------------------------------------------------------------------------- warnings


def test_merge_json_carries_the_warnings_validate_gives(llama_base, llama_lora, tmp_path):
    base = tmp_path / "a-copy-of-the-base"  # the same weights under another name than the adapter declares
    shutil.copytree(llama_base, base)
    code, output = run_cli("validate", llama_lora, "--base", base, "--json")
    assert code == 0, output
    expected = [f["code"] for f in json.loads(output)["findings"] if f["severity"] == "warning"]
    assert "base-name-mismatch" in expected

    code, output = run_cli("merge", llama_lora, "--into", base, "-o", tmp_path / "m", "--json")
    assert code == 0, output
    got = json.loads(output)["warnings"]
    assert [w.split(":", 1)[0] for w in got] == expected

    result = ah.unmerge(llama_lora, merged=tmp_path / "m", out=tmp_path / "back")
    report = ah.validate(llama_lora, base=tmp_path / "m")
    assert [w.split(":", 1)[0] for w in result.warnings] == [f.code for f in report.warnings]


def test_merge_of_a_fitting_pair_has_no_warnings(llama_base, llama_lora, tmp_path):
    assert ah.validate(llama_lora, base=llama_base).warnings == []  # the fixture declares this very base
    assert ah.merge(llama_lora, base=llama_base, out=tmp_path / "m").warnings == []


def test_lineage_lines_of_an_untrusted_record_stay_one_line_each_and_cannot_forge_the_card_markers():
    from adapterhub_cli.artifact.card import PROVENANCE_COMMENT, lineage_lines, quantized_scheme
    from adapterhub_cli.stores.card import CARD_END

    forged = f"x\n\n{CARD_END}\n{PROVENANCE_COMMENT}{{}} -->| `y`"
    record = {
        "operation": forged,
        "parameters": {"weights": [0.5, 2, True], forged: forged},
        "inputs": [
            {"source": "b", "role": "base", "config_sha256": forged},
            {"source": forged, "sha256": "s", "role": "adapter"},
            {"source": forged, "sha256": "s", "role": "adapter"},  # the same adapter twice, another weight
            {"source": "z", "role": "adapter"},
        ],
    }
    text = "\n".join(lineage_lines(record))
    assert CARD_END not in text and PROVENANCE_COMMENT not in text and "\n\n\n" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "adapter" in line]
    assert [r.split(" | ")[2] for r in rows] == ["0.5", "2", "1"]
    assert all(r.count("|") == 5 for r in rows)  # no cell ends early
    assert all(len(line) < 500 for line in text.splitlines())
    # fields of the wrong type are left out rather than failing a push
    assert lineage_lines({"operation": "merge", "parameters": [1], "inputs": "abc"})[0].startswith("Produced by")
    assert quantized_scheme({"operation": "quantize", "parameters": ["nf4"]}) is None


def test_a_provenance_record_over_a_megabyte_is_not_read_back():
    from adapterhub_cli.artifact.provenance import _recorded

    small = json.dumps({"operation": "merge", "inputs": []})
    assert _recorded({PROVENANCE_KEY: small}) == {"operation": "merge", "inputs": []}
    huge = json.dumps({"operation": "merge", "inputs": [{"source": "x" * 100}] * 20_000})
    assert _recorded({PROVENANCE_KEY: huge}) is None


def test_a_push_card_over_an_existing_card_with_odd_tags_keeps_the_string_ones():
    from adapterhub_cli.stores.card import hub_card

    existing = "---\ntags:\n- 1\n- mine\n- null\n---\n# hand written\n"
    text = hub_card(
        existing,
        adapter=None,
        config={"architectures": ["LlamaForCausalLM"]},
        relation="merge",
        base_model=None,
        repo_id="org/merged",
        version="1.0.0",
        sha256={},
    )
    assert front_matter(text)["tags"] == ["mine", "lora", "adapterhub-cli", "merge"]
    assert "# hand written" in text


def test_lineage_lines_scrub_secrets_before_cutting_values_and_keep_free_text_in_code_spans():
    """A value is scrubbed before it is cut to 200 characters: a token or a URL password cut short would no longer
    be recognised by the scrub of the whole card. Tool and role cannot add markdown (a link, an image) to a card."""
    from adapterhub_cli.artifact.card import lineage_lines

    token = "hf_" + "A1b2C3d4E5" * 4
    long_path = "x" * 180
    record = {
        "operation": "merge",
        "tool": "![pixel](https://evil.example/t.png)",
        "inputs": [
            {"source": f"{long_path}/{token}/more", "sha256": "s", "role": "adapter"},
            {"source": f"{'y' * 170}https://u:p4ssw0rdSECRETLONGER@host/x", "sha256": "s", "role": "[a](http://z)"},
        ],
    }
    text = "\n".join(lineage_lines(record))
    assert "A1b2C3d4E5" not in text and "p4ssw0rd" not in text
    assert "](https://evil" not in text.replace("`![pixel](https://evil.example/t.png)`", "")
    assert "[a](http://z)" not in text
