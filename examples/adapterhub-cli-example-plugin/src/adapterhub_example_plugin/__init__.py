"""An example plugin for adapterhub-cli: one format, one combine method, one command and one store.

The entry point ``example`` (group ``adapterhub_cli``, see pyproject.toml) names :mod:`.plugin`, whose
``@hookimpl`` functions register each contribution. Each lives in its own small module.
"""

__version__ = "0.1.0"
