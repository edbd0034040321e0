"""A view of a base checkpoint: ``config.json`` plus tensor headers (names, shapes, dtypes), no weights.

A local folder holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from adapterhub_cli.artifact.files import read_json
from adapterhub_cli.artifact.safetensors import SafetensorsHeader, TensorInfo, read_header
from adapterhub_cli.errors import AdapterNotFoundError, CorruptFileError, InvalidAdapterError, UnsafeFileError


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


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name: a printable string with no folder part (no ``/`` or ``\\``), not
    ``.`` or ``..``, and not absolute or drive-relative on any system, so ``folder / name`` stays in ``folder``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and name.isprintable()
        and "/" not in name
        and "\\" not in name
        and not PureWindowsPath(name).drive
    )


def is_relative_name(name: object) -> bool:
    """Whether ``name`` is a relative ``/``-separated path of plain names (:func:`is_plain_name`), as a repo
    listing names its files (``unet/config.json``): no empty, ``.`` or ``..`` parts, not absolute."""
    return isinstance(name, str) and all(is_plain_name(part) for part in name.split("/"))


def _roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really be: inside it, and for a huggingface_hub cache snapshot
    (``<repo>/snapshots/<commit>/``) in that repo's own ``blobs/`` too."""
    inside = [folder.resolve()]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        inside.append((folder.parent.parent / "blobs").resolve())
    return inside


def stays_inside(folder: Path, path: Path, roots: list[Path] | None = None) -> bool:
    """Whether ``path`` (an entry directly in ``folder``) is a regular file that stays inside ``folder``: not a
    folder, device or FIFO, and not a symlink leading anywhere but inside ``folder`` (or, in a cache snapshot, into
    its repo's ``blobs/``)."""
    if path.is_symlink():
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in roots or _roots(Path(folder))):
            return False
    return path.is_file()


def regular_files(folder: Path) -> list[Path]:
    """The regular files directly inside ``folder``, sorted by name, so nothing read or copied through this list
    leaves ``folder`` (:func:`stays_inside`): folders, devices and FIFOs are left out, and so is a symlink, except
    one that stays inside ``folder`` or, in a huggingface_hub cache snapshot (``<repo>/snapshots/<commit>/``),
    points into that repo's own ``blobs/`` (which is how the cache stores every file).
    """
    folder = Path(folder)
    roots = _roots(folder)
    return [p for p in sorted(folder.iterdir()) if stays_inside(folder, p, roots)]


def file_inside(folder: Path, name: str, *, what: str = "file") -> Path | None:
    """``folder / name`` when it exists as a regular file inside ``folder`` (:func:`stays_inside`), None when it
    does not exist.

    Raises:
        UnsafeFileError: it exists but is not a regular file inside ``folder`` (a symlink leading out, a FIFO, a
            device, a folder): it is never read.
    """
    path = Path(folder) / name
    if not path.exists() and not path.is_symlink():
        return None
    if not stays_inside(folder, path):
        raise UnsafeFileError(
            f"{what} {name} is not a regular file inside the folder"
            + (" (a symlink leading out of it)" if path.is_symlink() else ""),
            path=folder,
            hint="copy the file itself into the folder; links out of it are never followed",
        )
    return path


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
    shard a plain file name (:func:`is_plain_name`: no folder, no ``..``, not absolute), so a path built from it
    stays in the checkpoint's folder.

    Raises:
        CorruptFileError: the index is not a JSON object, has no (or an empty) ``weight_map`` or names a shard
            outside the folder.
    """
    doc = read_json(path, path.name)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptFileError("index has no weight_map", path=path)
    if not weight_map:
        raise CorruptFileError("index lists no tensors (its weight_map is empty)", path=path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not isinstance(key, str):
            raise CorruptFileError(f"index entry {key!r}: {shard!r} is not a shard file name", path=path)
        if not is_plain_name(shard) or not shard.endswith(".safetensors"):
            raise CorruptFileError(
                f"index entry {key!r} names {shard!r}, which is not a plain .safetensors file name in the checkpoint "
                "folder",
                path=path,
                hint="the index is damaged or crafted: shards must sit beside the index",
            )
    return weight_map


def index_tensors(
    weight_map: Mapping[str, str], headers: Mapping[str, SafetensorsHeader], index: Path
) -> dict[str, TensorInfo]:
    """A sharded checkpoint's tensors as its index places them: each key read from the shard the index names.

    ``headers``: shard name -> checked header, for every shard the index names, in shard-name order (the order of
    the result).

    Raises:
        CorruptFileError: a tensor in two shards; a shard holding a tensor the index places elsewhere or does not
            list; a tensor the index places in a shard that does not hold it.
    """
    holders: dict[str, list[str]] = {}
    for shard, header in headers.items():
        for key in header.tensors:
            holders.setdefault(key, []).append(shard)
    hint = "the index and its shards disagree: the checkpoint is damaged or crafted; download or copy it again"
    for key, shards in holders.items():
        if len(shards) > 1:
            raise CorruptFileError(
                f"tensor {key!r} is in {len(shards)} shards ({', '.join(shards)})", path=index, hint=hint
            )
        if key not in weight_map:
            raise CorruptFileError(
                f"{shards[0]} holds tensor {key!r}, which the index does not list", path=index, hint=hint
            )
        if weight_map[key] != shards[0]:
            raise CorruptFileError(
                f"the index places tensor {key!r} in {weight_map[key]}, but {shards[0]} holds it",
                path=index,
                hint=hint,
            )
    missing = [k for k in weight_map if k not in holders]
    if missing:
        raise CorruptFileError(
            f"{len(missing)} tensors in the index are in no shard, e.g. {missing[0]!r} in {weight_map[missing[0]]}",
            path=index,
            hint=hint,
        )
    return {key: info for header in headers.values() for key, info in header.tensors.items()}


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

    def base_model_prefix(self) -> str | None:
        """The attribute under which the checkpoint's head model holds its bare model (``model`` for Llama,
        ``transformer`` for GPT-2), as transformers declares it (``PreTrainedModel.base_model_prefix``); None when
        transformers does not know the architecture (a diffusers component, a custom model)."""
        architectures = self.config.get("architectures") or []
        arch = architectures[0] if isinstance(architectures, list) and architectures else None
        model_type = self.config.get("model_type")
        return _base_model_prefix(
            arch if isinstance(arch, str) else None, model_type if isinstance(model_type, str) else None
        )

    def weight_match(self, module: str, suffix: str = "weight") -> tuple[str, str] | None:
        """Where ``module``'s parameter is in the checkpoint once transformers has loaded it, and how it got there;
        None when the model transformers builds from this checkpoint has no such module (PEFT would not apply it).

        ``how`` is ``"exact"`` (the stored key), ``"prefix-added"`` (a bare-model checkpoint, e.g. saved from
        ``LlamaModel``, loaded as the head model, e.g. ``LlamaForCausalLM``: transformers adds the
        ``base_model_prefix``), ``"prefix-removed"`` (a head-model checkpoint loaded as its bare model, e.g. with
        ``AutoModel``: transformers removes it) or ``"tied"`` (a tied ``lm_head`` stored only as the input
        embedding). No other prefix is tolerated, as PEFT tolerates none: see :meth:`prefix_hint`.
        """
        key = f"{module}.{suffix}" if suffix else module
        if key in self.tensors:
            return key, "exact"
        prefix = self.base_model_prefix()
        if prefix:
            head = prefix + "."
            if key.startswith(head) and key[len(head) :] in self.tensors and not self._has_prefix(head):
                return key[len(head) :], "prefix-added"
            if head + key in self.tensors:
                return head + key, "prefix-removed"
        if key == "lm_head.weight":
            tied = self.tied_embedding()
            if tied is not None:
                return tied, "tied"
        return None

    def _has_prefix(self, head: str) -> bool:
        return any(k.startswith(head) for k in self.tensors)

    def find_weight(self, module: str, suffix: str = "weight") -> str | None:
        """The checkpoint key holding ``module``'s parameter, as PEFT finds it on the model transformers builds
        from this checkpoint (:meth:`weight_match`); None when it finds none."""
        match = self.weight_match(module, suffix)
        return match[0] if match else None

    def near_match(self, module: str, suffix: str = "weight") -> tuple[str, str] | None:
        """For a ``module`` that :meth:`weight_match` does not find: ``("strip", prefix)`` when it matches after
        removing the leading ``prefix`` from its name, ``("add", prefix)`` when it matches after adding one (the
        stored key ending with the name must be unique); None when neither helps. PEFT applies neither: this is
        only a hint for ``adapters convert --strip-prefix / --add-prefix``."""
        parts = module.split(".")
        for i in range(1, len(parts)):
            if self.weight_match(".".join(parts[i:]), suffix) is not None:
                return "strip", ".".join(parts[:i]) + "."
        key = f"{module}.{suffix}" if suffix else module
        ends = [k for k in self.tensors if k.endswith("." + key)]
        if len(ends) == 1:
            added = ends[0][: -len(key)]
            return "add", added
        return None

    def module_names(self) -> list[str]:
        """Names of modules with a ``.weight`` of two or more dimensions (linear, conv, embedding)."""
        names = {k[: -len(".weight")] for k, t in self.tensors.items() if k.endswith(".weight") and len(t.shape) >= 2}
        if self.tied_embedding():
            names.add("lm_head")
        return sorted(names)


@functools.lru_cache(maxsize=64)
def _base_model_prefix(architecture: str | None, model_type: str | None) -> str | None:
    """transformers' ``base_model_prefix`` of ``architecture`` (else of ``model_type``'s bare model); transformers
    is imported only here, when a name is not found as stored."""
    if architecture is None and model_type is None:
        return None
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except Exception:  # transformers missing or broken: no tolerance, only exact names
        return None
    names = [architecture] if architecture else []
    bare = MODEL_MAPPING_NAMES.get(model_type) if model_type else None
    if isinstance(bare, str):
        names.append(bare)
    for name in names:
        try:
            prefix = getattr(getattr(transformers, name), "base_model_prefix", None)
        except Exception:  # an unknown class name, or one whose module fails to import
            continue
        if isinstance(prefix, str) and prefix:
            return prefix
    return None


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
        index = _inside(path, layout.index)
        weight_map = read_index(index)
        headers: dict[str, SafetensorsHeader] = {}
        for shard_name in sorted(set(weight_map.values())):
            if not (path / shard_name).exists():
                raise CorruptFileError(
                    f"the index names {shard_name}, which is missing",
                    path=index,
                    hint="the checkpoint is incomplete: download or copy it again",
                )
            headers[shard_name] = read_header(_inside(path, shard_name))
        return BaseView(
            path=path,
            config=_config(path),
            tensors=index_tensors(weight_map, headers, index),
            shard_of={key: path / shard for key, shard in weight_map.items()},
            weights_stem=layout.stem,
        )
    if layout is not None:
        single = _inside(path, layout.single)
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


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, a regular file inside ``folder`` (:func:`file_inside`); its absence is left to the reader."""
    return file_inside(folder, name, what="checkpoint file") or folder / name


def _config(folder: Path) -> dict[str, Any]:
    cfg = file_inside(folder, CONFIG_FILE, what="checkpoint file")
    return read_json(cfg, CONFIG_FILE) if cfg is not None else {}
