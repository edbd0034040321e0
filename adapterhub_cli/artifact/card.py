"""Model cards for what this tool writes: Hub metadata (``base_model``, ``library_name``, ``base_model_relation``),
how to use the artifact, and the lineage from its provenance.

Three kinds: a PEFT adapter (``library_name: peft``, loads with ``PeftModel.from_pretrained``), a quantized adapter
(int8 / fp8 / nf4 factors: no library can load it as is, so the card says ``adapters dequantize`` first and carries
no PEFT label or snippet), and a merged model (``base_model_relation: merge``, the adapters merged with their
weights and sha256, and the loading class its ``config.json`` names). The cards embed the provenance record in an
HTML comment (:data:`PROVENANCE_COMMENT`) so a later push of the folder carries the same lineage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.ref import is_repo_id
from adapterhub_cli.errors import scrub


#: schemes whose factors only this tool reads (``quantize --to int8|fp8|nf4``); bf16 / fp16 casts load in PEFT
QUANTIZED_SCHEMES = ("int8", "fp8", "nf4")
#: how a card embeds the provenance record it was written from (read back by :func:`card_provenance`)
PROVENANCE_COMMENT = "<!-- adapterhub-cli:provenance "
_COMMENT_END = " -->"

#: architecture suffix (``config.json`` ``architectures``) -> the transformers auto class that loads it
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForSpeechSeq2Seq", "AutoModelForSpeechSeq2Seq"),
    ("ForCTC", "AutoModelForCTC"),
    ("ForAudioClassification", "AutoModelForAudioClassification"),
)


#: PEFT ``task_type`` -> the transformers auto class of the base
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def loading_class(config: dict[str, Any]) -> tuple[str, str]:
    """(library, class) that loads a checkpoint with this ``config.json``: a diffusers component's own class
    (``_class_name``, e.g. ``UNet2DConditionModel``), the transformers auto class for its ``architectures``
    (``LlamaForCausalLM`` -> ``AutoModelForCausalLM``), a ``...ForConditionalGeneration`` class itself (its auto
    class depends on the modality), else ``AutoModel``."""
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and class_name.isidentifier() and "_diffusers_version" in config:
        return "diffusers", class_name
    architectures = config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    if isinstance(arch, str) and arch.isidentifier():
        for suffix, auto in _AUTO_CLASSES:
            if arch.endswith(suffix):
                return "transformers", auto
        if arch.endswith("ForConditionalGeneration"):
            return "transformers", arch
    return "transformers", "AutoModel"


def hub_id(name: object) -> str | None:
    """``name`` if it reads as a Hub repo id (``org/name``) rather than a local path (absolute, ``./``, ``~``, or a
    folder that exists here), else None: what a card may put in ``base_model``."""
    if not isinstance(name, str) or not is_repo_id(name) or name.startswith((".", "~")):
        return None
    return None if Path(name).exists() else name


def quantized_scheme(provenance: dict[str, Any] | None) -> str | None:
    """The scheme (int8, fp8, nf4) of an adapter ``quantize`` stored in a layout PEFT cannot load, else None."""
    if not provenance or provenance.get("operation") != "quantize":
        return None
    params = provenance.get("parameters")
    scheme = params.get("scheme") if isinstance(params, dict) else None
    return scheme if scheme in QUANTIZED_SCHEMES else None


def model_card(config: dict[str, Any], provenance: dict[str, Any]) -> str:
    """README.md of an adapter: YAML front matter the Hub reads, how to use it, what produced it and from what.

    A quantized adapter (int8 / fp8 / nf4 factors) is not labelled ``library_name: peft`` and gets no
    ``PeftModel.from_pretrained`` snippet: PEFT cannot load it until ``adapters dequantize`` writes a plain copy.
    """
    scheme = quantized_scheme(provenance)
    base = hub_id(config.get("base_model_name_or_path"))
    front = ["---"] + ([] if scheme else ["library_name: peft"])
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    tags = ["lora", "adapterhub-cli"] + ([f"quantized-{scheme}"] if scheme else [])
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    op = provenance.get("operation", "?")
    title = f"# LoRA adapter ({op})"
    lines = [title, "", f"Written by {provenance.get('tool', 'adapterhub-cli')}.", ""]
    lines += ["## Use", ""] + (_quantized_use(scheme) if scheme else _adapter_use(config, base))
    lines += _lineage(provenance)
    targets = config.get("target_modules")
    lines += [
        "## Configuration",
        "",
        f"- r: {config.get('r')}, lora_alpha: {config.get('lora_alpha')}, rsLoRA: {bool(config.get('use_rslora'))}",
        f"- target_modules: {targets if isinstance(targets, str) else ', '.join(targets or [])}",
        f"- rank_pattern: {len(config.get('rank_pattern') or {})} entries",
        "",
        embedded_provenance(provenance),
        "",
    ]
    return scrub("\n".join(front + lines))  # cards get published: nothing shaped like a token goes in


def _adapter_use(config: dict[str, Any], base: str | None) -> list[str]:
    cls = _TASK_CLASSES.get(str(config.get("task_type")), "AutoModel")
    base_line = (
        f'base = {cls}.from_pretrained("{base}")'
        if base
        else "base = ...  # the base model this adapter was trained on, loaded with transformers"
    )
    return [
        "```python",
        "from peft import PeftModel",
        *([f"from transformers import {cls}", ""] if base else [""]),
        base_line,
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
    ]


def _quantized_use(scheme: str) -> list[str]:
    return [
        f"The LoRA factors are stored {scheme}-quantized (block scales in `*.qscale` tensors): PEFT and other",
        "libraries cannot load this folder as it is. Write a plain PEFT copy first:",
        "",
        "```sh",
        "adapters dequantize path/to/this/folder -o adapter-fp32   # --dtype bf16|fp16|fp32",
        "```",
        "",
        "then load `adapter-fp32` with PEFT. Every `adapters` command reads this folder directly.",
        "",
    ]


def merged_card(config: dict[str, Any], provenance: dict[str, Any], *, base_model: str | None = None) -> str:
    """README.md of a merged (or unmerged) checkpoint: front matter with ``base_model`` (the base's Hub id, only
    when known: never a local path), ``base_model_relation: merge``, ``library_name``; a snippet loading it with the
    class its ``config.json`` names (:func:`loading_class`); the adapters merged, their weights and sha256."""
    library, cls = loading_class(config)
    base = hub_id(base_model)
    op = str(provenance.get("operation") or "merge")
    front = ["---", f"library_name: {library}"]
    if base:
        front += [f"base_model: {json.dumps(base)}", "base_model_relation: merge"]
    front += ["tags:", "- lora", "- merge", "- adapterhub-cli", "---", ""]
    what = "Model merged with LoRA adapters" if op != "unmerge" else "Model with LoRA adapters subtracted"
    lines = [f"# {what} ({op})", ""]
    on = f" [`{base}`](https://huggingface.co/{base})" if base else " a base checkpoint"
    lines += [f"Written by {provenance.get('tool', 'adapterhub-cli')} from{on}.", ""]
    lines += [
        "## Use",
        "",
        "```python",
        f"from {library} import {cls}",
        "",
        f'model = {cls}.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    lines += _lineage(provenance)
    lines += [embedded_provenance(provenance), ""]
    return scrub("\n".join(front + lines))


def _lineage(provenance: dict[str, Any]) -> list[str]:
    """The lineage section: operation, parameters, and a table of inputs (role, weight, source, sha256)."""
    return ["## Lineage", "", *lineage_lines(provenance)]


def lineage_lines(provenance: dict[str, Any]) -> list[str]:
    """Markdown lines describing a provenance record: the operation, its parameters, and its inputs (a merge's
    base and adapters with their weights; each input's sha256, or the digests recorded for a base).

    The record may come from files someone else wrote (a pushed checkpoint's shards): every value is shown as one
    short line (:func:`_cell`), so none can add lines, end a table cell or a code span, or open an HTML comment
    (the card markers), and fields of the wrong type are left out."""
    op = _cell(provenance.get("operation", "?"))
    tool = _cell(provenance.get("tool", "adapterhub-cli"))
    lines = [f"Produced by `{op}` with `{tool}`.", ""]
    given = provenance.get("parameters")
    params: dict[Any, Any] = given if isinstance(given, dict) else {}
    if params:
        lines += ["Parameters:", ""]
        lines += [f"- `{_cell(k)}`: `{_cell(json.dumps(v, default=str))}`" for k, v in params.items()] + [""]
    listed = provenance.get("inputs")
    inputs = [i for i in listed if isinstance(i, dict)] if isinstance(listed, list) else []
    if not inputs:
        return lines
    if not any(i.get("role") for i in inputs):
        lines += ["| input | sha256 |", "| --- | --- |"]
        rows = [f"| `{_cell(i.get('source'))}` | `{_cell(i.get('sha256') or '-')}` |" for i in inputs]
        return [*lines, *rows, ""]
    weights = params.get("weights")
    weights = weights if isinstance(weights, list) else []
    lines += ["| input | role | weight | sha256 |", "| --- | --- | --- | --- |"]
    k = 0  # the adapter's position among the adapters (its weight's index)
    for i in inputs:
        given_role = i.get("role") or "input"
        role = given_role if given_role in ("base", "adapter", "input") else "input"  # (no free text outside a span)
        weight = "-"
        if role == "adapter":
            w = weights[k] if k < len(weights) else 1
            weight = f"{w:g}" if isinstance(w, int | float) and not isinstance(w, bool) else "1"
            k += 1
        lines.append(f"| `{_cell(i.get('source'))}` | {role} | {weight} | `{_cell(i.get('sha256') or '-')}` |")
    lines.append("")
    for i in inputs:
        if i.get("role") == "base" and not i.get("sha256"):
            lines += [
                f"The base's weights were not hashed (as long as the merge itself); its `config.json` hashes to "
                f"`{_cell(i.get('config_sha256') or '-')}` and its tensor table (names, dtypes, shapes) to "
                f"`{_cell(i.get('tensors_sha256') or '-')}`.",
                "",
            ]
    return lines


#: the longest value a lineage line shows (a path, a ref, a parameter's JSON)
_CELL_CHARS = 200


def _cell(value: object) -> str:
    """``value`` as one short line safe inside a markdown table cell and a code span: secrets scrubbed first (a
    token cut short would no longer be recognised), line breaks become spaces, ``|`` and backticks are replaced,
    ``<`` becomes ``\u2039`` (no HTML, no comment markers such as the card's own), cut at 200 characters."""
    text = scrub(" ".join(str(value).split()))
    text = text.replace("`", "'").replace("|", "/").replace("<", "\u2039")
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 3] + "..."


def embedded_provenance(provenance: dict[str, Any]) -> str:
    """The provenance record as an HTML comment (invisible on the Hub; ``--`` escaped so it cannot end early)."""
    text = json.dumps(provenance, sort_keys=True).replace("--", "-\\u002d")
    return PROVENANCE_COMMENT + text + _COMMENT_END


def card_provenance(card: str | None) -> dict[str, Any] | None:
    """The provenance record a card written by this tool embeds (:data:`PROVENANCE_COMMENT`), or None."""
    if not card or PROVENANCE_COMMENT not in card:
        return None
    raw = card.split(PROVENANCE_COMMENT, 1)[1].split(_COMMENT_END, 1)[0]
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
