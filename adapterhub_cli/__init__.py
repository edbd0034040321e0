"""adapterhub_cli: LoRA adapters as versioned artifacts.

    import adapterhub_cli as ah
    lora = ah.load("./my-lora")
    print(ah.inspect(lora).num_parameters)
    report = ah.validate(lora, base="./llama")

Importing this package does not import torch; operations that need weights import it when called.
"""

from adapterhub_cli._version import __version__
from adapterhub_cli.api import (
    analyze,
    combine,
    convert,
    dequantize,
    diff,
    extract,
    inspect,
    load,
    merge,
    merge_each,
    open_base,
    pull,
    push,
    quantize,
    reduce,
    unmerge,
    validate,
    versions,
)
from adapterhub_cli.artifact.adapter import Adapter, LoraModule
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.config import AdapterConfig
from adapterhub_cli.artifact.provenance import Provenance
from adapterhub_cli.artifact.ref import AdapterRef
from adapterhub_cli.artifact.report import InspectReport, ModuleRow, ModuleSpectrum
from adapterhub_cli.artifact.validate import Finding, ValidationReport
from adapterhub_cli.batch import JobRecord, JobsFileError, batch
from adapterhub_cli.errors import (
    AdapterNotFoundError,
    AdaptersError,
    CorruptFileError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubResponseError,
    IncompatibleBaseError,
    InvalidAdapterError,
    PluginError,
    StoreError,
    StoreNotFoundError,
    UnknownFormatError,
    UnsafeFileError,
    UsageError,
    VersionConflictError,
)
from adapterhub_cli.plugins.hookspecs import hookimpl


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
    "HubResponseError",
    "IncompatibleBaseError",
    "InspectReport",
    "InvalidAdapterError",
    "JobRecord",
    "JobsFileError",
    "LoraModule",
    "ModuleRow",
    "ModuleSpectrum",
    "PluginError",
    "Provenance",
    "StoreError",
    "StoreNotFoundError",
    "UnknownFormatError",
    "UnsafeFileError",
    "UsageError",
    "ValidationReport",
    "VersionConflictError",
    "__version__",
    "analyze",
    "batch",
    "combine",
    "convert",
    "dequantize",
    "diff",
    "extract",
    "hookimpl",
    "inspect",
    "load",
    "merge",
    "merge_each",
    "open_base",
    "pull",
    "push",
    "quantize",
    "reduce",
    "unmerge",
    "validate",
    "versions",
]
