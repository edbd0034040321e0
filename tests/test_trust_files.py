"""Files outside the checkpoint folder are never read, copied or published; NaN never reaches a written file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import adapterhub_cli as ah
from adapterhub_cli.artifact.checkpoint import regular_files
from adapterhub_cli.artifact.safetensors import save_safetensors
from adapterhub_cli.errors import InvalidAdapterError


SECRET = "hf_secretsecretsecretsecretsecret"


def _copy_base_with_outside_link(llama_base: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    outside = tmp_path / "environ"
    outside.write_text(f"HF_TOKEN={SECRET}\n")
    (base / "tokenizer_config.json").symlink_to(outside)  # a side-file name, pointing out of the folder
    (base / "inside.txt").write_text("kept")
    (base / "inside-link.txt").symlink_to(base / "inside.txt")  # stays inside: fine
    return base


def test_merge_never_follows_a_side_file_link_out_of_the_base(llama_base, llama_lora, tmp_path):
    base = _copy_base_with_outside_link(llama_base, tmp_path)
    out = ah.merge(llama_lora, base=base, out=tmp_path / "merged").path
    names = {p.name for p in out.iterdir()}
    assert "tokenizer_config.json" not in names
    assert {"inside.txt", "inside-link.txt", "config.json"} <= names
    assert not any(SECRET in p.read_text(errors="replace") for p in out.iterdir() if p.suffix != ".safetensors")


def test_push_files_of_a_merged_folder_are_regular_files_inside_it(llama_base, tmp_path):
    base = _copy_base_with_outside_link(llama_base, tmp_path)
    listed = {p.name for p in regular_files(base)}
    assert "tokenizer_config.json" not in listed and "inside-link.txt" in listed
    from adapterhub_cli.stores.publish import push_files

    kind, files = push_files(base)
    assert kind == "merge" and "tokenizer_config.json" not in files


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_safetensors_writer_refuses_non_finite_tensors(tmp_path, bad):
    t = torch.zeros(4, 4)
    t[1, 2] = bad
    with pytest.raises(InvalidAdapterError, match="NaN or inf"):
        save_safetensors({"ok": torch.zeros(2), "bad": t}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    save_safetensors({"ints": torch.arange(3), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "y.st")


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_merge_refuses_a_base_already_holding_nan_in_an_untouched_tensor(llama_base, llama_lora, tmp_path, bad):
    """No adapter touches the final norm, yet a NaN / inf there never reaches an output with exit 0."""
    from click.testing import CliRunner

    from adapterhub_cli.artifact.safetensors import load_safetensors
    from adapterhub_cli.cli.main import build_cli

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    tensors = load_safetensors(base / "model.safetensors")
    tensors["model.norm.weight"][3] = bad
    save = dict(tensors)
    (base / "model.safetensors").unlink()
    import safetensors.torch

    safetensors.torch.save_file(save, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match=r"model\.norm\.weight already holds NaN or inf"):
        ah.merge(llama_lora, base=base, out=tmp_path / "merged")
    result = CliRunner().invoke(
        build_cli(), ["merge", str(llama_lora), "--into", str(base), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "already holds NaN or inf" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no output, no temporary folder


@pytest.mark.parametrize("to", ["peft", "diffusers"])
def test_convert_refuses_a_nan_alpha_instead_of_writing_it(llama_lora, tmp_path, to):
    import json

    from click.testing import CliRunner

    from adapterhub_cli.cli.main import build_cli

    src = tmp_path / "src"
    shutil.copytree(llama_lora, src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapterError, match="alpha"):
        ah.convert(src, tmp_path / "out", to=to)
    result = CliRunner().invoke(build_cli(), ["convert", str(src), "--to", to, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_pickle_with_a_lone_surrogate_tensor_name_is_refused(tmp_path):
    from adapterhub_cli.artifact.files import load_pickle_safely
    from adapterhub_cli.errors import CorruptFileError

    torch.save({"base_model.model.q\ud800.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.bin")
    with pytest.raises(CorruptFileError, match="not valid text"):
        load_pickle_safely(tmp_path / "adapter_model.bin")


def test_pickles_are_refused_on_a_torch_whose_weights_only_loader_is_unsafe(tmp_path, monkeypatch):
    """CVE-2025-32434: torch.load(weights_only=True) could run code before torch 2.6."""
    from adapterhub_cli.artifact.files import load_pickle_safely
    from adapterhub_cli.errors import UnsafeFileError

    torch.save({"w": torch.zeros(2)}, tmp_path / "adapter_model.bin")
    assert set(load_pickle_safely(tmp_path / "adapter_model.bin")) == {"w"}  # this torch (>= 2.6) loads it
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UnsafeFileError, match="CVE-2025-32434"):
        load_pickle_safely(tmp_path / "adapter_model.bin")


def test_a_token_shaped_string_in_a_config_never_reaches_a_written_card(llama_lora, tmp_path):
    import json

    src = tmp_path / "src"
    shutil.copytree(llama_lora, src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"org/model-{SECRET}"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    out = ah.reduce(src, out=tmp_path / "out", rank=2).path
    assert SECRET not in (out / "README.md").read_text()


@pytest.mark.parametrize("doc", [b"[" * 100000, b'{"n": ' + b"1" * 5000 + b"}"])
def test_untrusted_json_in_metadata_and_manifests_is_a_clean_error(llama_lora, tmp_path, doc):
    """Deep nesting and numbers past Python's int-string limit: never a RecursionError / ValueError traceback."""
    from adapterhub_cli.artifact.provenance import PROVENANCE_KEY, read_provenance
    from adapterhub_cli.errors import CorruptFileError
    from adapterhub_cli.stores.local import LocalStore

    adapter = ah.load(llama_lora)
    adapter.metadata[PROVENANCE_KEY] = doc.decode()
    assert read_provenance(adapter) is None  # unreadable provenance is no provenance

    root = tmp_path / "registry"
    root.mkdir()
    ah.push(llama_lora, f"file://{root}/acme/lora", version="1.0.0")
    manifest = next((root / "acme" / "lora" / "versions").glob("*/.adapters-manifest.json"))
    manifest.chmod(0o644)
    manifest.write_bytes(doc)
    with pytest.raises(CorruptFileError, match="manifest"):
        LocalStore().resolve(f"file://{root}/acme/lora@1.0.0")
