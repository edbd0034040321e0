"""Untrusted text prints literally: module names and config values holding rich markup, ANSI / OSC escape
sequences, carriage returns, NUL, bidi overrides or lone surrogates are shown as text (control characters as
visible escapes), never interpreted, never crash a command, and never crash one after its output was written.

The hostile adapters are real fixture adapters (``llama_lora``) with one module renamed in the safetensors
header and in ``target_modules`` (so the name is a real, targeted module), and a hostile declared base.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import run_cli as cli
from click.testing import Result

from adapterhub_cli.cli._output import Output, styled, visible


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"

#: Rich markup, ANSI colour / screen-clear, an OSC 8 hyperlink, CR, NUL, BEL, BS, DEL, a C1 CSI, a bidi override.
MARKUP_AND_CONTROLS = (
    "evil[/x][bold]B[/bold][link=https://evil]L[/link]:smile:"
    "\x1b[31mR\x1b[2J\x1b]8;;https://evil\x07O\x1b]8;;\x07\rCR\x00N\x07\x08\x7f\x9b31m\u202eRTL"
)
LONE_SURROGATE = "sur\udcffrogate[/x]"
HOSTILE_BASE = "base[/]\x1b]8;;https://evil.example\x07click me\x1b]8;;\x07\x1b[2K\r[red]fake[/red]"

#: what must never reach a terminal: C0 / C1 controls (tab and newline aside), bidi overrides, surrogates
_FORBIDDEN = {chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))} | {
    "\u202e",
    "\u2028",
    "\u2029",
}


@pytest.fixture(autouse=True)
def _wide_private_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private hash cache, and a terminal wide enough that long hostile names are never cut with an ellipsis."""
    from adapterhub_cli.cli import _output

    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "hash-cache"))
    monkeypatch.setenv("COLUMNS", "2000")
    monkeypatch.setattr(_output.out, "_console", None)  # the sink reads COLUMNS when it first prints
    monkeypatch.setattr(_output.out, "_err", None)


def rename_module(folder: Path, old: str, new: str) -> None:
    """Rename module ``old`` to ``new`` in the safetensors header (data untouched) and in target_modules."""
    st = folder / WEIGHTS
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    old_key, new_key = f"{PREFIX}{old}.", f"{PREFIX}{new}."
    renamed = {(new_key + k[len(old_key) :] if k.startswith(old_key) else k): v for k, v in header.items()}
    assert renamed != header
    js = json.dumps(renamed).encode()  # ensure_ascii: controls and surrogates travel as \u escapes
    st.write_bytes(struct.pack("<Q", len(js)) + js + raw[8 + n :])
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["target_modules"] = [*cfg["target_modules"], new.rsplit(".", 1)[-1]]
    (folder / CONFIG).write_text(json.dumps(cfg))


def hostile(src: Path, copy: Callable[..., Path], leaf: str, base: str = HOSTILE_BASE) -> tuple[Path, str]:
    """A copy of ``src`` whose layer-0 q_proj is called ``leaf``; returns (folder, full module name)."""
    d = copy(src)
    name = f"model.layers.0.self_attn.{leaf}"
    rename_module(d, Q0, name)
    cfg = json.loads((d / CONFIG).read_text())
    cfg["base_model_name_or_path"] = base
    (d / CONFIG).write_text(json.dumps(cfg))
    return d, name


def assert_clean(result: Result, exit_code: int) -> None:
    """The command ended as expected, without a Python exception, and printed nothing a terminal would act on."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    bad = sorted({c for c in text if c in _FORBIDDEN or 0xD800 <= ord(c) <= 0xDFFF})
    assert not bad, f"raw control characters reached the terminal: {bad!r}"


def finished(result: Result, exit_code: int, leaf: str) -> bool:
    """Whether the command ran to its usual end (``exit_code``, checked clean). A name with a lone surrogate is
    not Unicode: refusing it as bad input (exit 2, one literal ``Error:``) is clean too, and returns False."""
    if result.exit_code == 2 and any(0xD800 <= ord(c) <= 0xDFFF for c in leaf):
        assert_clean(result, 2)
        assert result.stdout == "" and result.stderr.startswith("Error: ") and "\\udcff" in result.stderr
        return False
    assert_clean(result, exit_code)
    return True


def shown(text: str) -> str:
    """``text`` as the terminal shows it: whitespace runs collapsed (rich pads cells)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- the sink itself


def test_visible_escapes_controls_and_keeps_text() -> None:
    assert visible("a[/x]b") == "a[/x]b"
    assert visible("\x1b[31mred\r\x00\x07") == "\\x1b[31mred\\x0d\\x00\\x07"
    assert visible("\x9b\x7f\u202e\u2066\udcff") == "\\x9b\\x7f\\u202e\\u2066\\udcff"
    assert visible("tab\there") == "tab\\x09here"
    assert visible("two\nlines") == "two\\x0alines"
    assert visible("two\nlines", newlines=True) == "two\nlines"
    assert visible("名前 é 😀 a\u200db") == "名前 é 😀 a\u200db"  # printable text and joiners stay as they are


def test_sink_prints_markup_literally_and_escapes_controls(capsys: pytest.CaptureFixture[str]) -> None:
    o = Output()
    o.print(f"plain {MARKUP_AND_CONTROLS}")
    o.print(styled(("OK", "green"), ": ", MARKUP_AND_CONTROLS))
    t = o.table("title [/x]", "module [bold]", "value")
    t.add_row(MARKUP_AND_CONTROLS, styled((HOSTILE_BASE, "red")))
    o.print(t)
    o.print(o.key_values([("base", HOSTILE_BASE), ("n", 3), ("none", None)]))
    o.warn(f"careful: {HOSTILE_BASE}")
    o.error(f"bad module {MARKUP_AND_CONTROLS}\n  hint: {HOSTILE_BASE}")
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert not {c for c in text if c in _FORBIDDEN}
    assert cap.out.count(visible(MARKUP_AND_CONTROLS)) == 3  # plain print, styled line, table cell
    assert cap.out.count(visible(HOSTILE_BASE)) == 2  # table cell, key-value row
    assert "title [/x]" in cap.out and "module [bold]" in cap.out
    assert f"warning: careful: {visible(HOSTILE_BASE)}" in cap.err
    assert f"Error: bad module {visible(MARKUP_AND_CONTROLS)}\n  hint: {visible(HOSTILE_BASE)}\n" in cap.err


def test_sink_json_is_strict_ascii_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = {"name": MARKUP_AND_CONTROLS + LONE_SURROGATE, "x": float("nan"), "y": [float("inf"), -float("inf")], 3: 1}
    Output().json(data)
    raw = capsys.readouterr().out
    assert raw.isascii()
    back = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back == {"name": MARKUP_AND_CONTROLS + LONE_SURROGATE, "x": "nan", "y": ["inf", "-inf"], "3": 1}


def test_sink_survives_a_terminal_that_is_not_utf8(monkeypatch: pytest.MonkeyPatch) -> None:
    """A latin-1 or ASCII terminal gets backslash escapes for what it cannot show, not a UnicodeEncodeError."""
    stdout, stderr = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(stdout, encoding="ascii"))
    monkeypatch.setattr("sys.stderr", io.TextIOWrapper(stderr, encoding="ascii"))
    o = Output()
    t = o.table(None, "module")
    t.add_row("層.0.q_proj é")
    o.print(t)
    o.print("wrote 名前")
    o.warn("ünïcode")
    o.error("bad 層")
    sys.stdout.flush()
    sys.stderr.flush()
    printed, errors = stdout.getvalue().decode("ascii"), stderr.getvalue().decode("ascii")
    assert "\\u5c64.0.q_proj \\xe9" in printed and "wrote \\u540d\\u524d" in printed
    assert "warning: \\xfcn\\xefcode" in errors and "Error: bad \\u5c64" in errors


# ------------------------------------------------------------------------ commands, plain text


@pytest.mark.parametrize("leaf", [MARKUP_AND_CONTROLS, LONE_SURROGATE], ids=["markup-controls", "lone-surrogate"])
def test_inspect_modules_prints_hostile_names_literally(
    llama_lora: Path, copy_adapter: Callable[..., Path], leaf: str
) -> None:
    d, name = hostile(llama_lora, copy_adapter, leaf)
    r = cli("inspect", str(d), "--modules", "--spectrum")
    if not finished(r, 0, leaf):
        return
    assert r.stdout.count(visible(name)) == 2  # the modules table and the spectrum table
    assert visible(leaf) in r.stdout  # target_modules row
    assert visible(HOSTILE_BASE) in shown(r.stdout)  # base model row (may fold)


@pytest.mark.parametrize("leaf", [MARKUP_AND_CONTROLS, LONE_SURROGATE], ids=["markup-controls", "lone-surrogate"])
def test_validate_prints_hostile_names_literally(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], leaf: str
) -> None:
    d, name = hostile(llama_lora, copy_adapter, leaf)
    r = cli("validate", str(d), "--base", str(llama_base))
    if not finished(r, 1, leaf):  # the renamed module is not in the base: an error finding, exit 1
        return
    assert visible(name) in r.stdout  # the module column
    assert "│ error    │ " in r.stdout and "[bold red]" not in r.stdout  # the styled severity is not markup text
    assert re.match(r"\d+ error\(s\) \(\d+ warning\(s\)\); 4 modules checked", r.stdout.splitlines()[-1])


@pytest.mark.parametrize("leaf", [MARKUP_AND_CONTROLS, LONE_SURROGATE], ids=["markup-controls", "lone-surrogate"])
def test_diff_prints_hostile_names_literally(llama_lora: Path, copy_adapter: Callable[..., Path], leaf: str) -> None:
    d, name = hostile(llama_lora, copy_adapter, leaf)
    r = cli("diff", str(d), str(llama_lora))
    if not finished(r, 0, leaf):
        return
    assert f"only in A (1): {visible(name)}" in r.stdout
    assert visible(HOSTILE_BASE) in shown(r.stdout)  # the config table (last column wraps)
    assert "[red]fake[/red]" not in shown(r.stdout).replace(visible(HOSTILE_BASE), "")


def test_reduce_writes_then_prints_hostile_names_literally(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """The output is written first; printing the crafted name afterwards must not turn success into a crash."""
    d, name = hostile(llama_lora, copy_adapter, MARKUP_AND_CONTROLS)
    out = tmp_path / "reduced"
    r = cli("reduce", str(d), "--rank", "2", "-o", str(out))
    assert_clean(r, 0)
    assert visible(name) in r.stdout and f"wrote {out}" in r.stdout
    # only the display is escaped: the written adapter keeps the exact name
    back = json.loads(cli("inspect", str(out), "--json", "--modules", "--no-hash").stdout)
    assert name in {m["name"] for m in back["modules"]}


def test_reduce_with_a_lone_surrogate_name_fails_cleanly_or_succeeds(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """Not Unicode, so it cannot go into a UTF-8 README or JSON as is: refused before writing, or written whole."""
    d, name = hostile(llama_lora, copy_adapter, LONE_SURROGATE)
    parent = tmp_path / "outputs"
    parent.mkdir()
    r = cli("reduce", str(d), "--rank", "2", "-o", str(parent / "reduced"))
    if finished(r, 0, LONE_SURROGATE):
        assert visible(name) in r.stdout
        assert sorted(p.name for p in parent.iterdir()) == ["reduced"]
    else:
        assert list(parent.iterdir()) == []


def test_error_messages_print_hostile_names_literally(
    llama_lora: Path, copy_adapter: Callable[..., Path], llama_base: Path
) -> None:
    """A bad file whose module name is hostile: one clean ``Error:`` line naming it, nothing interpreted."""
    d, name = hostile(llama_lora, copy_adapter, MARKUP_AND_CONTROLS)
    cfg = json.loads((d / CONFIG).read_text())
    cfg["r"] = 4  # the tensors have rank 8: the error names the module
    (d / CONFIG).write_text(json.dumps(cfg))
    r = cli("inspect", str(d))
    assert_clean(r, 2)
    assert r.stdout == "" and r.stderr.startswith("Error: ")
    assert sum("Error:" in line for line in r.stderr.splitlines()) == 1
    assert visible(name) in r.stderr
    r = cli("validate", str(d), "--base", str(llama_base))  # validate reports it as a finding instead
    assert_clean(r, 1)
    assert visible(name) in r.stdout


# ------------------------------------------------------------------------------- commands, JSON


@pytest.mark.parametrize("leaf", [MARKUP_AND_CONTROLS, LONE_SURROGATE], ids=["markup-controls", "lone-surrogate"])
def test_json_output_stays_valid_and_exact(
    llama_lora: Path, llama_base: Path, copy_adapter: Callable[..., Path], leaf: str
) -> None:
    d, name = hostile(llama_lora, copy_adapter, leaf)
    runs = {
        "inspect": (cli("inspect", str(d), "--modules", "--json"), 0),
        "validate": (cli("validate", str(d), "--base", str(llama_base), "--json"), 1),
        "diff": (cli("diff", str(d), str(llama_lora), "--json"), 0),
    }
    docs = {}
    for cmd, (r, code) in runs.items():
        if finished(r, code, leaf):
            assert r.stdout.isascii(), cmd
            docs[cmd] = json.loads(r.stdout)
    if not docs:  # the name was refused as bad input: nothing to compare
        return
    assert set(docs) == set(runs)
    # the data is the exact text, only escaped by JSON
    assert name in {m["name"] for m in docs["inspect"]["modules"]}
    assert leaf in docs["inspect"]["target_modules"]
    assert docs["inspect"]["base_model_name_or_path"] == HOSTILE_BASE
    assert name in {f["module"] for f in docs["validate"]["findings"]}
    assert name in docs["diff"]["only_in_a"]


def test_reduce_json_stays_valid_and_exact(
    llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    d, name = hostile(llama_lora, copy_adapter, MARKUP_AND_CONTROLS)
    r = cli("reduce", str(d), "--rank", "2", "-o", str(tmp_path / "reduced"), "--json")
    assert_clean(r, 0)
    assert r.stdout.isascii()
    doc = json.loads(r.stdout)
    assert name in {m["name"] for m in doc["modules"]}
    assert name in doc["rank_pattern"] or doc["r"] == 2


def test_tokens_never_print_even_from_a_file(
    llama_lora: Path, copy_adapter: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config that quotes the user's token (or anything shaped like one) never gets it printed, plain or JSON:
    the sink scrubs every string as a last line of defence."""
    secret = "s3cret-token-value-0123456789"
    shaped = "hf_" + "A1b2C3d4E5" * 4
    monkeypatch.setenv("HF_TOKEN", secret)
    d = copy_adapter(llama_lora)
    cfg = json.loads((d / CONFIG).read_text())
    cfg["base_model_name_or_path"] = f"https://example.invalid/?t={secret}&u={shaped}"
    cfg["revision"] = f"Bearer {secret}x"
    (d / CONFIG).write_text(json.dumps(cfg))
    for args in (["inspect", str(d)], ["inspect", str(d), "--json"]):
        r = cli(*args)
        assert_clean(r, 0)
        text = r.stdout + r.stderr
        assert secret not in text and shaped not in text
        assert "https://example.invalid/?t=***&u=***" in text and "Bearer ***" in text
    assert json.loads(cli("inspect", str(d), "--json").stdout)["revision"] == "Bearer ***"


@pytest.mark.parametrize("entry", ["main", "console_main"])
@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_reader_that_went_away_does_not_fail_a_written_output(
    fmt: str, entry: str, llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """``adapters reduce ... | head -0``: stdout is a pipe nobody reads. The output is written, so the command
    still exits 0, quietly (no ``Error: Broken pipe``, no ``Exception ignored`` at exit), whether it ends with
    the orderly exit (``main``) or the installed command's fast one (``console_main``)."""
    import os
    import subprocess

    d, _ = hostile(llama_lora, copy_adapter, MARKUP_AND_CONTROLS)
    out = tmp_path / "reduced"
    args = ["reduce", str(d), "--rank", "2", "-o", str(out), *(["--json"] if fmt == "json" else [])]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"from adapterhub_cli.cli.main import {entry}; {entry}()", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
    assert (out / WEIGHTS).is_file()


@pytest.mark.parametrize(
    "command",
    [
        ["combine", "{a}", "{src}", "--weights", "1,-1", "--force", "-o", "{out}"],
        ["quantize", "{a}", "--to", "int8", "-o", "{out}"],
        ["convert", "{a}", "--to", "peft", "-o", "{out}"],
    ],
    ids=["combine", "quantize", "convert"],
)
def test_other_writers_print_hostile_names_literally_after_writing(
    command: list[str], llama_lora: Path, copy_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    d, name = hostile(llama_lora, copy_adapter, MARKUP_AND_CONTROLS)
    out = tmp_path / "written"
    r = cli(*(arg.format(a=d, src=llama_lora, out=out) for arg in command))
    assert_clean(r, 0)
    assert (out / WEIGHTS).is_file() and f"wrote {out}" in r.stdout
    if command[0] != "convert":  # convert prints a summary line, no module table
        assert visible(name) in r.stdout


@pytest.mark.parametrize("width", ["40", "60", "80"])
def test_narrow_layouts_print_hostile_names_literally(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], width: str
) -> None:
    """The borderless, shared-prefix and vertical layouts escape what the boxed one escapes."""
    monkeypatch.setenv("COLUMNS", width)
    o = Output()
    t = o.table("t [/x]", "module", "value", "what to do", wrap_last=True)
    for i in range(2):
        t.add_row(f"model.layers.{i}.{MARKUP_AND_CONTROLS}", styled((HOSTILE_BASE, "red")), f"fix {HOSTILE_BASE}")
    o.print(t)
    o.print(o.key_values([("base", HOSTILE_BASE), ("name", MARKUP_AND_CONTROLS)]))
    text = capsys.readouterr().out
    assert not {c for c in text if c in _FORBIDDEN}

    def squeezed(s: str) -> str:  # a long escaped name may fold over lines in the narrowest layout
        return re.sub(r"[\s│┃]+", "", s)

    assert "t [/x]" in text
    assert squeezed(text).count(squeezed(visible(MARKUP_AND_CONTROLS))) == 3  # two rows, one key-value row
    assert squeezed(text).count(squeezed(visible(HOSTILE_BASE))) == 5  # twice per row, once in key-values
