"""The combine-method registry, filled through the ``adapters_register_methods`` hook.

A combine method is a plain function called once per module with that module's factors and weights::

    def mean(factors, weights, *, rank=None):
        '''The weighted mean of the updates.'''
        total = sum(weights)
        return lora_ops.concat(factors, [w / total for w in weights])

    @hookimpl
    def adapters_register_methods(register):
        register("mean", mean, description="the weighted mean", reference="https://...")

``factors`` are :class:`lora_ops.LoraFactors` (A (r_i, d_in), B (d_out, r_i), scale s_i; conv factors
flattened), one per input adapter that has the module, and ``weights`` the matching weights. The function
returns the combined update as ``LoraFactors`` of any rank and scale, or a :class:`CombinedFactors` that
also reports the relative error of a rank compression. The host writes each module with scale
``alpha / rank`` (rescaling B when needed), so the result's scale is free.

Besides the two positional arguments a method takes, by keyword, only those of these it declares:

- ``rank: int | None``: the output rank asked for (``--rank``); None when not given.
- ``density: float``: the fraction of entries kept (``--density``).
- ``generator: torch.Generator``: seeded from ``--seed``, one per run, shared by the modules in order.
- ``alpha: float``: the output's ``lora_alpha``.

A ``rank`` or ``density`` declared without a default is required: combining without it is a usage error. An
option the user gives that the method does not declare (``--rank`` for ``cat``, ``--density`` for ``linear``,
``--seed`` for a method without randomness) is a usage error too, rather than silently ignored
(:meth:`CombineMethod.check_options`). Signatures are checked when the methods are collected, not at first use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from adapterhub_cli.errors import PluginError, UsageError


if TYPE_CHECKING:
    from lora_ops import LoraFactors


#: keyword a method may declare -> the user-facing option it comes from (None: supplied by the host)
KEYWORDS: dict[str, str | None] = {"rank": "rank", "density": "density", "generator": "seed", "alpha": None}
_OPTIONS = ("rank", "density")  # keywords that are required when declared without a default


class CombinedFactors(NamedTuple):
    """A method's result for one module: the combined factors, and the relative Frobenius error of the
    rank compression against the method's full-rank result (0 when exact)."""

    factors: LoraFactors
    rel_error: float = 0.0


@dataclass(frozen=True)
class CombineMethod:
    """A registered combine method.

    Attributes:
        name: what ``--method`` / ``method=`` takes.
        function: the per-module function (see the module docstring).
        description: one line for ``adapters plugins`` and help.
        reference: where the method is defined (a paper), or None.
        params: the user-facing options it takes (``rank``, ``density``, ``seed``).
        required: the options it cannot do without.
        plugin: the plugin that registered it.
    """

    name: str
    function: Callable[..., Any]
    description: str
    reference: str | None
    params: tuple[str, ...]
    required: tuple[str, ...]
    plugin: str
    _keywords: tuple[str, ...] = ()

    def check_options(self, given: Mapping[str, object]) -> None:
        """Refuse options the user gave (``{"rank": 4, "density": None, "seed": 7}``; None: not given) that this
        method would ignore, and options it requires that are missing.

        Raises:
            UsageError: naming the option as the CLI spells it (``--rank``) and the methods that take it.
        """
        for option, value in given.items():
            if value is not None and option not in self.params:
                takers = [n for n, m in methods().items() if option in m.params]
                takes = ", ".join(f"--{p}" for p in self.params) or "no options"
                users = ", ".join(takers) or "none is registered"
                raise UsageError(
                    f"--{option} has no effect with --method {self.name} ({self.description}; it takes {takes})",
                    hint=f"drop --{option}, or choose a method that uses it: {users}",
                )
        for option in self.required:
            if given.get(option) is None:
                raise UsageError(
                    f"--{option} is required for {self.name}",
                    hint=f"e.g. --{option} {'0.5' if option == 'density' else '8'}",
                )

    def combine(self, factors: Sequence[LoraFactors], weights: Sequence[float], **context: Any) -> CombinedFactors:
        """Call the method on one module; ``context`` holds every keyword of :data:`KEYWORDS` (an option the
        user did not give is None and is then not passed, so the method's default applies)."""
        from lora_ops import LoraFactors

        kwargs = {k: context[k] for k in self._keywords if context.get(k) is not None}
        result = self.function(list(factors), list(weights), **kwargs)
        if isinstance(result, CombinedFactors):
            return result
        if isinstance(result, LoraFactors):
            return CombinedFactors(result)
        raise PluginError(
            f"combine method {self.name!r} (plugin {self.plugin!r}) returned a {type(result).__name__}; "
            "expected LoraFactors or CombinedFactors"
        )


def _method(name: str, fn: Any, options: dict[str, Any], plugin: str) -> CombineMethod:
    """A checked :class:`CombineMethod` from one ``register(name, fn, **options)`` call."""
    where = f"combine method {name!r} of plugin {plugin!r}"
    if not callable(fn):
        raise PluginError(f"{where} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise PluginError(f"{where}: its signature cannot be read ({e})") from e
    kinds = inspect.Parameter
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == kinds.VAR_POSITIONAL for p in params):
        raise PluginError(f"{where} must take (factors, weights) positionally; its signature is {sig}")
    keywords: list[str] = []
    for p in params:
        if p.kind == kinds.VAR_KEYWORD:
            keywords.extend(k for k in KEYWORDS if k not in keywords)
        elif p.name in KEYWORDS and p.kind != kinds.POSITIONAL_ONLY and p not in positional[:2]:
            keywords.append(p.name)
        elif p not in positional[:2] and p.default is p.empty and p.kind != kinds.VAR_POSITIONAL:
            raise PluginError(
                f"{where} requires argument {p.name!r}, which the host never passes "
                f"(it passes only {', '.join(KEYWORDS)})"
            )
    required = tuple(
        k for k in _OPTIONS if k in sig.parameters and sig.parameters[k].default is inspect.Parameter.empty
    )
    user_params = tuple(opt for k, opt in KEYWORDS.items() if k in keywords and opt is not None)
    description = str(options.get("description") or (inspect.getdoc(fn) or "").split("\n", 1)[0])
    reference = options.get("reference")
    return CombineMethod(
        name=name,
        function=fn,
        description=description,
        reference=str(reference) if reference else None,
        params=user_params,
        required=required,
        plugin=plugin,
        _keywords=tuple(keywords),
    )


def methods() -> dict[str, CombineMethod]:
    """Every registered combine method by name, built-ins first (collected on each call, so plugins
    registered at run time count).

    Raises:
        PluginError: a method registered twice, or with a signature the host cannot call.
    """
    from adapterhub_cli.plugins.manager import registrations

    found: dict[str, CombineMethod] = {}
    for reg in registrations("adapters_register_methods", key=lambda obj: getattr(obj, "name", repr(obj))):
        if not isinstance(reg.value, tuple):
            raise PluginError(f"plugin {reg.plugin!r}: register combine methods as register(name, fn, ...)")
        if reg.name in found:
            raise PluginError(
                f"plugin {reg.plugin!r} registers combine method {reg.name!r}, "
                f"already registered by {found[reg.name].plugin!r}"
            )
        fn, options = reg.value
        found[reg.name] = _method(reg.name, fn, options, reg.plugin)
    return found


def method_names() -> list[str]:
    """The names of the registered combine methods, built-ins first."""
    return list(methods())


def get_method(name: str) -> CombineMethod:
    """The combine method called ``name``.

    Raises:
        UsageError: no such method; the message lists the known ones.
    """
    found = methods()
    if name not in found:
        raise UsageError(
            f"unknown combine method {name!r}; known methods: {', '.join(found)}",
            hint="a plugin can add one through adapters_register_methods (`adapters plugins` lists them)",
        )
    return found[name]


__all__ = ["KEYWORDS", "CombineMethod", "CombinedFactors", "get_method", "method_names", "methods"]
