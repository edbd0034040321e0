"""`unmerge` keeps the shard layout of `--from` (same files, same index, same tensor-to-shard assignment) and takes
`--dtype` like merge; `--max-shard-size` that is zero or negative is a usage error naming the option."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import status_and_output as run_cli
from peft import PeftModel
from peft_helpers import load_base, logits, lora_layers, read_checkpoint

import adapterhub_cli as ah
from adapterhub_cli.artifact.safetensors import read_header


INDEX = "model.safetensors.index.json"


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of ``t.dtype`` at each element's magnitude, as float32."""
    _, exp = torch.frexp(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny))
    return torch.ldexp(torch.full(t.shape, torch.finfo(t.dtype).eps), exp - 1)


def layout(folder: Path) -> dict[str, list[str]]:
    """Shard file -> the tensor names its header lists."""
    return {p.name: sorted(read_header(p).tensors) for p in sorted(folder.glob("*.safetensors"))}


def peft_unmerge(merged: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's own unmerge of ``adapter`` from the merged checkpoint loaded in ``dtype``: the adapter is marked
    merged in each LoRA layer (as ``merge_adapter`` leaves it), then ``unmerge_adapter`` subtracts its update."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(merged, dtype=dtype), str(adapter))
    for layer in lora_layers(model).values():
        layer.merged_adapters.append("default")
    model.unmerge_adapter()
    state = model.state_dict()
    return {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()}


@pytest.fixture
def merged_3(llama_base_sharded: Path, llama_lora: Path, tmp_path: Path) -> Path:
    """``llama_lora`` merged into the sharded base, cut into at least 3 shards."""
    out = ah.merge(llama_lora, base=llama_base_sharded, out=tmp_path / "merged", max_shard_size="100KB").path
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def test_unmerge_keeps_the_shard_layout_of_from(merged_3, llama_base, llama_lora, tmp_path):
    result = ah.unmerge(llama_lora, merged=merged_3, out=tmp_path / "back")
    back = tmp_path / "back"
    assert layout(back) == layout(merged_3)  # the same files, each holding the same tensors
    assert result.shards == len(layout(merged_3))
    ours, theirs = json.loads((back / INDEX).read_text()), json.loads((merged_3 / INDEX).read_text())
    assert ours == theirs  # the same index: weight map and total size

    # within the tolerance of the single-file unmerge (tests/test_merge.py): at most 1.5 ulp from the base, and
    # bit for bit PEFT's own unmerge
    got, base, merged = read_checkpoint(back), read_checkpoint(llama_base), read_checkpoint(merged_3)
    reference = peft_unmerge(merged_3, llama_lora, torch.float32)
    assert set(got) == set(base)
    for k in base:
        assert got[k].dtype == base[k].dtype
        assert torch.equal(got[k], reference[k]), k
        error = (got[k].double() - base[k].double()).abs()
        assert float((error / ulp(torch.maximum(base[k].abs(), merged[k].abs()))).max()) <= 1.5, k
    torch.testing.assert_close(logits(load_base(back)), logits(load_base(llama_base)), rtol=1e-5, atol=1e-5)


def test_unmerge_max_shard_size_recuts_and_a_single_file_stays_single(merged_3, llama_base, llama_lora, tmp_path):
    one = ah.unmerge(llama_lora, merged=merged_3, out=tmp_path / "one", max_shard_size="5GB")
    assert one.shards == 1 and not (tmp_path / "one" / INDEX).exists()
    kept = ah.unmerge(llama_lora, merged=merged_3, out=tmp_path / "kept")
    assert kept.shards == len(layout(merged_3))
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "kept")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the layout never changes the bits

    single = ah.merge(llama_lora, base=llama_base, out=tmp_path / "single").path
    ah.unmerge(llama_lora, merged=single, out=tmp_path / "single-back")
    assert list(layout(tmp_path / "single-back")) == ["model.safetensors"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_unmerge_dtype_equals_peft_on_the_converted_merged_model(merged_3, llama_lora, tmp_path, dtype):
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    code, output = run_cli("unmerge", llama_lora, "--from", merged_3, "--dtype", dtype, "-o", tmp_path / "b", "--json")
    assert code == 0, output
    back = tmp_path / "b"
    assert layout(back) == layout(merged_3)
    got = read_checkpoint(back)
    assert {t.dtype for t in got.values()} == {torch_dtype}
    config = json.loads((back / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(torch_dtype).removeprefix("torch.")
    reference = peft_unmerge(merged_3, llama_lora, torch_dtype)
    assert all(torch.equal(got[k], reference[k]) for k in got)
    assert load_base(back).dtype == torch_dtype  # transformers loads it in the new dtype


def test_unmerge_dtype_api(merged_3, llama_lora, tmp_path):
    ah.unmerge(llama_lora, merged=merged_3, out=tmp_path / "b", dtype="bf16")
    assert {t.dtype for t in read_checkpoint(tmp_path / "b").values()} == {torch.bfloat16}
    with pytest.raises(ah.UsageError, match="unknown dtype"):
        ah.unmerge(llama_lora, merged=merged_3, out=tmp_path / "x", dtype="int4")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ shard size


@pytest.mark.parametrize("size", ["0", "-1", "-5GB", "0MB"])
@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_a_shard_size_not_above_zero_is_a_usage_error(command, size, llama_base, llama_lora, tmp_path):
    where = "--into" if command == "merge" else "--from"
    code, output = run_cli(command, llama_lora, where, llama_base, "--max-shard-size", size, "-o", tmp_path / "o")
    assert code == 2, output
    assert "--max-shard-size" in output and "not above zero" in output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", [0, -1, "0", "-2MB"])
def test_api_refuses_a_shard_size_not_above_zero(size, llama_base, llama_lora, tmp_path):
    with pytest.raises(ah.UsageError, match="not above zero"):
        ah.merge(llama_lora, base=llama_base, out=tmp_path / "o", max_shard_size=size)
    with pytest.raises(ah.UsageError, match="not above zero"):
        ah.unmerge(llama_lora, merged=llama_base, out=tmp_path / "o", max_shard_size=size)
    assert not (tmp_path / "o").exists()


def test_unmerge_into_its_own_from_names_the_merged_folder(merged_3, llama_lora):
    code, output = run_cli("unmerge", llama_lora, "--from", merged_3, "-o", merged_3)
    assert code == 2, output
    assert "merged folder" in output and "base folder" not in output
