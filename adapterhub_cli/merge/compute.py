"""The per-tensor arithmetic of a merge: each adapter's update added to (or with ``reverse`` subtracted from) one
base weight, bit-identical to PEFT's ``merge_and_unload()`` on the same device (:mod:`lora_ops.merge`).

On the CPU a LoRA update is added in place in row blocks, the blocks shared between a few threads; on a CUDA
device each update is computed whole, as PEFT computes it there.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from adapterhub_cli import warmup
from adapterhub_cli.artifact.adapter import Adapter, LoraModule, conv1d_layer, stored_transposed
from adapterhub_cli.errors import InvalidAdapterError, UsageError
from adapterhub_cli.merge.plan import TOKENS_SUFFIX, Contribution, TensorPlan, token_indices
from adapterhub_cli.merge.shards import damaged_base
from adapterhub_cli.parallel import default_workers


if TYPE_CHECKING:
    import torch

ROWS = 256  # rows per block of lora_ops.merge_lora
#: how many threads compute a merge, overriding the default (all cores, at most 8)
THREADS_ENV = "ADAPTERS_MERGE_THREADS"


def check_device(device: str) -> str:
    """``device`` if the merge can compute there (``cpu``, ``cuda``, ``cuda:N`` with such a GPU), else UsageError.
    ``cpu`` is checked without importing torch (a merge starts before torch is imported:
    :mod:`adapterhub_cli.warmup`)."""
    if device == "cpu":
        return device
    warmup.wait()
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise UsageError(f"device {device!r}: merges compute on cpu or cuda only")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: no CUDA device is available here", hint="use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device_name(device: str) -> str:
    """:func:`check_device` where it needs no torch: for ``cpu``, and for names not of the form ``cpu[:N]`` /
    ``cuda[:N]`` (refused there, importing torch to tell an unknown name from an unsupported one). A ``cuda[:N]``
    name is returned unchecked: whether that GPU is present is asked by :func:`check_device` once torch is imported
    (on the helper thread while the merge plans and copies: :mod:`adapterhub_cli.warmup`), before any update is
    computed."""
    if device == "cpu" or not _DEVICE_NAME.fullmatch(device):
        return check_device(device)
    return device


class _Merger:
    """Produces merged tensors: loads factors once per module and applies each adapter's update in order.

    DoRA is merged, never unmerged, and not on convolutions: :func:`adapterhub_cli.merge.plan.refuse_misfits`
    refuses those before a merge starts.
    """

    def __init__(
        self,
        adapters: list[Adapter],
        device: str,
        reverse: bool = False,
        workers: int = 0,
        pool: ThreadPoolExecutor | None = None,
        base_config: dict[str, Any] | None = None,
    ) -> None:
        import torch

        self.adapters = adapters
        #: the base's config.json: whether a square weight is a Conv1D's or a Linear's (:func:`conv1d_layer`)
        self.base_config = base_config
        self.device = device
        self.on_device = torch.device(device).type != "cpu"
        self.reverse = reverse
        self.default_threads = torch.get_num_threads()
        # every core computes: with O_DIRECT writes and recycled buffers the reader, writer and disk threads
        # mostly wait on the kernel (measured on 2 cores: 3.2-3.7 s for the merge with two threads, 3.6-4.3 s
        # with one); past 8 threads the 256-row blocks are too small to share (16 threads were slower than 8)
        self.workers = workers or default_workers(THREADS_ENV)
        self._own_pool = pool is None
        if pool is None and self.workers > 1:
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adapters-merge")
        self.pool = pool  # (several mergers may share one: ``pool`` given, it is not shut down by close)
        #: the stored keys of lora_B factors loaded so far that are all zero (validate's ``untrained`` warning)
        self.zero_b: set[str] = set()
        #: each adapter's lora_B names (the all-zero check of :meth:`_load`)
        self._b_names = {id(a): {m.B.name for m in a.modules.values()} for a in adapters}

    def _with_default_threads(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Run ``fn`` with torch's usual thread count: a convolution's result depends on it, and PEFT uses it."""
        import torch

        current = torch.get_num_threads()
        torch.set_num_threads(self.default_threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(current)

    def close(self) -> None:
        if self.pool is not None and self._own_pool:
            self.pool.shutdown()

    def untrained(self) -> list[str]:
        """The warning ``validate`` gives when every lora_B of an adapter is zero, for each such adapter merged
        (known once every module is loaded: the check rides on the merge's own reads)."""
        prefix = len(self.adapters) > 1
        return [
            f"{f'{a.path}: ' if prefix else ''}untrained: every lora_B is zero: the adapter changes nothing "
            "(saved before training?)"
            for a in self.adapters
            if a.modules and all(m.B.name in self.zero_b for m in a.modules.values())
        ]

    def _merge_lora(
        self,
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        fan_in_fan_out: bool,
        fn: Any,
        src: torch.Tensor | None = None,
        sums: list[float] | None = None,
    ) -> torch.Tensor:
        """``merge_lora`` into ``weight`` (from ``src``, default ``weight`` itself: in place) with the rows split
        between threads at block boundaries (same blocks, same arithmetic: the result is identical to one call).
        ``sums`` gets the sum of every block of the result (:func:`lora_ops.merge_lora`)."""
        n = weight.shape[0]
        src = weight if src is None else src
        if self.pool is None or n < 4 * ROWS or weight.device.type != "cpu":
            return fn(
                src,
                a,
                b,
                scale,
                fan_in_fan_out=fan_in_fan_out,
                subtract=self.reverse,
                rows=ROWS,
                out=weight,
                sums=sums,
            )
        from lora_ops.merge import row_blocks

        # each block reads its rows before writing them: in place is safe
        blocks = row_blocks(n, ROWS)  # whole blocks per thread: each call splits its span into the same blocks
        per = -(-len(blocks) // self.workers)
        spans = [(blocks[k][0], blocks[min(k + per, len(blocks)) - 1][1]) for k in range(0, len(blocks), per)]
        part = functools.partial(self._merge_rows, weight, a, b, scale, fan_in_fan_out, fn, src, sums)
        list(self.pool.map(part, spans))
        return weight

    def _merge_rows(
        self,
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        fan_in_fan_out: bool,
        fn: Any,
        src: torch.Tensor,
        sums: list[float] | None,
        span: tuple[int, int],
    ) -> None:
        """Rows ``span`` of :meth:`_merge_lora`, from ``src`` into ``weight``."""
        lo, hi = span
        a_part, b_part = (a[:, lo:hi], b) if fan_in_fan_out else (a, b[lo:hi])
        fn(
            src[lo:hi],
            a_part,
            b_part,
            scale,
            fan_in_fan_out=fan_in_fan_out,
            subtract=self.reverse,
            rows=ROWS,
            out=weight[lo:hi],
            sums=sums,  # (list.append is atomic: the threads share it)
        )

    def apply(
        self,
        plan: TensorPlan,
        weight: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        sums: list[float] | None = None,
    ) -> torch.Tensor:
        """``weight`` with every contribution of ``plan`` added, in the order of the adapters.

        On the CPU the LoRA updates are added in place (``weight``'s buffer holds the result) in row blocks. On
        a CUDA device the weight is copied over (asynchronously from a pinned buffer), each update is computed
        whole the way PEFT computes it there (``W += (B @ A) * scale``), and the result is copied back into
        ``weight``.

        ``out`` (same shape and dtype as ``weight``): write the result there and leave ``weight`` unchanged (a
        base tensor shared by several outputs, :mod:`.each`); the first LoRA update then reads ``weight`` and
        writes ``out`` (no copy first), with the same arithmetic, so the result is the same bit for bit.

        ``sums``: gets the block sums of the result (:func:`lora_ops.merge_lora`) when its last contribution is a
        LoRA update added in row blocks, for :func:`require_finite`; left empty otherwise.
        """
        import torch

        dora = any(
            c.part == "weight" and self.adapters[c.adapter].modules[c.module].magnitude is not None
            for c in plan.contributions
        )
        separate = out is not None and out is not weight
        if self.on_device:
            stored = out if separate and out is not None else weight
            on = weight.to(self.device, non_blocking=True)
            for c in plan.contributions:
                on = self._add(c, on, weight)
            stored.copy_(on, non_blocking=True)
            torch.cuda.current_stream(on.device).synchronize()
            return stored
        last = plan.contributions[-1] if plan.contributions else None
        if not separate or out is None:
            base_weight = weight.clone() if dora else weight  # DoRA needs the unmerged weight
            for c in plan.contributions:
                weight = self._add(c, weight, base_weight, sums=sums if c is last else None)
            return weight
        contributions = list(plan.contributions)
        first = contributions[0] if contributions else None
        result = out
        if first is not None and self._blockwise(first):
            result = self._add(first, out, weight, src=weight, sums=sums if first is last else None)
            contributions = contributions[1:]
        else:
            out.copy_(weight)
        for c in contributions:
            # ``weight`` is still the unmerged one (DoRA's norm)
            result = self._add(c, result, weight, sums=sums if c is last else None)
        return result

    def _blockwise(self, c: Contribution) -> bool:
        """Whether ``c`` is a LoRA update added in row blocks on the CPU (which may read and write apart)."""
        if c.part != "weight" or self.on_device:
            return False
        m = self.adapters[c.adapter].modules[c.module]
        return m.magnitude is None and m.kind != "conv"

    def _load(self, adapter: Adapter, keys: list[str]) -> dict[str, torch.Tensor]:
        """The adapter's tensors ``keys``, refused if any holds NaN / inf: validation leaves this check to the
        merge's own read of each factor (one read of the adapter, not two); all-zero lora_B factors are noted
        for the ``untrained`` warning."""
        import torch

        from adapterhub_cli.artifact.preflight import require_finite as require_finite_factors

        loaded = adapter.source.load(keys)
        b_keys = self._b_names[id(adapter)]
        for key, t in loaded.items():
            total = float(t.sum()) if t.is_floating_point() and t.numel() else 0.0
            if not math.isfinite(total):
                require_finite_factors(adapter, {key: t})  # (a sum that overflowed on finite values passes)
            if key in b_keys and total == 0 and not bool(torch.any(t)):  # (all zero: the sum is zero)
                self.zero_b.add(key)
        return loaded

    def _add(
        self,
        c: Contribution,
        weight: torch.Tensor,
        base_weight: torch.Tensor,
        src: torch.Tensor | None = None,
        sums: list[float] | None = None,
    ) -> torch.Tensor:
        """``weight`` with contribution ``c`` added (subtracted with ``reverse``); ``base_weight`` is the weight
        before any contribution (DoRA's norm is taken over it). ``src``: read the weight from there instead (a
        blockwise LoRA update only: :meth:`_blockwise`), writing ``weight``; ``sums`` gets its block sums."""
        from lora_ops import conv_lora_delta, lora_delta, merge_delta, merge_dora, merge_lora, unmerge_delta

        adapter = self.adapters[c.adapter]
        if c.part == "tokens":
            return self._replace_tokens(adapter, c.module, weight)
        m: LoraModule = adapter.modules[c.module]
        scale = m.scale * c.weight
        if c.part == "bias":
            return self._add_bias(adapter, m, scale, weight)
        loaded = self._load(adapter, [m.A.name, m.B.name] + ([m.magnitude.name] if m.magnitude else []))
        a, b = loaded[m.A.name].to(self.device), loaded[m.B.name].to(self.device)
        transposed = stored_transposed(
            m.kind,
            adapter.config.fan_in_fan_out,
            tuple(weight.shape),
            (m.d_out, m.d_in),
            conv1d_layer(self.base_config, c.module),
        )
        if m.magnitude is None and m.kind != "conv" and not self.on_device:
            return self._merge_lora(weight, a, b, scale, transposed, merge_lora, src=src, sums=sums)
        if m.magnitude is None:  # a convolution, or any LoRA on the GPU: the whole update at once
            if m.kind == "conv":
                delta = self._with_default_threads(conv_lora_delta, a, b, scale)
            else:
                delta = lora_delta(a, b, scale, fan_in_fan_out=transposed)
            return unmerge_delta(weight, delta) if self.reverse else merge_delta(weight, delta)
        delta = lora_delta(a, b, scale, fan_in_fan_out=transposed)
        magnitude = loaded[m.magnitude.name].to(self.device)
        return merge_dora(weight, base_weight.to(self.device), delta, magnitude, fan_in_fan_out=transposed)

    def _replace_tokens(self, adapter: Adapter, name: str, weight: torch.Tensor) -> torch.Tensor:
        """PEFT's trainable-tokens merge: rows ``trainable_token_indices`` of the embedding replaced by the stored
        rows, cast to the weight's dtype (``weight.index_copy(0, indices, deltas.to(weight))``)."""
        import torch

        info = adapter.extra_tensors[name]
        rows = self._load(adapter, [info.name])[info.name].to(device=weight.device, dtype=weight.dtype)
        index = torch.tensor(token_indices(adapter, name.removesuffix(TOKENS_SUFFIX)), device=weight.device)
        return weight.index_copy(0, index, rows)

    def _add_bias(self, adapter: Adapter, m: LoraModule, scale: float, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` with ``scale * lora_B.bias`` added (subtracted with ``reverse``), as PEFT's ``merge`` does it:
        ``base_layer.bias.data += lora_B.bias * scaling``, the adapter's bias in float32 when stored in 16 bits
        (PEFT loads adapters in float32), promoted and rounded once to the bias's dtype."""
        import torch

        assert m.bias is not None
        b = self._load(adapter, [m.bias.name])[m.bias.name].to(self.device)
        if b.dtype in (torch.float16, torch.bfloat16):
            b = b.float()
        out = bias.clone()
        if self.reverse:  # PEFT's unmerge: bias.data -= lora_B.bias * scaling
            out -= b * scale
        else:
            out += b * scale
        return out


def require_finite(
    t: torch.Tensor,
    p: TensorPlan,
    adapters: list[Adapter],
    *,
    base_dtype: str | None = None,
    sums: list[float] | None = None,
) -> None:
    """Refuse to write ``t``, the tensor the merge produced for ``p`` (merged, replaced by a saved copy, or converted
    to another dtype), if it holds NaN or inf: the merge's last line of defence, run before the tensor is written,
    so a failing merge leaves no output. Untouched base tensors in 16/32/64-bit floats pass here too (a NaN the
    base already held is refused as well); only integer and 8-bit tensors are copied unchecked.

    One sum per tensor in its own dtype (torch accumulates 16-bit floats in float32; measured 0.7 ms for 23 MB of
    bf16 on one core, against 36 ms for a float32-typed sum and 62 ms for ``isfinite().all()``): NaN and inf survive
    a sum, so a finite sum means every value is finite; only a sum that overflowed the dtype on large finite values
    costs the element-wise check. ``sums``: the block sums the merge took of ``t`` while computing it
    (:meth:`_Merger.apply`); all finite, no further pass over ``t`` is needed (a pass over a tensor in memory
    rather than in cache cost ~0.3 s of 2.6 on the 2.2 GB benchmark).

    Raises:
        InvalidAdapterError: ``t`` holds NaN or inf (naming the tensor and the adapters that touched it).
    """
    import torch

    if not t.dtype.is_floating_point or t.numel() == 0:
        return
    if sums and all(math.isfinite(s) for s in sums):
        return
    if math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all()):
        return
    touched = sorted({str(adapters[c.adapter].path) for c in p.contributions})
    if p.replacement is not None:
        touched.append(str(adapters[p.replacement[0]].path))
    if not touched and base_dtype == p.dtype:
        raise damaged_base(p.name)
    cause = f"the updates of {', '.join(touched)}" if touched else f"conversion to {p.dtype}"
    raise InvalidAdapterError(
        f"refused to write the merge: tensor {p.name} holds NaN or inf after {cause}; nothing was written",
        module=p.name,
        hint="check lora_alpha and --weights (an update too large for the dtype overflows), or use a wider --dtype",
    )
