"""adapterhub_cli: LoRA adapters as versioned artifacts.

    import adapterhub_cli as ah
    lora = ah.load("./my-lora")
    print(ah.inspect(lora).num_parameters)
    report = ah.validate(lora, base="./llama")

Importing this package does not import torch; operations that need weights import it when called.
"""

from adapterhub_cli.api import (
    combine,
    convert,
    dequantize,
    diff,
    inspect,
    load,
    merge,
    pull,
    push,
    quantize,
    reduce,
    unmerge,
    validate,
    versions,
)
from adapterhub_cli.artifact import Adapter, LoraModule, Provenance
from adapterhub_cli.base_model import BaseView, open_base
from adapterhub_cli.config import AdapterConfig
from adapterhub_cli.errors import (
    AdapterNotFoundError,
    AdaptersError,
    CorruptFileError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    IncompatibleBaseError,
    InvalidAdapterError,
    PluginError,
    UnknownFormatError,
    UnsafeFileError,
    UsageError,
    VersionConflictError,
)
from adapterhub_cli.hookspecs import hookimpl
from adapterhub_cli.ref import AdapterRef
from adapterhub_cli.report import InspectReport, ModuleRow, ModuleSpectrum
from adapterhub_cli.validate import Finding, ValidationReport


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterNotFoundError",
    "AdapterRef",
    "AdaptersError",
    "BaseView",
    "CorruptFileError",
    "Finding",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "IncompatibleBaseError",
    "InspectReport",
    "InvalidAdapterError",
    "LoraModule",
    "ModuleRow",
    "ModuleSpectrum",
    "PluginError",
    "Provenance",
    "UnknownFormatError",
    "UnsafeFileError",
    "UsageError",
    "ValidationReport",
    "VersionConflictError",
    "__version__",
    "combine",
    "convert",
    "dequantize",
    "diff",
    "hookimpl",
    "inspect",
    "load",
    "merge",
    "open_base",
    "pull",
    "push",
    "quantize",
    "reduce",
    "unmerge",
    "validate",
    "versions",
]
