"""A view of a base checkpoint: ``config.json`` plus tensor headers (names, shapes, dtypes), no weights.

A local folder holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.files import read_json
from adapterhub_cli.artifact.safetensors import TensorInfo, read_header
from adapterhub_cli.errors import AdapterNotFoundError, CorruptFileError, InvalidAdapterError


# THE checkpoint layout table. Merge, push, pull, validate, the kohya base maps and remote bases all ask here.

#: file-name stems of checkpoints: transformers' ``model.safetensors`` and diffusers' components
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: suffixes of weight files in any framework's format: never side files
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
#: names in a Hub repo that belong to the repo, not to the checkpoint
REPO_FILES = frozenset({".gitattributes", CARD_FILE})


def single_file(stem: str) -> str:
    """``model`` -> ``model.safetensors``."""
    return f"{stem}.safetensors"


def index_file(stem: str) -> str:
    """``model`` -> ``model.safetensors.index.json``."""
    return f"{stem}.safetensors.index.json"


def shard_file(stem: str, i: int, n: int) -> str:
    """transformers' shard names: ``model-00001-of-00003.safetensors`` (``i`` counts from 1)."""
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def is_index_file(name: str) -> bool:
    return name.endswith(".safetensors.index.json")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def is_side_file(name: str) -> bool:
    """A file that goes with a checkpoint besides its weights (config, tokenizer, generation config, scheduler...):
    top-level, not hidden, not weights, not a weight index."""
    return "/" not in name and not name.startswith(".") and not is_index_file(name) and not is_weight_file(name)


def regular_files(folder: Path) -> list[Path]:
    """The regular files directly inside ``folder``, sorted by name, so nothing read or copied through this list
    leaves ``folder``: folders, devices and FIFOs are left out, and so is a symlink, except one that stays inside
    ``folder`` or, in a huggingface_hub cache snapshot (``<repo>/snapshots/<commit>/``), points into that repo's
    own ``blobs/`` (which is how the cache stores every file).
    """
    folder = Path(folder)
    inside = [folder.resolve()]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        inside.append((folder.parent.parent / "blobs").resolve())
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            target = p.resolve()
            if not any(target.is_relative_to(root) for root in inside):
                continue
        if p.is_file():
            out.append(p)
    return out


def side_files(folder: Path) -> list[Path]:
    """A local checkpoint's side files (:func:`is_side_file`), regular files only (:func:`regular_files`)."""
    return [p for p in regular_files(folder) if is_side_file(p.name)]


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's weights are stored: ``<stem>.safetensors``, or shards listed in ``<stem>...index.json``."""

    stem: str
    sharded: bool

    @property
    def index(self) -> str:
        return index_file(self.stem)

    @property
    def single(self) -> str:
        return single_file(self.stem)


def find_layout(names: Collection[str]) -> Layout | None:
    """The checkpoint layout among a folder's (or a repo's) top-level file names, or None: no safetensors weights.

    An index wins over a single file of the same stem; transformers' stem wins over diffusers'.
    """
    for stem in WEIGHT_STEMS:
        if index_file(stem) in names:
            return Layout(stem, sharded=True)
        if single_file(stem) in names:
            return Layout(stem, sharded=False)
    return None


def read_index(path: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor key -> shard file name), checked: every key and shard a string, every
    shard a plain file name (no folder, no ``..``), so a path built from it stays in the checkpoint's folder.

    Raises:
        CorruptFileError: the index is not JSON, has no ``weight_map`` or names a shard outside the folder.
    """
    doc = read_json(path, path.name)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError("index has no weight_map", path=path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not isinstance(key, str):
            raise CorruptFileError(f"index entry {key!r}: {shard!r} is not a shard file name", path=path)
        if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise CorruptFileError(
                f"index entry {key!r} names {shard!r}, which is not a plain file name in the checkpoint folder",
                path=path,
                hint="the index is damaged or crafted: shards must sit beside the index",
            )
    return weight_map


@dataclass
class BaseView:
    """Config and tensor headers of a base model checkpoint.

    Attributes:
        path: the checkpoint folder.
        config: parsed ``config.json`` (empty when the folder has none).
        tensors: tensor key -> header entry, over all shards.
        shard_of: tensor key -> the shard file that holds it.
        read_raw: a stored tensor's raw bytes by key, for a checkpoint whose shards are not local files yet (a
            Hub base reads them by HTTP range requests at the pinned commit); None for a local checkpoint.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    shard_of: dict[str, Path] = field(default_factory=dict)
    #: the checkpoint's file names: ``<stem>.safetensors`` or ``<stem>-0000i-of-0000n.safetensors`` + index
    weights_stem: str = "model"
    read_raw: Callable[[str], bytes] | None = field(default=None, repr=False, compare=False)

    def derive(self, tensors: dict[str, TensorInfo]) -> BaseView:
        """The same checkpoint (path, config, files, reader) seen through other tensor entries, e.g. dequantized;
        ``shard_of`` keeps the keys of ``tensors``."""
        return BaseView(
            path=self.path,
            config=self.config,
            tensors=tensors,
            shard_of={k: p for k, p in self.shard_of.items() if k in tensors},
            weights_stem=self.weights_stem,
            read_raw=self.read_raw,
        )

    @property
    def name_or_path(self) -> str:
        return str(self.config.get("_name_or_path") or self.path)

    def tied_embedding(self) -> str | None:
        """The input-embedding key the output head shares when the model ties them and stores no lm_head."""
        if not self.config.get("tie_word_embeddings", True) or "lm_head.weight" in self.tensors:
            return None
        heads = (
            "ForCausalLM",
            "LMHeadModel",
            "ForMaskedLM",
            "ForConditionalGeneration",
            "ForSeq2SeqLM",
            "ForPreTraining",
        )
        architectures = self.config.get("architectures") or []
        if architectures and not any(a.endswith(heads) for a in architectures):
            return None  # e.g. a sequence classifier: no output head shares the embedding
        for suffix in (
            "embed_tokens.weight",
            "wte.weight",
            "word_embeddings.weight",
            "embed_in.weight",
            "shared.weight",
        ):
            hits = [k for k in self.tensors if k == suffix or k.endswith("." + suffix)]
            if len(hits) == 1:
                return hits[0]
        return None

    def find_weight(self, module: str, suffix: str = "weight") -> str | None:
        """The checkpoint key holding ``module``'s parameter, tolerating a missing or extra leading prefix.

        An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0.self_attn.q_proj``; a checkpoint
        saved from ``LlamaModel`` stores ``layers.0.self_attn.q_proj.weight``, and the reverse happens too.
        """
        key = f"{module}.{suffix}" if suffix else module
        if key in self.tensors:
            return key
        parts = key.split(".")
        for i in range(1, len(parts) - 1):  # the checkpoint lacks a leading prefix
            shorter = ".".join(parts[i:])
            if shorter in self.tensors:
                return shorter
        ends = [k for k in self.tensors if k.endswith("." + key)]  # the checkpoint has an extra prefix
        if len(ends) == 1:
            return ends[0]
        if key == "lm_head.weight":  # a tied head is stored only as the input embedding
            return self.tied_embedding()
        return None

    def module_names(self) -> list[str]:
        """Names of modules with a ``.weight`` of two or more dimensions (linear, conv, embedding)."""
        names = {k[: -len(".weight")] for k, t in self.tensors.items() if k.endswith(".weight") and len(t.shape) >= 2}
        if self.tied_embedding():
            names.add("lm_head")
        return sorted(names)


def open_base(path: str | Path) -> BaseView:
    """Read a base checkpoint's config and tensor headers (single safetensors file or sharded).

    A local path only: store refs (the Hub, a local registry) are opened by :func:`adapterhub_cli.stores.open_base`,
    which gives a view of the same kind.

    Raises:
        AdapterNotFoundError: the folder does not exist.
        InvalidAdapterError: the folder holds no safetensors weights.
        CorruptFileError: a shard or the index is malformed, or the index names a missing shard.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterNotFoundError(path, "base model")
    if path.is_file() and path.suffix == ".safetensors":
        header = read_header(path)
        return BaseView(
            path=path.parent,
            config=_config(path.parent),
            tensors=dict(header.tensors),
            shard_of=dict.fromkeys(header.tensors, path),
            weights_stem=path.stem if path.stem in WEIGHT_STEMS else "model",
        )
    layout = find_layout({p.name for p in path.iterdir() if p.is_file()}) if path.is_dir() else None
    if layout is not None and layout.sharded:
        index = path / layout.index
        weight_map = read_index(index)
        tensors: dict[str, TensorInfo] = {}
        shard_of: dict[str, Path] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard = path / shard_name
            if not shard.is_file():
                raise CorruptFileError(
                    f"the index names {shard_name}, which is missing",
                    path=index,
                    hint="the checkpoint is incomplete: download or copy it again",
                )
            for key, info in read_header(shard).tensors.items():
                tensors[key] = info
                shard_of[key] = shard
        missing = [k for k in weight_map if k not in tensors]
        if missing:
            raise CorruptFileError(
                f"{len(missing)} tensors in the index are in no shard, e.g. {missing[0]!r}", path=index
            )
        return BaseView(path=path, config=_config(path), tensors=tensors, shard_of=shard_of, weights_stem=layout.stem)
    if layout is not None:
        single = path / layout.single
        header = read_header(single)
        return BaseView(
            path=path,
            config=_config(path),
            tensors=dict(header.tensors),
            shard_of=dict.fromkeys(header.tensors, single),
            weights_stem=layout.stem,
        )
    raise InvalidAdapterError(
        f"no {SINGLE_FILE} or {INDEX_FILE} here",
        path=path,
        hint="point --base at a checkpoint folder saved with save_pretrained (safetensors)",
    )


def _config(folder: Path) -> dict[str, Any]:
    cfg = folder / CONFIG_FILE
    return read_json(cfg, CONFIG_FILE) if cfg.is_file() else {}
