"""Start-up hidden behind I/O: a merge plans, copies the side files, writes the card and copies the untouched tensors
before the first merged one without torch (so they run while torch imports on the helper thread the CLI starts);
the NaN / inf checks ride on reads the merge does anyway (the base's untouched tensors as they are copied, the
adapter's factors as they are loaded), and still refuse with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.errors import InvalidAdapterError
from adapterhub_cli.merge.shards import FiniteCheck


ORDER_SCRIPT = r"""
import importlib.abc, json, sys
events = []

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            events.append(("torch", sorted(p.name for tmp in out.parent.glob(".*incomplete") for p in tmp.iterdir())))
        return None

from pathlib import Path
base, adapter, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from adapterhub_cli.merge import direct_io
copy_range = direct_io.StagedFile.copy_range
def spy_copy(self, fd, offset, nbytes, check=None):
    events.append(("copy", nbytes, check is not None))
    return copy_range(self, fd, offset, nbytes, check)
direct_io.StagedFile.copy_range = spy_copy
import adapterhub_cli.api as api
loaded = api.load(adapter)
view = api.open_base(base)
assert "torch" not in sys.modules, "reading headers imported torch"
sys.meta_path.insert(0, Spy())
from adapterhub_cli.merge.engine import run_merge
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
try:
    run_merge(view, [loaded], out, device=device)
except Exception as e:
    events.append(("error", type(e).__name__, str(e)))
print(json.dumps(events))
"""


def _merge_events(base: Path, adapter: Path, out: Path, device: str) -> list[list[Any]]:
    """What :data:`ORDER_SCRIPT` saw of a merge in a fresh interpreter: copies, torch's import, an error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", ORDER_SCRIPT, str(base), str(adapter), str(out), device],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    events: list[list[Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return events


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_cuda_merge_plans_and_copies_before_torch_and_asks_for_the_gpu_once_torch_is_in(
    llama_base, llama_lora, tmp_path
):
    """``--device cuda`` overlaps torch's import (and CUDA's start) as the CPU merge does: the device's name is
    checked at once, whether such a GPU is present once torch is in, before any update; without one the merge
    is refused with nothing written."""
    out = tmp_path / "merged"
    events = _merge_events(llama_base, llama_lora, out, "cuda")
    kinds = [e[0] for e in events]
    assert kinds[-1] == "error" and events[-1][1] == "UsageError" and "no CUDA device" in events[-1][2]
    assert kinds.index("copy") < kinds.index("torch"), events[:5]
    assert not out.exists() and not list(tmp_path.glob(".*incomplete*"))


def test_the_merge_needs_no_torch_until_its_first_merged_tensor(llama_base, llama_lora, tmp_path):
    """In a fresh interpreter: the plan, side files, card and the untouched tensors ahead of the first merged one
    come before torch is imported (each copy checked for NaN / inf on the way)."""
    out = tmp_path / "merged"
    events = _merge_events(llama_base, llama_lora, out, "cpu")
    kinds = [e[0] for e in events]
    assert kinds.count("torch") == 1
    first_torch = kinds.index("torch")
    before = events[:first_torch]
    assert before and all(e[0] == "copy" and e[2] for e in before), events[:5]  # embeddings, norms: checked copies
    ready = set(events[first_torch][1])
    assert {"config.json", "README.md"} <= ready, ready
    assert (out / "config.json").exists() and (out / "README.md").exists()


EARLY_READ_SCRIPT = r"""
import importlib.abc, json, sys, threading
events, read = [], threading.Event()

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules and not events.count(("torch", True)):
            # torch's import waits (up to 60 s) for a first read: reads that needed torch would never come
            events.append(("torch", read.wait(60)))
        return None

from pathlib import Path
base, adapter, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
import adapterhub_cli.api as api
from adapterhub_cli.merge import shards
read_into = shards.read_into
def spy_read(fd, info, *args, **kwargs):
    events.append(("read", info.name, "torch" in sys.modules))
    read_into(fd, info, *args, **kwargs)
    read.set()
shards.read_into = spy_read
loaded, view = api.load(adapter), api.open_base(base)
sys.meta_path.insert(0, Spy())
from adapterhub_cli.merge.engine import run_merge
run_merge(view, [loaded], out)
print(json.dumps(events))
"""


def test_the_first_tensors_to_merge_are_read_into_staging_buffers_before_torch_is_imported(
    llama_base, llama_lora, tmp_path
):
    """In a fresh interpreter the read-ahead starts with the merge: the first base tensors to merge are read into
    the (numpy) staging buffers without torch, while the untouched ones are copied and torch imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", EARLY_READ_SCRIPT, str(llama_base), str(llama_lora), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    events = [tuple(e) for e in json.loads(done.stdout.strip().splitlines()[-1])]
    first_torch = events.index(("torch", True))  # a read came while torch's import waited for one
    early = [e for e in events[:first_torch] if e[0] == "read"]
    assert early and not any(e[2] for e in early), events[:6]
    assert len([e for e in events if e[0] == "read"]) == len({e[1] for e in events if e[0] == "read"})
    reference = tmp_path / "reference"
    ah.merge([llama_lora], base=llama_base, out=reference)
    got, want = load_file(tmp_path / "merged" / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", ["auto", "bf16"])  # (the fixture base is float32)
def test_merged_tensors_are_written_from_the_buffer_they_were_read_and_merged_in(
    llama_base, llama_lora, tmp_path, monkeypatch, dtype
):
    """Each merged weight is read into its staging buffer at its output offset modulo the page and merged there, so
    the disk writes it from that buffer (no copy into the staging chunks); a weight converted to another dtype is a
    new tensor and is copied. Either way the output equals a merge through plain buffered writes."""
    from adapterhub_cli.merge import direct_io

    calls: Counter[str] = Counter()
    placed, copied = direct_io.StagedFile.write_placed, direct_io.StagedFile.write_tensor

    def spy_placed(self, *args):
        calls["placed"] += 1
        return placed(self, *args)

    def spy_copied(self, t):
        calls["copied"] += 1
        return copied(self, t)

    monkeypatch.setattr(direct_io.StagedFile, "write_placed", spy_placed)
    monkeypatch.setattr(direct_io.StagedFile, "write_tensor", spy_copied)
    result = ah.merge([llama_lora], base=llama_base, out=tmp_path / "placed", dtype=dtype)
    merged = result.tensors_merged
    assert merged > 0
    if dtype == "auto":  # stored dtype kept: every merged weight goes out from its own buffer
        assert calls["placed"] == merged and calls["copied"] == 0, calls
    else:  # converted: new tensors, copied
        assert calls["placed"] == 0 and calls["copied"] >= merged, calls
    monkeypatch.setenv("ADAPTERS_DIRECT_IO", "0")
    ah.merge([llama_lora], base=llama_base, out=tmp_path / "buffered", dtype=dtype)
    got, want = (
        load_file(tmp_path / "placed" / "model.safetensors"),
        load_file(tmp_path / "buffered" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_importing_the_api_and_planning_import_no_torch(llama_base, llama_lora):
    script = (
        "import sys\n"
        "import adapterhub_cli as ah\n"
        "from adapterhub_cli.merge.plan import build_plan\n"
        "from adapterhub_cli.artifact.provenance import merge_provenance, base_record\n"
        f"view, a = ah.open_base({str(llama_base)!r}), ah.load({str(llama_lora)!r})\n"
        "plan = build_plan(view, [a], weights=None, dtype='auto', max_shard_size='5GB', reverse=False,"
        " quantize=None)\n"
        "merge_provenance('merge', {}, base_record(plan.view, None), [a])\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "False"


def test_warmup_imports_torch_on_a_helper_thread():
    script = (
        "import sys, threading\n"
        "from adapterhub_cli import warmup\n"
        "warmup.start('cpu'); warmup.start('cpu')\n"
        "threads = [t for t in threading.enumerate() if t.name == 'adapters-import-torch']\n"
        "assert len(threads) == 1 and threads[0].daemon\n"
        "threads[0].join()\n"
        "import gc, torch\n"
        "print('torch' in sys.modules, gc.isenabled(), gc.get_freeze_count() > 10000,"
        " any(o is torch.nn.Module for o in gc.get_objects()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    # torch is in; the collector runs again, and what the import made is frozen (collections no longer walk it)
    assert done.stdout.strip() == "True True True False"


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32"), (torch.float64, "F64")],
)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_finite_check_agrees_with_torch_in_any_pieces(dtype, name, bad, piece):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype) * 1000
    if bad is not None:
        t[517] = bad
    data = memoryview(t.view(torch.uint8).numpy().tobytes())
    check = FiniteCheck("w", name)

    def feed() -> None:
        for i in range(0, len(data), piece):
            check(data[i : i + piece])

    if bool(torch.isfinite(t).all()):
        feed()
    else:
        with pytest.raises(InvalidAdapterError, match="base's tensor w already holds NaN or inf"):
            feed()


def test_a_nan_in_the_adapter_is_refused_by_the_merges_own_read(llama_base, llama_lora, copy_adapter, tmp_path):
    """Validation reads headers only; each factor is read once, by the merge, which refuses a NaN, writing nothing."""
    bad = copy_adapter(llama_lora, "nan")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[-1]  # the last module: refused late, still nothing written
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match=rf"non-finite: tensor {key} holds NaN or inf"):
        ah.merge(bad, base=llama_base, out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    adapter = ah.load(llama_lora)
    reads: Counter[str] = Counter()
    load = adapter.source.load

    def counted(keys):
        reads.update(keys)
        return load(keys)

    adapter.source.load = counted  # type: ignore[method-assign]
    result = ah.merge(adapter, base=llama_base, out=tmp_path / "ok")
    assert result.modules and set(reads.values()) == {1}
    assert set(reads) == {t.name for t in adapter.all_tensor_infos()}


def test_an_untrained_adapter_still_warns(llama_base, llama_lora, copy_adapter, tmp_path):
    zero = copy_adapter(llama_lora, "zero")
    tensors = load_file(str(zero / "adapter_model.safetensors"))
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
        str(zero / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    result = ah.merge(zero, base=llama_base, out=tmp_path / "out")
    assert any(w.startswith("untrained: every lora_B is zero") for w in result.warnings), result.warnings
    assert not any("untrained" in w for w in ah.merge(llama_lora, base=llama_base, out=tmp_path / "o2").warnings)


def test_copied_tensor_nan_is_refused_with_buffered_writes_too(llama_base, llama_lora, tmp_path, monkeypatch):
    """Without O_DIRECT (tmpfs, ADAPTERS_DIRECT_IO=0) the kernel copy gives way to read + check + write."""
    monkeypatch.setenv("ADAPTERS_DIRECT_IO", "0")
    base = tmp_path / "base"
    base.mkdir()
    for f in Path(llama_base).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match=r"model\.norm\.weight already holds NaN or inf"):
        ah.merge(llama_lora, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_torch_that_fails_to_import_on_the_warmup_thread_fails_again_where_the_merge_imports_it(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('this torch is broken')\n")
    script = (
        "import sys, threading\n"
        "from adapterhub_cli import warmup\n"
        "warmup.start('cuda:0')\n"
        "[t.join() for t in threading.enumerate() if t.name == 'adapters-import-torch']\n"
        "try:\n"
        "    import torch\n"
        "except ImportError as e:\n"
        "    print('raised:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "raised: this torch is broken" and not done.stderr


IMPORTER_SCRIPT = r"""
import importlib.abc, json, sys, threading, time
importers = []

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            importers.append(threading.current_thread().name)
        return None

sys.meta_path.insert(0, Spy())
args, delay = json.loads(sys.argv[1]), float(sys.argv[2])
if delay:
    from adapterhub_cli import warmup
    slow = warmup._import_torch
    warmup._import_torch = lambda device: (time.sleep(delay), slow(device))  # the helper starts late
from adapterhub_cli.cli.main import main
sys.argv = ["adapters", *args]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(sorted(set(importers)))
"""


def _torch_importers(args: list[str], delay: float = 0.0) -> str:
    """The threads that imported torch while the CLI ran ``args`` in a fresh interpreter (the helper thread
    started ``delay`` seconds late)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", IMPORTER_SCRIPT, json.dumps(args), str(delay)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("each", [False, True])
def test_the_cli_merge_imports_torch_on_the_helper_thread_only(llama_base, llama_lora, tmp_path, each):
    """The main thread waits for the helper's import (:func:`adapterhub_cli.warmup.wait`) instead of importing torch
    itself when it gets to its first merged tensor before the helper has begun (``--each`` too)."""
    out = tmp_path / "merged"
    args = ["merge", str(llama_lora), "--into", str(llama_base), "-o", str(out)]
    if each:
        args += ["--each"]
        out = out / Path(llama_lora).name
    assert _torch_importers(args, delay=1.0) == "['adapters-import-torch']"
    reference = ah.merge([llama_lora], base=llama_base, out=tmp_path / "in-process")
    merged, expected = load_file(out / "model.safetensors"), load_file(reference.path / "model.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("command", ["reduce", "quantize", "combine", "convert", "validate", "diff", "analyze"])
def test_other_commands_import_torch_on_the_helper_thread(command, llama_lora, llama_base, tmp_path):
    """The other commands that load tensors start torch's import on the helper thread too, while they read
    headers."""
    out = tmp_path / "out"
    args = {
        "reduce": ["reduce", str(llama_lora), "--rank", "2", "-o", str(out)],
        "quantize": ["quantize", str(llama_lora), "--to", "int8", "-o", str(out)],
        "combine": ["combine", str(llama_lora), str(llama_lora), "-o", str(out)],
        "convert": ["convert", str(llama_lora), "--to", "peft", "-o", str(out)],
        "validate": ["validate", str(llama_lora), "--base", str(llama_base)],
        "diff": ["diff", str(llama_lora), str(llama_lora)],
        "analyze": ["analyze", str(llama_lora), "--base", str(llama_base)],
    }[command]
    assert _torch_importers(args) == "['adapters-import-torch']"
    assert command in ("validate", "diff", "analyze") or ah.load(out).modules  # (the command wrote its output)
