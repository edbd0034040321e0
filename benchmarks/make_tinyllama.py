#!/usr/bin/env python
"""Build a TinyLlama-1.1B-shaped benchmark fixture: a bf16 base checkpoint plus an r=64 PEFT LoRA adapter.

The base is a ``LlamaForCausalLM`` checkpoint in the exact on-disk layout ``save_pretrained`` produces
(``config.json``, ``generation_config.json``, ``model-0000k-of-0000n.safetensors`` shards and
``model.safetensors.index.json``), filled with seeded random tensors. It is written tensor by tensor without
instantiating the model, so peak memory stays around one shard (~1 GB). The adapter is an all-linear fp32 LoRA adapter
(``adapter_config.json`` written by ``peft.LoraConfig.save_pretrained`` and ``adapter_model.safetensors``) in PEFT's
saved key layout, with a non-zero ``lora_B`` so that merging it actually changes the weights.

Each folder is written into a temporary sibling and moved into place with ``os.replace`` only once complete, with a
``DONE`` marker written last, so a killed run never leaves a half-written fixture behind.

Usage::

    python benchmarks/make_tinyllama.py                    # full fixture in benchmarks/.data/tinyllama
    python benchmarks/make_tinyllama.py --tiny --verify    # tiny variant, checked with transformers + peft

From Python (repository root on ``sys.path``; ``benchmarks`` is a namespace package)::

    from benchmarks.make_tinyllama import ensure_fixture
    base_dir, adapter_dir = ensure_fixture(pathlib.Path("benchmarks/.data/tinyllama"))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file


try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms just go without the inter-process lock
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # transformers and peft are slow to import; only the generators and --verify need them
    from peft import LoraConfig
    from transformers import LlamaConfig

logger = logging.getLogger("make_tinyllama")

# Bump whenever the generated content or layout changes: existing fixtures then count as stale and are rebuilt.
FIXTURE_VERSION = 1

BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_ROOT = BENCHMARKS_DIR / ".data" / "tinyllama"
DEFAULT_TINY_ROOT = BENCHMARKS_DIR / ".data" / "tinyllama-tiny"

BASE_DIRNAME = "base"
ADAPTER_DIRNAME = "adapter"
DONE_NAME = "DONE"
SAFETENSORS_METADATA = {"format": "pt"}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    """Shapes, seeds and value scales of a fixture. The defaults are TinyLlama-1.1B."""

    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    max_shard_bytes: int = 1_000_000_000  # same rule as transformers' max_shard_size="1GB"
    init_std: float = 0.02
    lora_r: int = 64
    lora_alpha: int = 128
    lora_b_std: float = 0.01
    base_seed: int = 0
    adapter_seed: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each LoRA-targetable projection inside a decoder layer."""
        kv_dim = self.num_key_value_heads * self.head_dim
        return {
            "self_attn.q_proj": (self.num_attention_heads * self.head_dim, self.hidden_size),
            "self_attn.k_proj": (kv_dim, self.hidden_size),
            "self_attn.v_proj": (kv_dim, self.hidden_size),
            "self_attn.o_proj": (self.hidden_size, self.num_attention_heads * self.head_dim),
            "mlp.gate_proj": (self.intermediate_size, self.hidden_size),
            "mlp.up_proj": (self.intermediate_size, self.hidden_size),
            "mlp.down_proj": (self.hidden_size, self.intermediate_size),
        }

    def base_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every base weight, in the order ``LlamaForCausalLM.state_dict()`` yields them."""
        embed = (self.vocab_size, self.hidden_size)
        tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", embed)]
        for i in range(self.num_hidden_layers):
            for proj, shape in self.linear_shapes().items():
                tensors.append((f"model.layers.{i}.{proj}.weight", shape))
            tensors.append((f"model.layers.{i}.input_layernorm.weight", (self.hidden_size,)))
            tensors.append((f"model.layers.{i}.post_attention_layernorm.weight", (self.hidden_size,)))
        tensors.append(("model.norm.weight", (self.hidden_size,)))
        tensors.append(("lm_head.weight", embed))
        return tensors

    def target_modules(self) -> list[tuple[str, tuple[int, int]]]:
        """(full module name, (out_features, in_features)) of every LoRA target, layer-major."""
        return [
            (f"model.layers.{i}.{proj}", shape)
            for i in range(self.num_hidden_layers)
            for proj, shape in self.linear_shapes().items()
        ]

    def num_parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.base_tensors())


TINYLLAMA = FixtureSpec()
TINY = FixtureSpec(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_shard_bytes=256 * 1024,  # small enough that the tiny base is sharded too, like the full one
)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# --------------------------------------------------------------------------------------------------------------------
# Base checkpoint
# --------------------------------------------------------------------------------------------------------------------


def llama_config(spec: FixtureSpec) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int, itemsize: int) -> list[list[str]]:
    """Group tensor names into shards exactly like ``huggingface_hub.split_torch_state_dict_into_shards``."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, shape in tensors:
        size = _numel(shape) * itemsize
        if size > max_shard_bytes:  # an oversized tensor gets a shard of its own
            shards.append([name])
            continue
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def shard_filenames(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_base(dst: pathlib.Path, spec: FixtureSpec) -> None:
    """Write config, generation config, weight shards and index for a random bf16 ``LlamaForCausalLM``."""
    from transformers import GenerationConfig

    config = llama_config(spec)
    config.save_pretrained(dst)
    GenerationConfig.from_model_config(config).save_pretrained(dst)

    dtype = torch.bfloat16
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensors = spec.base_tensors()
    shapes = dict(tensors)
    shards = plan_shards(tensors, spec.max_shard_bytes, itemsize)
    filenames = shard_filenames(len(shards))

    generator = torch.Generator().manual_seed(spec.base_seed)
    weight_map: dict[str, str] = {}
    # Shards hold consecutive runs of state_dict order, so the generator is consumed in that same order.
    for filename, names in zip(filenames, shards, strict=True):
        start = time.perf_counter()
        shard: dict[str, torch.Tensor] = {}
        for name in names:
            if name.endswith("norm.weight"):  # input/post_attention layernorms and the final model.norm
                shard[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                shard[name] = torch.empty(shapes[name], dtype=dtype).normal_(0.0, spec.init_std, generator=generator)
            weight_map[name] = filename
        save_file(shard, dst / filename, metadata=SAFETENSORS_METADATA)
        shard_bytes = sum(t.numel() * itemsize for t in shard.values())
        del shard
        logger.info("  %s: %d tensors, %.1f MB in %.1fs", filename, len(names), shard_bytes / 1e6, _since(start))

    if len(filenames) > 1:
        index = {
            "metadata": {
                "total_parameters": spec.num_parameters(),
                "total_size": spec.num_parameters() * itemsize,
            },
            "weight_map": weight_map,
        }
        (dst / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# LoRA adapter
# --------------------------------------------------------------------------------------------------------------------


def lora_config(spec: FixtureSpec, base_dir: pathlib.Path) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        target_modules=[name for name, _ in spec.target_modules()],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
        inference_mode=True,
    )


def write_adapter(dst: pathlib.Path, spec: FixtureSpec, base_dir: pathlib.Path) -> None:
    """Write ``adapter_model.safetensors`` (fp32 lora_A/lora_B for every target) and ``adapter_config.json``."""
    generator = torch.Generator().manual_seed(spec.adapter_seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_out, d_in) in spec.target_modules():
        prefix = f"base_model.model.{module}"
        # lora_A like a unit-variance projection of the input; lora_B small but non-zero (PEFT would init it to 0).
        tensors[f"{prefix}.lora_A.weight"] = torch.empty(spec.lora_r, d_in).normal_(
            0.0, d_in**-0.5, generator=generator
        )
        tensors[f"{prefix}.lora_B.weight"] = torch.empty(d_out, spec.lora_r).normal_(
            0.0, spec.lora_b_std, generator=generator
        )
    save_file(tensors, dst / ADAPTER_WEIGHTS_NAME, metadata=SAFETENSORS_METADATA)

    lora_config(spec, base_dir).save_pretrained(str(dst))
    config_path = dst / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise RuntimeError(f"peft LoraConfig.save_pretrained did not write {config_path}")
    # peft keeps target_modules as a set and dumps it in hash order, which differs between interpreter runs; sort
    # it (same json.dumps call as peft otherwise) so the fixture is byte-for-byte reproducible.
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["target_modules"] = sorted(data["target_modules"])
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Crash-safe materialisation
# --------------------------------------------------------------------------------------------------------------------


def _since(start: float) -> float:
    return time.perf_counter() - start


def _marker(kind: str, spec: FixtureSpec, **extra: str) -> dict[str, object]:
    return {"fixture_version": FIXTURE_VERSION, "kind": kind, "spec": dataclasses.asdict(spec), **extra}


def _file_sizes(folder: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != DONE_NAME}


def is_complete(folder: pathlib.Path, marker: dict[str, object]) -> bool:
    """True when ``folder`` has a DONE marker for ``marker`` and every file it lists is present at its size."""
    try:
        done = json.loads((folder / DONE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = done.pop("files", None)
    if done != marker or not isinstance(files, dict):
        return False
    try:
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def _build(final: pathlib.Path, marker: dict[str, object], write: Callable[[pathlib.Path], None]) -> None:
    """Run ``write`` into a temporary sibling of ``final``, add the DONE marker last, then swap it into place."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; give the final folder the usual permissions
        write(tmp)
        done = {**marker, "files": _file_sizes(tmp)}
        (tmp / DONE_NAME).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists():
            # Move the stale copy aside rather than deleting it first, so `final` is never a half-deleted folder.
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.replace(trash)
            tmp.replace(final)
            shutil.rmtree(trash)
        else:
            tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    """Serialise concurrent ensure_fixture calls on the same root (e.g. parallel test workers)."""
    if fcntl is None:
        yield
        return
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_fixture(
    root: pathlib.Path, spec: FixtureSpec = TINYLLAMA, *, force: bool = False
) -> tuple[pathlib.Path, pathlib.Path]:
    """Return ``(base_dir, adapter_dir)`` under ``root``, generating each only if missing, incomplete or stale."""
    root = pathlib.Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / BASE_DIRNAME
    adapter_dir = root / ADAPTER_DIRNAME
    with _locked(root):
        # Leftovers of killed runs; safe to remove since we hold the lock.
        for stale in root.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".*.old-*"):
            shutil.rmtree(stale, ignore_errors=True)

        base_marker = _marker("base", spec)
        if force or not is_complete(base_dir, base_marker):
            start = time.perf_counter()
            logger.info("writing base checkpoint (%.1fM params) to %s", spec.num_parameters() / 1e6, base_dir)
            _build(base_dir, base_marker, lambda d: write_base(d, spec))
            logger.info("base done in %.1fs", _since(start))
        else:
            logger.info("base checkpoint up to date: %s", base_dir)

        # The adapter records the base path in adapter_config.json, so a moved root also rebuilds it.
        adapter_marker = _marker("adapter", spec, base_model_name_or_path=str(base_dir))
        if force or not is_complete(adapter_dir, adapter_marker):
            start = time.perf_counter()
            logger.info("writing LoRA adapter to %s", adapter_dir)
            _build(adapter_dir, adapter_marker, lambda d: write_adapter(d, spec, base_dir))
            logger.info("adapter done in %.1fs", _since(start))
        else:
            logger.info("adapter up to date: %s", adapter_dir)
    return base_dir, adapter_dir


# --------------------------------------------------------------------------------------------------------------------
# Verification (--verify)
# --------------------------------------------------------------------------------------------------------------------


def _read_safetensors_headers(paths: list[pathlib.Path]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[dict]]:
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: list[dict] = []
    for path in paths:
        with safe_open(path, framework="pt") as f:
            metadata.append(f.metadata())
            for key in f.keys():
                if key in layout:
                    raise AssertionError(f"{key} stored twice")
                sl = f.get_slice(key)
                layout[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return layout, metadata


def _base_weight_files(base_dir: pathlib.Path) -> list[pathlib.Path]:
    index_path = base_dir / WEIGHTS_INDEX_NAME
    if not index_path.exists():
        return [base_dir / WEIGHTS_NAME]
    return [base_dir / name for name in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_layout(base_dir: pathlib.Path, adapter_dir: pathlib.Path) -> None:
    """Key names, shapes and dtypes against a meta-device LlamaForCausalLM / PEFT model built from the configs."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir))
        model.name_or_path = str(base_dir)  # as from_pretrained(base_dir) would set; peft records it
        expected_base = {k: ("BF16", tuple(v.shape)) for k, v in model.state_dict().items()}
        peft_model = get_peft_model(model, LoraConfig.from_pretrained(str(adapter_dir)))
        expected_adapter = {k: ("F32", tuple(v.shape)) for k, v in get_peft_model_state_dict(peft_model).items()}

    base_layout, base_meta = _read_safetensors_headers(_base_weight_files(base_dir))
    _check(base_layout == expected_base, f"base layout differs: {_diff(base_layout, expected_base)}")
    _check(all(m == SAFETENSORS_METADATA for m in base_meta), f"base safetensors metadata: {base_meta}")
    index_path = base_dir / WEIGHTS_INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text())
        _check(set(index["weight_map"]) == set(expected_base), "index weight_map keys differ from the model's")
        total = sum(_numel(shape) * 2 for _, shape in expected_base.values())
        _check(index["metadata"]["total_size"] == total, f"index total_size {index['metadata']} != {total}")

    adapter_layout, adapter_meta = _read_safetensors_headers([adapter_dir / ADAPTER_WEIGHTS_NAME])
    _check(adapter_layout == expected_adapter, f"adapter layout differs: {_diff(adapter_layout, expected_adapter)}")
    _check(adapter_meta == [SAFETENSORS_METADATA], f"adapter safetensors metadata: {adapter_meta}")
    logger.info("verify: layout OK (%d base tensors, %d adapter tensors)", len(base_layout), len(adapter_layout))


def _diff(actual: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(actual))[:5]
    unexpected = sorted(set(actual) - set(expected))[:5]
    wrong = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])[:5]
    return f"missing={missing} unexpected={unexpected} wrong={[(k, actual[k], expected[k]) for k in wrong]}"


def _check_against_save_pretrained(base_dir: pathlib.Path, adapter_dir: pathlib.Path, spec: FixtureSpec) -> None:
    """Compare the files with what transformers/peft ``save_pretrained`` write for a real model of the same config."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    def load_json(path: pathlib.Path) -> dict:
        return json.loads(path.read_text(encoding="utf-8"))

    with tempfile.TemporaryDirectory() as tmp:
        ref_base = pathlib.Path(tmp) / "base"
        ref_adapter = pathlib.Path(tmp) / "adapter"
        model = LlamaForCausalLM(llama_config(spec)).to(torch.bfloat16)
        model.name_or_path = str(base_dir)  # as from_pretrained(base_dir) would set; peft records it
        model.save_pretrained(ref_base, max_shard_size=spec.max_shard_bytes)
        peft_model = get_peft_model(model, lora_config(spec, base_dir))
        peft_model.save_pretrained(str(ref_adapter))

        ours = sorted(p.name for p in base_dir.iterdir() if p.name != DONE_NAME)
        theirs = sorted(p.name for p in ref_base.iterdir())
        _check(ours == theirs, f"base files {ours} != save_pretrained's {theirs}")
        for name in ("config.json", "generation_config.json", WEIGHTS_INDEX_NAME):
            if (ref_base / name).exists():
                same = load_json(base_dir / name) == load_json(ref_base / name)
                _check(same, f"{name} differs from save_pretrained's")
        ours_h = _read_safetensors_headers(_base_weight_files(base_dir))
        theirs_h = _read_safetensors_headers(_base_weight_files(ref_base))
        _check(ours_h == theirs_h, "base safetensors headers differ from save_pretrained's")

        # peft also writes a README.md model card; the fixture leaves it out.
        theirs_files = sorted(p.name for p in ref_adapter.iterdir() if p.name != "README.md")
        ours_files = sorted(p.name for p in adapter_dir.iterdir() if p.name != DONE_NAME)
        _check(ours_files == theirs_files, f"adapter files {ours_files} != save_pretrained's {theirs_files}")
        ours_cfg = load_json(adapter_dir / ADAPTER_CONFIG_NAME)
        theirs_cfg = load_json(ref_adapter / ADAPTER_CONFIG_NAME)
        theirs_cfg["target_modules"] = sorted(theirs_cfg["target_modules"])
        _check(ours_cfg == theirs_cfg, f"adapter_config.json differs: {_diff(ours_cfg, theirs_cfg)}")
        ours_a = _read_safetensors_headers([adapter_dir / ADAPTER_WEIGHTS_NAME])
        theirs_a = _read_safetensors_headers([ref_adapter / ADAPTER_WEIGHTS_NAME])
        _check(ours_a == theirs_a, "adapter safetensors header differs from peft save_pretrained's")
    logger.info("verify: files match transformers/peft save_pretrained output")


def _check_load(base_dir: pathlib.Path, adapter_dir: pathlib.Path) -> None:
    """Load with ``from_pretrained`` + ``PeftModel.from_pretrained``: no missing/unexpected keys, values intact."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    model, info = LlamaForCausalLM.from_pretrained(base_dir, dtype="auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    _check(not problems, f"LlamaForCausalLM.from_pretrained loading problems: {problems}")
    _check(model.dtype == torch.bfloat16, f"base loaded as {model.dtype}")
    state = model.state_dict()
    for path in _base_weight_files(base_dir):
        for key, tensor in load_file(path).items():
            _check(torch.equal(state[key], tensor), f"{key} loaded with different values")
    del state
    _check(model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "lm_head is tied")
    logger.info("verify: base loads cleanly (%.1fs)", _since(start))

    input_ids = torch.arange(16).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        base_logits = model(input_ids).logits.float()

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    relevant = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    _check(not relevant, f"PeftModel.from_pretrained warned: {relevant}")
    loaded = get_peft_model_state_dict(peft_model)
    saved = load_file(adapter_dir / ADAPTER_WEIGHTS_NAME)
    _check(set(loaded) == set(saved), f"adapter keys differ: {_diff(dict.fromkeys(saved), dict.fromkeys(loaded))}")
    for key, tensor in saved.items():
        _check(torch.equal(loaded[key].cpu(), tensor), f"{key} loaded with different values")
    logger.info("verify: adapter loads cleanly, %d tensors intact (%.1fs)", len(saved), _since(start))

    with torch.no_grad():
        adapted_logits = peft_model(input_ids).logits.float()
    _check(bool(torch.isfinite(adapted_logits).all()), "non-finite logits with the adapter")
    change = (adapted_logits - base_logits).abs().max().item()
    _check(change > 1e-3, f"adapter barely changes the logits (max |diff| {change:g})")
    logger.info("verify: adapter changes logits by up to %.3g (base logits max %.3g)", change, base_logits.abs().max())


def verify_fixture(base_dir: pathlib.Path, adapter_dir: pathlib.Path, spec: FixtureSpec) -> None:
    """Check the fixture loads in transformers + peft exactly as a save_pretrained checkpoint would."""
    _check_layout(base_dir, adapter_dir)
    if spec.num_parameters() <= 50_000_000:  # a real save_pretrained of the full 1.1B model is too slow to be worth it
        _check_against_save_pretrained(base_dir, adapter_dir, spec)
    _check_load(base_dir, adapter_dir)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _du(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        default=None,
        help=f"output folder (default: {DEFAULT_ROOT}, or {DEFAULT_TINY_ROOT} with --tiny)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny variant (hidden 128, intermediate 352, 2 layers, 4 heads, 2 kv heads, vocab 512)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete fixture exists")
    parser.add_argument(
        "--verify", action="store_true", help="load the result with transformers + peft and check keys and values"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    spec = TINY if args.tiny else TINYLLAMA
    root = args.root if args.root is not None else (DEFAULT_TINY_ROOT if args.tiny else DEFAULT_ROOT)
    start = time.perf_counter()
    base_dir, adapter_dir = ensure_fixture(root, spec, force=args.force)
    logger.info(
        "fixture ready in %.1fs: base %s (%.1f MB), adapter %s (%.1f MB)",
        _since(start),
        base_dir,
        _du(base_dir) / 1e6,
        adapter_dir,
        _du(adapter_dir) / 1e6,
    )
    if args.verify:
        start = time.perf_counter()
        verify_fixture(base_dir, adapter_dir, spec)
        logger.info("verify passed in %.1fs", _since(start))
    print(base_dir)
    print(adapter_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
