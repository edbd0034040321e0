"""The streaming merge engine: base checkpoint in, merged checkpoint out, one tensor in memory at a time.

The base is read shard by shard through safetensors headers. Output shards are planned up front from those
headers (names, dtypes, shapes are known before any weight is read), so each output file's header is
written first and its tensors stream after it. A tensor no adapter touches is copied byte for byte
(``os.copy_file_range``); a targeted one is loaded, gets every adapter's update with PEFT's arithmetic
(:mod:`lora_ops.merge`) and is written. Everything goes into a temporary folder renamed into place only when
complete. No model class is imported: adapter module names map onto checkpoint tensor names.

This module only orchestrates: :mod:`.plan` decides what happens to each tensor (and refuses a merge before
anything is written), :mod:`.compute` does the arithmetic, :mod:`.shards` reads and writes the files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from adapterhub_cli import warmup
from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.card import hub_id, merged_card
from adapterhub_cli.artifact.checkpoint import CARD_FILE, BaseView
from adapterhub_cli.artifact.files import atomic_dir
from adapterhub_cli.artifact.provenance import PROVENANCE_KEY, base_record, merge_provenance
from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, data_start, torch_dtype
from adapterhub_cli.errors import AdaptersError
from adapterhub_cli.merge import bnb
from adapterhub_cli.merge.compute import _Merger, check_device, check_device_name, require_finite
from adapterhub_cli.merge.plan import MergePlan, TensorPlan, build_plan
from adapterhub_cli.merge.shards import (
    READ_AHEAD,
    WRITE_BEHIND,
    FiniteCheck,
    Handoff,
    Produced,
    _BaseReader,
    _Inputs,
    _ReadAhead,
    _ShardWriter,
    copy_side_files,
    output_offsets,
    shard_names,
    write_index,
    write_parts,
    write_placed,
    write_then_release,
)
from adapterhub_cli.merge.staging import BufferPool
from adapterhub_cli.parallel import single_threaded_torch


if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["MergeResult", "Progress", "run_merge"]

Progress = Callable[[int, int], None]


@dataclass
class MergeResult:
    """Summary of a merge (the ``--json`` output)."""

    path: Path
    tensors: int
    tensors_merged: int
    tensors_replaced: int
    modules: int
    shards: int
    bytes_written: int
    #: the merge itself, from validation to the folder in place (not Python's start-up; it runs while torch imports
    #: on the CLI's helper thread, and includes what is left of that import when the first merged tensor needs it)
    seconds: float
    peak_rss_mib: float
    device: str
    untied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_merge(
    base: BaseView | str | Path,
    adapters: list[Adapter],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int | None = "5GB",
    overwrite: bool = False,
    reverse: bool = False,
    quantize: str | None = None,
    progress: Progress | None = None,
    base_source: str | None = None,
    base_model: str | None = None,
) -> MergeResult:
    """Merge (or with ``reverse``, unmerge) ``adapters`` into ``base``, streaming, into ``out`` atomically.

    Every adapter is validated against the base first; a misfit raises before anything is written (the API has
    checked ``out`` against the inputs: :func:`adapterhub_cli.artifact.files.check_output`). Every tensor the merge
    computes is checked for NaN / inf before it is written (:func:`.compute.require_finite`). A base
    saved by transformers with bitsandbytes (nf4 / fp4 / int8) is dequantized weight by weight; the output is
    16-bit unless ``quantize`` ("nf4", "fp4" or "int8") asks for the bitsandbytes layout transformers loads.
    ``max_shard_size`` None keeps the base's shard files (:func:`.plan.keep_layout`).

    The output records its provenance (:func:`adapterhub_cli.artifact.provenance.merge_provenance`: operation,
    parameters, the base as :func:`~adapterhub_cli.artifact.provenance.base_record` describes it, each adapter with
    the sha256 of its tensors, the tool version) as JSON under ``adapterhub.provenance`` in every shard's
    safetensors metadata (beside ``format: pt``; the tensors are unchanged), and a model card (``README.md``,
    :func:`adapterhub_cli.artifact.card.merged_card`; a base's own card is not carried over). ``base_source``
    names the base in the record (default its folder); ``base_model`` is its Hub id for the card (default the
    config's ``_name_or_path`` when that is a repo id, never a local path).
    """
    # torch is not imported here: the plan (headers only), the side files, the card and the untouched tensors
    # before the first merged one need none, so they run while torch imports on the helper thread the CLI starts
    # (:func:`adapterhub_cli.warmup.start`); the first merged tensor waits for it
    started = time.perf_counter()
    check_device_name(device)  # (whether a cuda device is there is asked once torch is in: _Producer._start_torch)
    plan = build_plan(
        base,
        adapters,
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        reverse=reverse,
        quantize=quantize,
    )
    record = merge_record(
        plan,
        adapters,
        reverse=reverse,
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        device=device,
        quantize=quantize,
        base_source=base_source,
    )
    metadata = shard_metadata(record)
    if base_model is None and not reverse:
        base_model = hub_id(plan.view.config.get("_name_or_path"))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        stem = plan.view.weights_stem  # model, or diffusion_pytorch_model for a diffusers part
        names = plan.shard_files or shard_names(stem, len(plan.shards))
        prefetch(plan)
        # side files and card first (no torch needed); a store base's files are at hand once its shards are
        side_first = plan.view.path.is_dir()
        if side_first:
            copy_side_files(plan.view.path, tmp, plan.config_updates, plan.config_drop)
        config = {**plan.view.config, **plan.config_updates}
        (tmp / CARD_FILE).write_text(merged_card(config, record, base_model=None if reverse else base_model))
        notes: list[str] = []
        written = _write_shards(
            plan,
            adapters,
            tmp,
            names,
            device=device,
            reverse=reverse,
            progress=progress,
            metadata=metadata,
            notes=notes,
        )
        if len(plan.shards) > 1:
            write_index(tmp, stem, names, plan.shards, plan.total_bytes)
        if not side_first:
            copy_side_files(plan.view.path, tmp, plan.config_updates, plan.config_drop)
    result = _result(plan, Path(out), written, time.perf_counter() - started, device)
    result.warnings += notes
    return result


def merge_record(
    plan: MergePlan,
    adapters: list[Adapter],
    *,
    reverse: bool,
    weights: list[float] | None,
    dtype: str,
    max_shard_size: str | int | None,
    device: str,
    quantize: str | None,
    base_source: str | None,
) -> dict[str, Any]:
    """The provenance record of a merge (or unmerge) of ``adapters`` into ``plan``'s base with these options."""
    parameters = {
        "weights": list(weights) if weights is not None else [1.0] * len(adapters),
        "dtype": dtype,
        "max_shard_size": max_shard_size,  # None: the base's shard layout kept
        "device": device,
        **({"quantize": quantize} if quantize else {}),
    }
    operation = "unmerge" if reverse else "merge"
    return merge_provenance(operation, parameters, base_record(plan.view, base_source), adapters)


def shard_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of every output shard: ``format: pt`` and the provenance record."""
    return {"format": "pt", PROVENANCE_KEY: json.dumps(record, sort_keys=True)}


def _write_shards(
    plan: MergePlan,
    adapters: list[Adapter],
    folder: Path,
    names: list[str],
    *,
    device: str,
    reverse: bool,
    progress: Progress | None,
    metadata: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> int:
    """Produce and write every shard of ``plan`` into ``folder``, each on disk on return; the bytes written.
    ``metadata``: each shard's safetensors metadata (default ``{"format": "pt"}``); ``notes`` gets the warnings
    only the merge's own reads can give (an untrained adapter: :meth:`.compute._Merger.untrained`)."""
    reader = _BaseReader(plan.stored)
    # tensors to merge are read on a helper thread, up to READ_AHEAD ahead of the one being merged, into
    # recycled staging buffers (page-locked for a GPU: asynchronous copies to and from it); a buffer goes back
    # to the pool once written
    buffers = BufferPool(READ_AHEAD + 1 + WRITE_BEHIND, pin=device.startswith("cuda"))
    to_read = [p for shard in plan.shards for p in shard if not plan.copied(p)]
    offsets = output_offsets(plan.shards, metadata)
    files = _ShardWriter()
    produce: _Producer | None = None
    written = 0
    try:
        # (its read-ahead starts at once: inside the try, so that whatever fails afterwards stops it)
        produce = _Producer(plan, adapters, reader, buffers, to_read, device, reverse, progress, offsets)
        for name, shard in zip(names, plan.shards, strict=True):
            written += files.write(folder / name, shard, produce, metadata)
        files.sync()  # every shard on disk before the folder is moved into place
        if notes is not None and not reverse and produce.merger is not None:
            notes += produce.merger.untrained()
    finally:
        files.close()
        buffers.close()  # a read waiting for a buffer after an error gives up
        if produce is not None:
            produce.close()
    return written


class _Producer:
    """Turns each planned tensor, in order, into the job that appends its bytes to its shard: a raw copy of the
    base's bytes (checked for NaN / inf on the way, without torch), or the tensor read ahead, converted to its
    output dtype, merged and (if asked) quantized.

    torch is first needed at the first tensor that is not a raw copy: only then are the merger and torch's
    single-threaded mode set up (everything before it runs while torch imports). The read-ahead thread starts at
    once on the CPU: the first tensors to merge are read (without torch) while the untouched ones are copied.
    """

    def __init__(
        self,
        plan: MergePlan,
        adapters: list[Adapter],
        reader: _BaseReader,
        buffers: BufferPool,
        to_read: list[TensorPlan],
        device: str,
        reverse: bool,
        progress: Progress | None,
        offsets: dict[str, int] | None = None,
    ) -> None:
        self.plan = plan
        self.adapters = adapters
        self.reader = reader
        self.buffers = buffers
        self.to_read = to_read
        self.device = device
        self.reverse = reverse
        self.progress = progress
        self.total = plan.total_bytes
        self.done = 0
        self.merger: _Merger | None = None
        self._torch = contextlib.ExitStack()
        self.inputs = inputs = _Inputs(plan, adapters, reader, buffers, offsets)
        self.read_ahead = _ReadAhead(to_read, inputs.fetch, finish=inputs.tensor)
        if not buffers.pin:
            # the first tensors to merge are read (without torch) while the untouched ones are copied and torch
            # imports; a pinned pool (CUDA) needs torch for its buffers: its reads start at the first merged tensor
            self.read_ahead.start()

    def _start_torch(self) -> tuple[_Merger, _ReadAhead]:
        if self.merger is None:
            warmup.wait()  # torch imported (and CUDA started) on the helper thread, not here
            check_device(self.device)
            # torch runs single-threaded inside each compute thread (small blocked GEMMs lose more to torch's own
            # thread hand-offs than they gain); the rows of a weight are split between the merger's threads instead
            self.merger = _Merger(  # (notes torch's thread count)
                self.adapters, self.device, reverse=self.reverse, base_config=self.plan.view.config
            )
            self._torch.enter_context(single_threaded_torch())
        return self.merger, self.read_ahead

    def close(self) -> None:
        self.read_ahead.close()
        if self.merger is not None:
            self.merger.close()
        self._torch.close()

    def __call__(self, p: TensorPlan) -> Produced:
        """The job writing ``p``, and the release of its staging buffer for when that job does not take it."""
        self.done += p.nbytes
        if self.progress:
            self.progress(self.done, self.total)
        if self.plan.copied(p):
            dtype = self.reader.base.tensors[p.source].dtype
            check = FiniteCheck(p.name, dtype) if p.dtype in COMPUTE_DTYPES and FiniteCheck.wanted(dtype) else None
            return functools.partial(self.reader.copy_raw, p.source, check=check), None
        merger, read_ahead = self._start_torch()
        t, buffer = read_ahead.take(p)
        handoff = None if buffer is None else Handoff(functools.partial(self.buffers.release, buffer))
        try:
            if p.dtype in COMPUTE_DTYPES:
                t = t.to(torch_dtype(p.dtype))  # as if the base were loaded in the output dtype, then merged
            sums: list[float] = []  # the merge's block sums: the NaN / inf check rides on the arithmetic
            if p.contributions:
                t = merger.apply(p, t, sums=sums)
            require_finite(t, p, merger.adapters, base_dtype=_dtype_of(self.plan.view, p.source), sums=sums)
            if self.plan.quantize and p.quantized_entries:
                parts = bnb.quantize_weight(t, p.name, self.plan.quantize, compute_dtype=t.dtype)
                if handoff is not None:
                    handoff.cleanup()  # (quantized into new tensors: the staging buffer is free at once)
                return functools.partial(write_parts, parts, [key for key, _, _ in p.entries]), None
            pad = self.inputs.pad(p)
            if handoff is not None and _placed(t, buffer, pad):  # merged where it was read: written from there
                nbytes = t.numel() * t.element_size()
                return functools.partial(write_placed, cast("np.ndarray", buffer), pad, nbytes, handoff), (
                    handoff.cleanup
                )
            return functools.partial(write_then_release, t, handoff), (handoff.cleanup if handoff else None)
        except BaseException:
            if handoff is not None:
                handoff.cleanup()
            raise


def prefetch(plan: MergePlan, limit: int = 256 << 20) -> None:
    """Ask the kernel to start reading the base's first ``limit`` bytes of tensors to merge (``POSIX_FADV_WILLNEED``,
    asynchronous), so a cold base is on its way into the page cache while torch imports; a no-op where the
    platform has no such advice."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    stored = plan.stored
    left = limit
    for p in (p for shard in plan.shards for p in shard if not plan.copied(p)):
        info = stored.tensors.get(p.source)
        path = dict.get(stored.shard_of, p.source)  # (a store base's shard is not fetched here)
        if info is None or path is None or left <= 0:
            break
        try:
            with path.open("rb") as f:
                start = data_start(f.read(8), path=path)
                advise(f.fileno(), start + info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, AdaptersError):
            return
        left -= info.nbytes


def _result(plan: MergePlan, out: Path, written: int, seconds: float, device: str) -> MergeResult:
    untied = plan.untied
    untie = (
        [
            f"untied {', '.join(untied)} from the input embedding: the adapter changes only one side, so "
            "the output stores both and sets tie_word_embeddings=false"
        ]
        if untied
        else []
    )
    return MergeResult(
        path=out,
        tensors=len(plan.tensors),
        tensors_merged=sum(bool(p.contributions) for p in plan.tensors),
        tensors_replaced=sum(p.replacement is not None for p in plan.tensors),
        modules=sum(c.part == "weight" for p in plan.tensors for c in p.contributions),
        shards=len(plan.shards),
        bytes_written=written,
        seconds=seconds,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=device,
        untied=untied,
        warnings=[*plan.warnings, *untie],
    )


def _placed(t: torch.Tensor, buffer: object, pad: int) -> bool:
    """Whether ``t`` is the contiguous tensor at byte ``pad`` of the numpy staging ``buffer`` (not a converted or
    replaced copy)."""
    return (
        type(buffer).__module__ == "numpy"
        and t.device.type == "cpu"
        and t.is_contiguous()
        and t.data_ptr() == buffer.ctypes.data + pad  # type: ignore[attr-defined]
    )


def _dtype_of(view: BaseView, key: str) -> str | None:
    info = view.tensors.get(key)
    return info.dtype if info is not None else None
