"""Model cards of published versions: Hub metadata (base_model, library_name: peft) and the lineage.

Every store publishes the same card, so a version copied from a local registry to the Hub (or back) carries it.
"""

from __future__ import annotations

from typing import Any

from adapterhub_cli.artifact.ref import is_repo_id
from adapterhub_cli.errors import scrub


CARD_START = "<!-- adapterhub-cli:card:start -->"


CARD_END = "<!-- adapterhub-cli:card:end -->"


_CARD_TAGS = ["lora", "peft", "adapterhub-cli"]


#: the first heading of the cards :mod:`adapterhub_cli.artifact.card` writes (replaced by a push's section)
_OWN_TITLES = ("# LoRA adapter (", "# Model merged with LoRA adapters (", "# Model with LoRA adapters subtracted (")


def hub_card(
    existing: str | None,
    *,
    adapter: Any,
    config: dict[str, Any],
    relation: str,
    base_model: str | None,
    repo_id: str,
    version: str,
    sha256: dict[str, str],
    repo_ref: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> str:
    """README.md for a push (``repo_ref``: how refs name the repo when it is not on the Hub, e.g.
    ``file:///srv/adapters/org/name``): the existing card (if any) with its Hub metadata set and our section updated.

    Front matter: ``base_model``, ``base_model_relation`` (``adapter`` or ``merge``), ``library_name`` (``peft``
    for an adapter) and tags. The section between the adapterhub-cli markers (replaced on each push; the rest
    of a hand-written card is kept) holds usage, the lineage from the provenance, file hashes and, for an
    adapter, a table of modules and ranks. Nothing secret goes in: the card is built from the artifact only.

    ``provenance``: the record the artifact carries (default: the adapter's; for a merged model the record its
    shards carry, :func:`adapterhub_cli.artifact.provenance.checkpoint_provenance`, else the one embedded in the
    card ``merge`` wrote). A merged model gets ``library_name`` and a snippet from its ``config.json``
    (``LlamaForCausalLM`` -> ``AutoModelForCausalLM``); a quantized adapter (int8 / fp8 / nf4) is not labelled
    ``peft`` and its card says ``adapters dequantize`` first.
    """
    from adapterhub_cli.artifact.card import card_provenance, loading_class, quantized_scheme
    from adapterhub_cli.artifact.provenance import read_provenance

    if provenance is None and adapter is not None:
        provenance = read_provenance(adapter)
    if provenance is None and relation != "adapter":
        provenance = card_provenance(existing)
    scheme = quantized_scheme(provenance) if relation == "adapter" else None
    from huggingface_hub import ModelCard

    text = existing or ""
    if not text.startswith("---"):
        text = "---\n{}\n---\n" + text
    card = ModelCard(text, ignore_metadata_errors=True)
    data = card.data
    if base_model:
        data["base_model"] = base_model
    else:  # the Hub accepts only repo ids: drop a local path another tool put there (PEFT writes one)
        kept = [b for b in _as_list(data.get("base_model")) if is_repo_id(b)]
        data["base_model"] = (kept[0] if len(kept) == 1 else kept) or None
    tags = [t for t in _as_list(data.get("tags")) if not t.startswith("base_model:") or is_repo_id(t.split(":")[-1])]
    data["tags"] = tags
    data["base_model_relation"] = relation if data.get("base_model") else None  # meaningless without a base
    if relation == "adapter":
        data["library_name"] = None if scheme else "peft"  # PEFT cannot load int8 / fp8 / nf4 factors as they are
    else:
        data["library_name"] = loading_class(config)[0]
    peft_label = relation == "adapter" and not scheme  # PEFT loads it as it is
    own = [t for t in _CARD_TAGS if peft_label or t != "peft"] + ([f"quantized-{scheme}"] if scheme else [])
    own += [] if relation == "adapter" else ["merge"]
    kept = [t for t in data.get("tags") or [] if peft_label or t != "peft"]
    data["tags"] = list(dict.fromkeys([*kept, *own]))
    section = _hub_section(
        adapter,
        config,
        relation,
        data.get("base_model") if isinstance(data.get("base_model"), str) else base_model,
        repo_ref or repo_id,
        version,
        sha256,
        repo_ref is None,
        provenance=provenance,
        scheme=scheme,
    )
    body = card.text
    if CARD_START in body and CARD_END in body:
        before, rest = body.split(CARD_START, 1)
        body = before + section + rest.split(CARD_END, 1)[1]
    elif not body.strip() or body.lstrip().startswith(_OWN_TITLES):  # empty, or written by artifact.card
        body = section + "\n"
    else:
        body = body.rstrip() + "\n\n" + section + "\n"
    card.text = body
    return scrub(str(card))  # a card is published: nothing shaped like a token goes with it


def _hub_section(
    adapter: Any,
    config: dict[str, Any],
    relation: str,
    base_model: str | None,
    repo_id: str,
    version: str,
    sha256: dict[str, str],
    on_hub: bool = True,
    *,
    provenance: dict[str, Any] | None = None,
    scheme: str | None = None,
) -> str:
    from adapterhub_cli.artifact.card import embedded_provenance, lineage_lines, loading_class

    tag = f"v{version}"
    what = "LoRA adapter" if relation == "adapter" else "model merged with LoRA adapters"
    if scheme:
        what = f"LoRA adapter with {scheme}-quantized factors"
    base = f" for [`{base_model}`](https://huggingface.co/{base_model})" if base_model else ""
    lines = [CARD_START, f"# {repo_id} {tag}", "", f"A {what}{base}, published with adapterhub-cli.", ""]
    library, cls = loading_class(config)
    if scheme:
        use = [
            f"# the factors are stored {scheme}-quantized: PEFT cannot load this version as it is.",
            "# write a plain PEFT copy first (any dtype: --dtype bf16|fp16|fp32), then load that folder with PEFT:",
            f"#   adapters pull {repo_id}@{tag} -o ./quantized",
            "#   adapters dequantize ./quantized -o ./adapter",
            "import adapterhub_cli as ah",
            "",
            f'lora = ah.load("{repo_id}@{tag}")  # every adapters command reads it directly',
        ]
    elif relation != "adapter":
        load = (
            f'model = {cls}.from_pretrained("{repo_id}", revision="{tag}")'
            if on_hub
            else f'model = {cls}.from_pretrained("./model")'
        )
        use = [
            f"from {library} import {cls}",
            "",
            *([] if on_hub else [f"# adapters pull {repo_id}@{tag} -o ./model"]),
            load,
        ]
    elif not on_hub:
        use = ["import adapterhub_cli as ah", "", f'lora = ah.load("{repo_id}@{tag}")  # config and headers only']
    else:
        use = [
            "import adapterhub_cli as ah",
            "from peft import PeftModel",
            "",
            f'lora = ah.load("{repo_id}@{tag}")  # config and headers only',
            f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{tag}")',
        ]
    lines += [
        "## Use",
        "",
        "```python",
        *use,
        "```",
        "",
        f"Pull this exact version: `adapters pull {repo_id}@{tag}`.",
        "",
    ]
    lines += ["## Lineage", ""]
    if provenance:
        lines += lineage_lines(provenance)
    else:
        lines += ["No recorded operation: trained or written outside adapterhub-cli.", ""]
    if sha256:
        lines += ["| file | sha256 |", "| --- | --- |"] + [f"| `{n}` | `{h}` |" for n, h in sha256.items()] + [""]
    if adapter is not None:
        rs = " (rsLoRA: alpha / sqrt(r))" if config.get("use_rslora") else ""
        lines += ["## Modules", "", f"r = {config.get('r')}, lora_alpha = {config.get('lora_alpha')}{rs}.", ""]
        lines += ["| module | d_out x d_in | rank | alpha | scale |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| `{m.name}` | {m.d_out} x {m.d_in} | {m.rank} | {m.alpha:g} | {m.scale:g} |"
            for m in adapter.modules.values()
        ]
        lines.append("")
    if provenance:
        lines += [embedded_provenance(provenance), ""]
    lines.append(CARD_END)
    return "\n".join(lines)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
