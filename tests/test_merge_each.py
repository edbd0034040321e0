"""`merge --each` / `ah.merge_each`: many adapters, one base, one pass.

Each output must be, tensor for tensor (sha256 of every stored tensor), what merging that adapter alone gives, and
therefore what PEFT's ``merge_and_unload`` gives; each has its own provenance and card; a failure in one output
(an adapter that does not fit, a NaN, a write error) leaves the others written and is reported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from peft_helpers import load_base, read_checkpoint
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.api import each_names
from adapterhub_cli.artifact.provenance import checkpoint_provenance
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.errors import UsageError
from adapterhub_cli.merge import each as each_module


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes (with its dtype and shape), by name, across the shards."""
    return {
        key: hashlib.sha256(
            f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for key, t in read_checkpoint(folder).items()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary folders (``.<name>...incomplete``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def bf16_base(llama_base: Path, tmp_path: Path) -> Path:
    """``llama_base`` saved in bf16 (the dtype merges are usually run in)."""
    out = tmp_path / "base-bf16"
    load_base(llama_base, "causal-lm", torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture
def nan_lora(llama_lora: Path, copy_adapter) -> Path:
    """``llama_lora`` with one NaN in a lora_B (validation of the headers passes; the merge's read refuses it)."""
    bad = copy_adapter(llama_lora, "nan_lora")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    return bad


ADAPTERS = ["llama_lora", "llama_rslora", "llama_dora", "llama_all_linear", "llama_patterns"]


@pytest.mark.parametrize("shard", ["5GB", "100KB"])
def test_each_output_equals_merging_that_adapter_alone(bf16_base, request, tmp_path, shard):
    adapters = [request.getfixturevalue(name) for name in ADAPTERS]
    results = ah.merge_each(adapters, base=bf16_base, out_dir=tmp_path / "each", max_shard_size=shard)
    assert [r.ok for r in results] == [True] * len(adapters), [r.error for r in results]
    assert [r.name for r in results] == [Path(a).name for a in adapters]
    for adapter, r in zip(adapters, results, strict=True):
        assert r.path == tmp_path / "each" / Path(adapter).name and r.merge is not None
        alone = ah.merge(adapter, base=bf16_base, out=tmp_path / f"alone-{r.name}", max_shard_size=shard)
        assert tensor_hashes(r.path) == tensor_hashes(alone.path), r.name
        assert r.merge.shards == alone.shards and r.merge.modules == alone.modules
        assert sorted(p.name for p in r.path.iterdir()) == sorted(p.name for p in alone.path.iterdir())
        # its own lineage: this adapter (and only it) with its sha256, and a card naming it
        record = checkpoint_provenance(r.path)
        assert record is not None
        adapters_in = [i for i in record["inputs"] if i.get("role") == "adapter"]
        assert [Path(i["source"]).name for i in adapters_in] == [r.name] and adapters_in[0]["sha256"]
        assert record["inputs"] == checkpoint_provenance(alone.path)["inputs"]
        assert r.name in (r.path / "README.md").read_text()
    assert leftovers(tmp_path / "each") == []


def test_each_output_is_bit_identical_to_peft(bf16_base, llama_all_linear, llama_dora, tmp_path):
    results = ah.merge_each([llama_all_linear, llama_dora], base=bf16_base, out_dir=tmp_path / "each")
    for adapter, r in zip([llama_all_linear, llama_dora], results, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(load_base(bf16_base, "causal-lm", torch.bfloat16), str(adapter))
            theirs = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
        ours = read_checkpoint(r.path)
        compared = 0
        for key, got in ours.items():
            if key in theirs:
                assert got.dtype == theirs[key].dtype and torch.equal(got, theirs[key]), f"{r.name}: {key}"
                compared += 1
        assert compared == len(theirs)


def test_a_misfit_and_a_nan_fail_their_outputs_only(
    bf16_base, llama_lora, gpt2_lora, nan_lora, llama_rslora, tmp_path
):
    out = tmp_path / "each"
    results = ah.merge_each([llama_lora, gpt2_lora, nan_lora, llama_rslora], base=bf16_base, out_dir=out)
    assert [r.ok for r in results] == [True, False, False, True]
    assert "does not fit" in results[1].error and results[1].hint
    assert "non-finite" in results[2].error and "NaN or inf" in results[2].error
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(llama_lora).name, Path(llama_rslora).name])
    for adapter, r in ((llama_lora, results[0]), (llama_rslora, results[3])):
        alone = ah.merge(adapter, base=bf16_base, out=tmp_path / f"alone-{r.name}")
        assert tensor_hashes(r.path) == tensor_hashes(alone.path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "model.norm.weight"])
def test_a_base_holding_nan_in_an_untouched_tensor_fails_every_output(llama_base, llama_lora, tmp_path, key, dtype):
    """The untouched tensors are checked for NaN / inf once, as stored bytes (numpy, before torch is in for the
    first ones: the embeddings), and refused for every output: nothing is written."""
    base = tmp_path / "base"
    load_base(llama_base, "causal-lm", dtype).save_pretrained(base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors[key].view(-1)[5] = float("nan")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "each"
    results = ah.merge_each([llama_lora, llama_lora], base=base, out_dir=out)
    assert [r.ok for r in results] == [False, False]
    assert all(f"the base's tensor {key} already holds NaN or inf" in (r.error or "") for r in results)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


ORDER_SCRIPT = r"""
import importlib.abc, json, sys, threading
events = []

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            events.append(["torch", threading.current_thread().name])
        return None

base, out, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
import adapterhub_cli as ah
from adapterhub_cli.merge import each
for name in ("_write_bytes", "_write_placed"):
    def spy(*args, real=getattr(each, name), name=name):
        events.append(["write", name, args[-1].path.parent.name, threading.current_thread().name])
        return real(*args)
    setattr(each, name, spy)
sys.meta_path.insert(0, Spy())
results = ah.merge_each(adapters, base=base, out_dir=out)
assert all(r.ok for r in results), results
print(json.dumps(events))
"""


def test_each_writes_the_untouched_tensors_before_its_first_merge_without_torch(
    llama_base, llama_lora, llama_rslora, tmp_path
):
    """In a fresh interpreter (no helper thread: torch is imported where it is first needed) the untouched tensors
    ahead of the first merged one are checked and written to every output before torch is imported, from the one
    buffer they were read into (the last output's write from that buffer itself): what runs while torch imports
    on the helper thread the CLI starts."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "each"
    done = subprocess.run(
        [sys.executable, "-c", ORDER_SCRIPT, str(llama_base), str(out), str(llama_lora), str(llama_rslora)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    events = json.loads(done.stdout.strip().splitlines()[-1])
    kinds = [e[0] for e in events]
    assert kinds.count("torch") == 1 and events[kinds.index("torch")][1] == "MainThread"
    early = events[: kinds.index("torch")]
    outputs = {f".{Path(a).name}." for a in (llama_lora, llama_rslora)}
    for marker in outputs:  # every output got a first untouched tensor; one from the shared buffer itself
        assert any(marker in e[2] for e in early), events[:6]
    assert {e[1] for e in early} == {"_write_bytes", "_write_placed"}, early
    for adapter in (llama_lora, llama_rslora):
        alone = ah.merge(adapter, base=llama_base, out=tmp_path / f"alone-{Path(adapter).name}")
        assert tensor_hashes(out / Path(adapter).name) == tensor_hashes(alone.path)


def test_no_empty_output_folder_stays_when_no_output_is_made(bf16_base, llama_lora, nan_lora, tmp_path, monkeypatch):
    """-o OUT is made for the outputs; when none is made (each failed, or an interrupt), OUT goes too (it would
    block a later merge to OUT), but a folder that was there before stays."""
    out = tmp_path / "each"
    results = ah.merge_each([nan_lora], base=bf16_base, out_dir=out)  # fails while merging, after OUT was made
    assert [r.ok for r in results] == [False] and not out.exists()

    def interrupted(*args, **kwargs):  # Ctrl-C in the main thread, at the first tensor
        raise KeyboardInterrupt

    monkeypatch.setattr(each_module, "_produce", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ah.merge_each([llama_lora], base=bf16_base, out_dir=out)
    assert not out.exists()
    monkeypatch.undo()
    assert ah.merge(llama_lora, base=bf16_base, out=out).path == out  # the path is free for a plain merge

    kept = tmp_path / "kept"
    kept.mkdir()
    assert [r.ok for r in ah.merge_each([nan_lora], base=bf16_base, out_dir=kept)] == [False]
    assert kept.is_dir() and not any(kept.iterdir())


def test_a_failing_clean_up_fails_its_output_without_stopping_its_writer(
    bf16_base, llama_lora, llama_rslora, tmp_path, monkeypatch
):
    """A clean-up (a staging buffer's release) that raises an output's error (an OSError) on its writer thread fails
    that output; the thread lives on (the driver's later puts and the final drain wait on it: no hang), the other
    output is whole."""
    real = each_module._Shared.take
    victim = {"n": 0}

    def take(self):
        release = real(self)

        def failing_release() -> None:
            release()  # (the buffer goes back all the same)
            if threading.current_thread().name.startswith("adapters-writer"):
                victim["n"] += 1
                if victim["n"] == 2:
                    raise OSError(errno.EIO, "release failed (injected)")

        return failing_release

    monkeypatch.setattr(each_module._Shared, "take", take)
    results = ah.merge_each([llama_lora, llama_rslora], base=bf16_base, out_dir=tmp_path / "each")
    assert sorted(r.ok for r in results) == [False, True] and victim["n"] >= 2
    failed = next(r for r in results if not r.ok)
    assert "release failed (injected)" in (failed.error or "") and not failed.path.exists()
    monkeypatch.undo()
    good = next(r for r in results if r.ok)
    alone = ah.merge(good.adapter, base=bf16_base, out=tmp_path / "alone")
    assert tensor_hashes(good.path) == tensor_hashes(alone.path)


@pytest.mark.parametrize("where", ["_write_bytes", "_write_placed"])
def test_a_write_error_in_one_output_leaves_the_others(
    bf16_base, llama_lora, llama_rslora, llama_dora, tmp_path, monkeypatch, where
):
    """A write that fails (an untouched tensor copied into the staging chunks, or a tensor the disk writes from its
    own buffer) fails its output only; its staging buffers go back (the others would wait for them otherwise)."""
    real = getattr(each_module, where)
    victim = Path(llama_rslora).name
    calls = {"n": 0}

    def failing(*args):
        sink = args[-1]
        if f".{victim}." in sink.path.parent.name:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        real(*args)

    monkeypatch.setattr(each_module, where, failing)
    out = tmp_path / "each"
    results = ah.merge_each(
        [llama_lora, llama_rslora, llama_dora], base=bf16_base, out_dir=out, max_shard_size="100KB"
    )
    assert [r.ok for r in results] == [True, False, True]
    assert "No space left on device" in results[1].error
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(llama_lora).name, Path(llama_dora).name])
    assert calls["n"] >= 3
    monkeypatch.setattr(each_module, where, real)
    for adapter, r in ((llama_lora, results[0]), (llama_dora, results[2])):
        alone = ah.merge(adapter, base=bf16_base, out=tmp_path / f"alone-{r.name}", max_shard_size="100KB")
        assert tensor_hashes(r.path) == tensor_hashes(alone.path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_each_on_cuda_without_a_gpu_is_refused_with_nothing_written(bf16_base, llama_lora, llama_rslora, tmp_path):
    """The device's name is checked at once, whether the GPU is there once torch is in (before any output is
    written): refused, no output folder, no temporary folder."""
    out = tmp_path / "each"
    with pytest.raises(UsageError, match="no CUDA device"):
        ah.merge_each([llama_lora, llama_rslora], base=bf16_base, out_dir=out, device="cuda")
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(UsageError, match="unknown device"):
        ah.merge_each([llama_lora], base=bf16_base, out_dir=out, device="cuda-ish")


def test_names_are_unique_plain_folder_names(tmp_path, llama_lora):
    bare = tmp_path / "x" / "adapter_model.safetensors"
    named = tmp_path / "y" / "style.safetensors"
    assert each_names([llama_lora, llama_lora, bare, named, Path(llama_lora)]) == [
        Path(llama_lora).name,
        f"{Path(llama_lora).name}-2",
        "x",
        "style",
        f"{Path(llama_lora).name}-3",
    ]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        ah.merge_each([llama_lora], base=llama_lora, out_dir=tmp_path / "file")
    hidden = tmp_path / ".hidden"
    with pytest.raises(UsageError, match="not a plain folder name"):
        each_names([hidden])


def test_cli_each_reports_each_output_and_exits_1_on_a_failure(bf16_base, llama_lora, gpt2_lora, tmp_path):
    runner = CliRunner()
    out = tmp_path / "each"
    res = runner.invoke(
        build_cli(), ["merge", str(llama_lora), str(gpt2_lora), "--into", str(bf16_base), "--each", "-o", str(out)]
    )
    assert res.exit_code == 1, res.output
    assert f"into {out / Path(llama_lora).name}" in res.output
    assert f"Error: {Path(gpt2_lora).name}: " in res.output and "does not fit" in res.output
    assert sorted(p.name for p in out.iterdir()) == [Path(llama_lora).name]
    res = runner.invoke(
        build_cli(),
        ["merge", str(llama_lora), "--into", str(bf16_base), "--each", "-o", str(tmp_path / "j"), "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [(d["name"], d["ok"], d["path"]) for d in data] == [
        (Path(llama_lora).name, True, str(tmp_path / "j" / Path(llama_lora).name))
    ]
    assert data[0]["merge"]["tensors_merged"] > 0


def test_cli_each_refuses_weights_and_existing_outputs(bf16_base, llama_lora, llama_rslora, tmp_path):
    runner = CliRunner()
    args = ["merge", str(llama_lora), str(llama_rslora), "--into", str(bf16_base), "--each", "-o", str(tmp_path / "o")]
    res = runner.invoke(build_cli(), [*args, "--weights", "1,0.5"])
    assert res.exit_code == 2 and "--weights does not apply to --each" in res.output
    assert not (tmp_path / "o").exists()
    assert runner.invoke(build_cli(), args).exit_code == 0
    first = tensor_hashes(tmp_path / "o" / Path(llama_lora).name)
    res = runner.invoke(build_cli(), args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert runner.invoke(build_cli(), [*args, "--overwrite"]).exit_code == 0
    assert tensor_hashes(tmp_path / "o" / Path(llama_lora).name) == first
    shutil.rmtree(tmp_path / "o")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_on_cuda_equals_merging_each_adapter_alone_on_cuda(bf16_base, llama_lora, llama_dora, tmp_path):
    adapters = [llama_lora, llama_dora]
    results = ah.merge_each(adapters, base=bf16_base, out_dir=tmp_path / "each", device="cuda")
    for adapter, r in zip(adapters, results, strict=True):
        assert r.ok, r.error
        alone = ah.merge(adapter, base=bf16_base, out=tmp_path / f"alone-{r.name}", device="cuda")
        assert tensor_hashes(r.path) == tensor_hashes(alone.path)


@pytest.mark.parametrize("last_merges_more", [True, False])
def test_each_writes_merged_tensors_from_the_buffers_they_were_merged_in(
    bf16_base, llama_lora, llama_all_linear, tmp_path, monkeypatch, last_merges_more
):
    """The shared base tensor is read where its last output writes it from (merged there in place), the other
    outputs merge into their own buffers at their own offsets: every merged tensor is written by the disk from its
    buffer, the last output's untouched tensors too (also those an output before it merged); the outputs equal
    plain buffered ones."""
    from collections import Counter

    from adapterhub_cli.merge import direct_io

    calls: Counter[str] = Counter()
    placed, copied = direct_io.StagedFile.write_placed, direct_io.StagedFile.write_tensor

    def spy_placed(self, *args):
        calls[f"placed {self.path.parent.name.split('.')[1]}"] += 1
        return placed(self, *args)

    def spy_copied(self, t):
        calls[f"copied {self.path.parent.name.split('.')[1]}"] += 1
        return copied(self, t)

    monkeypatch.setattr(direct_io.StagedFile, "write_placed", spy_placed)
    monkeypatch.setattr(direct_io.StagedFile, "write_tensor", spy_copied)
    adapters = [llama_lora, llama_all_linear] if last_merges_more else [llama_all_linear, llama_lora]
    results = ah.merge_each(adapters, base=bf16_base, out_dir=tmp_path / "each")
    first, last = (Path(a).name for a in adapters)
    assert results[0].merge is not None and results[1].merge is not None
    assert calls[f"placed {first}"] == results[0].merge.tensors_merged
    assert calls[f"placed {last}"] == results[1].merge.tensors and calls[f"copied {last}"] == 0, calls
    monkeypatch.setenv("ADAPTERS_DIRECT_IO", "0")
    buffered = ah.merge_each(adapters, base=bf16_base, out_dir=tmp_path / "buffered")
    for r, b in zip(results, buffered, strict=True):
        assert tensor_hashes(r.path) == tensor_hashes(b.path)
