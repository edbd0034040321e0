"""adapterhub_cli.io: the pure-Python safetensors header reader, hashing with its cache, atomic output, JSON."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub_cli.artifact import files as ah_io
from adapterhub_cli.artifact.files import OUTPUT_MARKER, atomic_dir, read_json, sha256_file
from adapterhub_cli.artifact.safetensors import load_safetensors, read_header
from adapterhub_cli.errors import AdapterNotFoundError, CorruptFileError


def _raw_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _assert_header_matches_safe_open(path: Path) -> None:
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert set(header.tensors) == keys
        assert header.metadata == (f.metadata() or {})
        for name in keys:
            sl = f.get_slice(name)
            info = header.tensors[name]
            assert info.name == name
            assert list(info.shape) == sl.get_shape(), name
            assert info.dtype == sl.get_dtype(), name
    raw = _raw_header(path)
    raw.pop("__metadata__", None)
    for name, entry in raw.items():
        info = header.tensors[name]
        assert [info.start, info.end] == entry["data_offsets"]
    assert header.file_size == path.stat().st_size
    assert header.header_size == struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header.path == path


# ------------------------------------------------------------------------------ read_header


def test_read_header_matches_safe_open_on_adapter(llama_lora: Path) -> None:
    path = llama_lora / "adapter_model.safetensors"
    _assert_header_matches_safe_open(path)
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    q_a = header.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert (q_a.dtype, q_a.shape) == ("F32", (8, 64))
    assert q_a.numel == 512
    assert q_a.nbytes == 512 * 4
    v_b = header.tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert v_b.shape == (32, 8)  # 2 kv heads x head_dim 16
    assert len(header.tensors) == 8


def test_read_header_matches_safe_open_on_base_and_shards(llama_base: Path, llama_base_sharded: Path) -> None:
    _assert_header_matches_safe_open(llama_base / "model.safetensors")
    shards = sorted(llama_base_sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    union: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        _assert_header_matches_safe_open(shard)
        union.update({k: t.shape for k, t in read_header(shard).tensors.items()})
    single = {k: t.shape for k, t in read_header(llama_base / "model.safetensors").tensors.items()}
    assert union == single
    assert single["model.embed_tokens.weight"] == (128, 64)


def test_read_header_many_dtypes_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "f16": torch.ones(4, dtype=torch.float16),
        "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
        "f64": torch.zeros(1, dtype=torch.float64),
        "i64": torch.arange(7),
        "i8": torch.zeros(2, 2, dtype=torch.int8),
        "u8": torch.zeros(9, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, path, metadata={"lora_alpha": "16", "note": "hello"})
    _assert_header_matches_safe_open(path)
    header = read_header(path)
    assert header.metadata == {"lora_alpha": "16", "note": "hello"}
    dtypes = {k: t.dtype for k, t in header.tensors.items()}
    assert dtypes == {
        "f32": "F32",
        "f16": "F16",
        "bf16": "BF16",
        "f64": "F64",
        "i64": "I64",
        "i8": "I8",
        "u8": "U8",
        "flag": "BOOL",
        "scalar": "F32",
        "empty": "F32",
    }
    assert header.tensors["scalar"].shape == ()
    assert header.tensors["scalar"].numel == 1
    assert header.tensors["empty"].shape == (0, 4)
    assert header.tensors["empty"].nbytes == 0
    assert header.tensors["bf16"].nbytes == 15 * 2
    loaded = load_safetensors(path, ["f32", "bf16"])
    assert set(loaded) == {"f32", "bf16"}
    assert torch.equal(loaded["f32"], tensors["f32"])
    assert torch.equal(loaded["bf16"], tensors["bf16"])


def test_read_header_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError) as exc:
        read_header(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(exc.value)


def test_read_header_rejects_header_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.safetensors"
    js = b"[1, 2]"
    path.write_bytes(struct.pack("<Q", len(js)) + js)
    with pytest.raises(CorruptFileError, match="not a JSON object"):
        read_header(path)


def test_read_header_rejects_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    js = json.dumps({"__metadata__": {"n": 3}}).encode()
    path.write_bytes(struct.pack("<Q", len(js)) + js)
    with pytest.raises(CorruptFileError, match="__metadata__ must map strings to strings"):
        read_header(path)


def test_read_header_rejects_size_disagreeing_with_shape(tmp_path: Path) -> None:
    path = tmp_path / "size.safetensors"
    js = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(js)) + js + bytes(12))
    with pytest.raises(CorruptFileError) as exc:
        read_header(path)
    assert "12 bytes stored but F32 x [2, 2] needs 16" in str(exc.value)
    assert exc.value.module == "w"


# ------------------------------------------------------------------------------ sha256_file


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_sha256_of_a_file_just_written_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"fresh")
    assert sha256_file(path) == hashlib.sha256(b"fresh").hexdigest()
    assert not (tmp_path / "cache" / "adapterhub_cli" / "sha256.json").exists()


def test_sha256_matches_hashlib_and_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("ADAPTERS_CACHE", str(cache_root))
    path = tmp_path / "blob.bin"
    payload = os.urandom(70_000)
    path.write_bytes(payload)
    _age(path, 60)  # a file modified seconds ago is "racy" and never cached
    want = hashlib.sha256(payload).hexdigest()

    assert sha256_file(path) == want
    cache_file = cache_root / "adapterhub_cli" / "sha256.json"
    assert cache_file.is_file()
    cache = json.loads(cache_file.read_text())
    assert list(cache.values()) == [want]
    (key,) = cache
    st = path.stat()
    assert key.startswith(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:")
    assert key.endswith(str(path.resolve()))

    # Second call: answered from the cache, the file is not hashed again.
    def no_hashing(*args: object, **kwargs: object) -> None:
        raise AssertionError("sha256 recomputed although the cache holds it")

    monkeypatch.setattr(ah_io.hashlib, "sha256", no_hashing)
    assert sha256_file(path) == want
    # The cache is really what answers: a planted value comes back.
    cache_file.write_text(json.dumps({key: "f" * 64}))
    assert sha256_file(path) == "f" * 64


def test_sha256_cache_invalidated_when_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "blob.bin"
    path.write_bytes(b"first version")
    _age(path, 60)
    assert sha256_file(path) == hashlib.sha256(b"first version").hexdigest()
    path.write_bytes(b"second version!")
    _age(path, 30)
    assert sha256_file(path) == hashlib.sha256(b"second version!").hexdigest()
    cache = json.loads((tmp_path / "cache" / "adapterhub_cli" / "sha256.json").read_text())
    assert sorted(cache.values()) == sorted(
        [hashlib.sha256(b"first version").hexdigest(), hashlib.sha256(b"second version!").hexdigest()]
    )


def test_sha256_without_cache_and_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty, use_cache=False) == hashlib.sha256(b"").hexdigest()
    assert not (tmp_path / "cache").exists()


def test_sha256_of_real_adapter(llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path))
    path = llama_lora / "adapter_model.safetensors"
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ atomic_dir


def test_atomic_dir_success_moves_into_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.is_dir()
        assert not target.exists()  # nothing visible until done
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("world")
    assert (target / "a.txt").read_text() == "hello"
    assert (target / "sub" / "b.txt").read_text() == "world"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_on_error_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        seen.append(tmp)
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("boom")
    assert not target.exists()
    assert not seen[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_on_keyboard_interrupt_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert not target.exists()
    assert list((tmp_path / "nested").iterdir()) == []


def test_atomic_dir_refuses_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(target):
        pytest.fail("must not be entered")
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:  # an earlier output of this tool: only such a folder may be replaced
        (tmp / "old.txt").write_text("old")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "old.txt"]
    # A failing overwrite keeps the old output intact.
    with pytest.raises(ValueError, match="fail"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("fail")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A successful one replaces it completely.
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # still the old one while writing
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ read_json


def test_read_json(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"r": 8}')
    assert read_json(good) == {"r": 8}
    with pytest.raises(AdapterNotFoundError, match=r"config\.json not found"):
        read_json(tmp_path / "missing.json", "config.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{r: 8")
    with pytest.raises(CorruptFileError) as exc:
        read_json(bad, "config.json")
    assert str(exc.value).startswith(f"{bad}: config.json is not valid JSON")
    assert exc.value.path == bad
    arr = tmp_path / "arr.json"
    arr.write_text("[1]")
    with pytest.raises(CorruptFileError, match="must hold a JSON object"):
        read_json(arr)


def test_read_json_keeps_what_is_valid_and_odd(tmp_path: Path) -> None:
    """Surrogate pairs (an emoji), NaN, infinities, 1e400 (inf), long floats and 64 levels of nesting are read."""
    f = tmp_path / "odd.json"
    nested = "[" * 63 + "]" * 63
    f.write_text(
        '{"name": "a\\ud83d\\ude00", "nan": NaN, "inf": -Infinity, "big": 1e400, "long": 0.'
        + "1" * 5000
        + f', "deep": {nested}}}'
    )
    doc = read_json(f)
    assert doc["name"] == "a\U0001f600" and doc["inf"] == -math.inf and doc["big"] == math.inf
    assert math.isnan(doc["nan"]) and doc["long"] == pytest.approx(0.1111111111)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 65 + "]" * 65, "nests JSON more than 64 levels deep"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests JSON arrays or objects too deeply"),
        ('{"a": 1' + "0" * 4300 + "}", "holds a number that is too long (over 4300 digits)"),
        ('{"a": "x\\udc00y"}', "holds a string with a lone surrogate (\\udc00), which is not Unicode: x\\udc00y"),
        ('{"a\\ud800": 1}', "holds a string with a lone surrogate (\\ud800)"),
        ('{"a": ["\\ud83d"]}', "lone surrogate (\\ud83d)"),  # the first half of a pair, alone
    ],
)
def test_read_json_refuses_odd_documents_cleanly(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "x.json"
    f.write_text(text)
    with pytest.raises(CorruptFileError) as exc:
        read_json(f, "config.json")
    assert str(exc.value).startswith(f"{f}: config.json ") and message in str(exc.value)
    assert exc.value.path == f and "\n" not in str(exc.value)


def test_read_json_refuses_a_file_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big.json"
    f.write_text('{"a": "' + "x" * 100 + '"}')
    monkeypatch.setattr(ah_io, "MAX_JSON_BYTES", 64)
    with pytest.raises(CorruptFileError, match=f"config.json is {f.stat().st_size} bytes; JSON over 64 bytes"):
        read_json(f, "config.json")


def test_read_header_accepts_unicode_names_and_refuses_lone_surrogates(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"blocks.\u00e9t\U0001f600.weight": torch.zeros(2)}, good, metadata={"note": "\u00e9t\U0001f600"})
    assert list(read_header(good).tensors) == ["blocks.\u00e9t\U0001f600.weight"]
    bad = tmp_path / "bad.safetensors"
    js = b'{"x\\udfff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    bad.write_bytes(struct.pack("<Q", len(js)) + js + bytes(4))
    with pytest.raises(CorruptFileError, match=r"header holds a string with a lone surrogate \(\\udfff\)"):
        read_header(bad)


def test_save_safetensors_round_trips_and_is_reproducible(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from adapterhub_cli.artifact.safetensors import save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(7, generator=g),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.zeros(0, 4),
        "f.view": torch.randn(4, 6, generator=g).T,  # not contiguous
    }
    meta = {"z": "1", "format": "pt", "a": "x"}
    save_safetensors(tensors, tmp_path / "one.safetensors", meta)
    save_safetensors(dict(reversed(tensors.items())), tmp_path / "two.safetensors", dict(reversed(meta.items())))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    loaded = load_file(tmp_path / "one.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        assert f.metadata() == meta
    assert read_header(tmp_path / "one.safetensors").header_size % 8 == 0


def test_atomic_dir_sweeps_folders_left_by_killed_runs(tmp_path: Path) -> None:
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc.incomplete"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    mine = tmp_path / f".out.{os.getpid()}.xyz.incomplete"  # a live process: left alone
    mine.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "out"]


# ------------------------------------------------------------------------------ umask


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_follow_umask_gives_what_tempfile_made_private_the_usual_modes(tmp_path: Path, mask: int) -> None:
    import tempfile

    old = os.umask(mask)
    try:
        assert ah_io.current_umask() == mask
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        fd, name = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        assert (folder.stat().st_mode & 0o777, Path(name).stat().st_mode & 0o777) == (0o700, 0o600)
        ah_io.follow_umask(folder)
        ah_io.follow_umask(name)
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
        assert Path(name).stat().st_mode & 0o777 == 0o666 & ~mask
        assert ah_io.current_umask() == mask  # reading it changed nothing
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
        assert (tmp_path / "out" / "f").stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------ the Adapter's repr


def test_adapter_repr_is_one_short_line(llama_lora: Path, llama_patterns: Path) -> None:
    import adapterhub_cli as ah

    a = ah.load(llama_lora)
    text = repr(a)
    assert "\n" not in text and len(text) < 200 + len(str(llama_lora))
    assert text == (
        f"<Adapter {str(llama_lora)!r} format=peft r={a.config.r} alpha={a.config.lora_alpha:g} "
        f"modules={len(a.modules)} dtype=F32>"
    )
    assert not any(name in text for name in a.modules)  # the modules are counted, not listed
    p = ah.load(llama_patterns)
    ranks = sorted({m.rank for m in p.modules.values()})
    assert len(ranks) > 1 and f"r={p.config.r} (ranks {ranks[0]}..{ranks[-1]})" in repr(p)
