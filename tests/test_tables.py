"""Every table keeps its module names and numbers whole at 60, 80 and 120 columns, and no line is wider than the
terminal or ends in spaces.

Each command runs twice through the CLI: at 1000 columns, where every table is a plain boxed table (the reference:
its cells are read back and checked against the API's JSON), and at the width under test, where each reference row
must be found whole: the module name (in full, or after the common prefix printed once above the table) and every
cell of the row, in whichever layout the width allowed (boxed, borderless, or one block per module).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.cells import cell_len

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli
from adapterhub_cli.ops.demo import build_demo


WIDTHS = [60, 80, 120]
PREFIX_NOTE = re.compile(r"^\(module names start with (\S+)\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's base and adapter (6 modules, names 31 characters long), a reduced copy and an int8 copy."""
    root = tmp_path_factory.mktemp("tables")
    base, adapter = build_demo(root)
    ah.reduce(adapter, root / "reduced", energy=0.9)
    ah.quantize(adapter, root / "int8", scheme="int8")
    return {"root": root, "base": base, "adapter": adapter, "reduced": root / "reduced", "int8": root / "int8"}


def cli(width: int, *args: str) -> Result:
    res = CliRunner().invoke(build_cli(), list(args), env={"COLUMNS": str(width)})
    assert res.exit_code in (0, 1), res.output
    return res


# ------------------------------------------------------------------------------------- reading tables back


def boxed_tables(text: str) -> list[list[list[str]]]:
    """The rows (lists of stripped cells) of each boxed table in ``text``, header rows included; wrapped cells
    are joined with a space."""
    tables: list[list[list[str]]] = []
    for line in text.splitlines():
        if line.startswith("┏"):
            tables.append([])
        elif line.startswith(("│", "┃")) and tables:
            cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
            rows = tables[-1]
            if cells[0] == "" and rows:  # a wrapped cell's next line
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
    return tables


def collapsed(text: str) -> str:
    """``text`` as a run of words: borders and runs of spaces become one space."""
    return " " + " ".join(re.split(r"[\s│┃]+", text)).strip() + " "


def in_order(words: list[str], tokens: list[str]) -> bool:
    """Whether ``words`` are whole tokens of ``tokens``, in this order (others may come between: the cells of
    other columns on the lines a wrapped middle column spans)."""
    it = iter(tokens)
    return all(any(w == t for t in it) for w in words)


def squeezed(text: str) -> str:
    """``text`` without borders and whitespace (to find a word folded over several lines)."""
    return re.sub(r"[\s│┃]+", "", text)


def record(text: str, name: str) -> str | None:
    """The lines ``text`` shows for the row headed ``name``: the line that starts with it (after a border) and
    the lines that continue it (a wrapped cell, or the indented lines of a vertical block)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = line[1:].lstrip() if line.startswith("│") else line
        if head == name or head.startswith((f"{name} ", f"{name}│")):
            end = i + 1
            while end < len(lines) and re.match(r"^(│\s+│|\s)", lines[end]):
                end += 1
            return "\n".join(lines[i:end])
    return None


def find_row(text: str, name: str) -> str:
    """The record of module ``name``: under its full name, or under the rest of it after the printed prefix."""
    found = record(text, name)
    if found is not None:
        return found
    for prefix in PREFIX_NOTE.findall(text):
        if name.startswith(prefix) and (found := record(text, name[len(prefix) :])) is not None:
            return found
    raise AssertionError(f"no row for {name!r} in:\n{text}")


def check_shape(text: str, width: int) -> None:
    lines = text.splitlines()
    assert max(cell_len(line) for line in lines) <= width, text
    assert "…" not in text and "..." not in text.replace(" ...", ""), text  # no ellipsis but the list's own
    assert not [line for line in lines if line.endswith(" ")], text


def check_rows(narrow: str, reference: list[list[str]], width: int) -> None:
    """Every reference row (header first) is in ``narrow``, every cell whole, beside the row's first cell."""
    header, *rows = reference
    assert rows
    for row in rows:
        text = find_row(narrow, row[0])
        found = collapsed(text)
        for column, cell in zip(header[1:], row[1:], strict=True):
            if not cell:
                continue
            if max(len(w) for w in cell.split()) > width - 4:  # a word wider than the screen (a long URL) folds
                assert squeezed(cell) in squeezed(text), f"{width} columns: {column}={cell!r} of {row[0]} lost"
                continue
            whole = collapsed(cell) in found or in_order(cell.split(), found.split())  # a middle column wrapped
            assert whole, f"{width} columns: {column}={cell!r} of {row[0]} not in {found!r}"


# ------------------------------------------------------------------------------------------------ tests


def _reference(args: list[str], count: int) -> list[list[list[str]]]:
    wide = cli(1000, *args).stdout
    tables = boxed_tables(wide)
    assert len(tables) == count, wide
    return tables


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_modules_table(demo: dict[str, Path], width: int) -> None:
    args = ["inspect", str(demo["adapter"]), "--modules", "--no-hash"]
    [table] = _reference(args, 1)
    report = ah.inspect(demo["adapter"], modules=True, sha256=False)
    assert report.modules is not None
    assert [r[0] for r in table[1:]] == [m.name for m in report.modules]
    assert [r[1] for r in table[1:]] == [f"{m.d_out} x {m.d_in}" for m in report.modules]
    assert [int(r[2]) for r in table[1:]] == [m.rank for m in report.modules]
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    check_rows(narrow, table, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_spectrum_table(demo: dict[str, Path], width: int) -> None:
    args = ["inspect", str(demo["adapter"]), "--spectrum", "--no-hash"]
    [table] = _reference(args, 1)
    report = ah.inspect(demo["adapter"], spectrum=True, sha256=False)
    assert report.spectrum is not None
    for row, s in zip(table[1:], report.spectrum, strict=True):
        assert row[0] == s.name
        assert float(row[1]) == pytest.approx(s.fro_norm, rel=1e-3)
        shown = [float(x) for x in row[4].removesuffix("...").split(",")]
        assert shown == pytest.approx(s.singular_values[:4], rel=1e-2)
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    check_rows(narrow, table, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_diff_tables(demo: dict[str, Path], width: int) -> None:
    args = ["diff", str(demo["adapter"]), str(demo["reduced"])]
    config, modules = _reference(args, 2)
    doc = json.loads(cli(1000, *args, "--json").stdout)
    assert [r[0] for r in modules[1:]] == [m["name"] for m in doc["modules"]]
    for row, m in zip(modules[1:], doc["modules"], strict=True):
        assert row[1] == f"{m['rank_a']}/{m['rank_b']}"
        assert float(row[4]) == pytest.approx(m["cosine"], abs=1e-6)
        assert float(row[5]) == pytest.approx(m["rel_distance"], rel=1e-3)
    assert {r[0] for r in config[1:]} == {c["key"] for c in doc["config_changes"]}
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    check_rows(narrow, modules, width)
    check_rows(narrow, config, width)


def _writer(name: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return {
        "reduce": lambda d, o: ["reduce", str(d["adapter"]), "--energy", "0.9", "-o", str(o), "--overwrite"],
        "combine": lambda d, o: [
            "combine",
            str(d["adapter"]),
            str(d["reduced"]),
            "--weights",
            "1,-1",
            "--method",
            "svd",
            "--rank",
            "2",
            "-o",
            str(o),
            "--overwrite",
        ],
        "quantize": lambda d, o: ["quantize", str(d["adapter"]), "--to", "int8", "-o", str(o), "--overwrite"],
    }[name]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", ["reduce", "combine", "quantize"])
def test_writer_tables(demo: dict[str, Path], tmp_path: Path, command: str, width: int) -> None:
    args = _writer(command)(demo, tmp_path / "out")
    [table] = _reference(args, 1)
    doc = json.loads(cli(1000, *args, "--json").stdout)
    assert [r[0] for r in table[1:]] == [m["name"] for m in doc["modules"]]
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    check_rows(narrow, table, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_validate_findings_table(
    demo: dict[str, Path], llama_base_wide: Path, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base of another hidden size: one finding per module, the module in the third column, and a finding
    without a module (the declared base differs), headed by its severity in the vertical layout."""
    monkeypatch.chdir(llama_base_wide.parent)  # a short --base: the message quotes it, and it must fit 60 columns
    args = ["validate", str(demo["adapter"]), "--base", llama_base_wide.name]
    [table] = _reference(args, 1)
    header = table[0]
    module = header.index("module")
    doc = json.loads(cli(1000, *args, "--json").stdout)
    named = {f["module"] for f in doc["findings"] if f.get("module")}
    assert named and named <= {r[module] for r in table[1:]}
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    for row in table[1:]:
        found = collapsed(narrow)
        assert all(collapsed(cell) in found for cell in row if cell), (row, narrow)


@pytest.mark.parametrize("width", WIDTHS)
def test_plugins_tables(width: int) -> None:
    tables = _reference(["plugins"], 4)
    narrow = cli(width, "plugins").stdout
    check_shape(narrow, width)
    for table in tables:
        check_rows(narrow, table, width)


def test_the_layouts_in_turn(demo: dict[str, Path]) -> None:
    """Wide: a boxed table with full names; narrower: borderless, then the common prefix printed once, then one
    block per module with its name on a line of its own."""
    args = ["inspect", str(demo["adapter"]), "--modules", "--no-hash"]
    name = "model.layers.0.self_attn.q_proj"
    boxed = cli(120, *args).stdout
    assert f"│ {name} │" in boxed and not PREFIX_NOTE.search(boxed)
    plain = cli(80, *args).stdout
    assert re.search(rf"^{re.escape(name)}  +64 x 64  +8  +16  +2  +F32$", plain, re.MULTILINE), plain
    narrow = cli(60, *args).stdout
    assert re.search(rf"^{re.escape(name)}\n  d_out x d_in  64 x 64\n  r  +8\n", narrow, re.MULTILINE), narrow
    shared = cli(74, *args).stdout
    assert PREFIX_NOTE.findall(shared) == ["model.layers."], shared
    assert "│ 0.self_attn.q_proj │ 64 x 64" in shared


def test_a_name_wider_than_the_screen_folds_only_in_the_vertical_layout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one cut left: a single word wider than the terminal, folded onto the next lines (nothing dropped)."""
    from adapterhub_cli.cli._output import Output

    monkeypatch.setenv("COLUMNS", "40")
    o = Output()
    long = "model." + ".".join(f"block_{i}" for i in range(12)) + ".q_proj"
    t = o.table("t", "module", "r")
    t.add_row(long, "8")
    t.add_row("model.other", "16")
    o.print(t)
    text = capsys.readouterr().out
    check_shape(text, 40)
    assert long in "".join(text.splitlines()), text
    assert re.search(r"^model\.other\n  r  16$", text, re.MULTILINE), text


def _every_command(d: dict[str, Path], o: Path) -> dict[str, list[str]]:
    a, base = str(d["adapter"]), str(d["base"])
    return {
        "inspect": ["inspect", a],
        "inspect-all": ["inspect", a, "--modules", "--spectrum"],
        "validate": ["validate", a, "--base", base],
        "diff": ["diff", a, str(d["reduced"])],
        "reduce": ["reduce", a, "--rank", "4", "-o", str(o / "reduced"), "--overwrite"],
        "combine": ["combine", a, str(d["reduced"]), "-o", str(o / "combined"), "--overwrite"],
        "quantize": ["quantize", a, "--to", "fp8", "-o", str(o / "fp8"), "--overwrite"],
        "dequantize": ["dequantize", str(d["int8"]), "-o", str(o / "deq"), "--overwrite"],
        "convert": ["convert", a, "--to", "gguf", "--base", base, "-o", str(o / "a.gguf"), "--overwrite"],
        "merge": ["merge", a, "--into", base, "-o", str(o / "merged"), "--overwrite"],
        "unmerge": ["unmerge", a, "--from", str(o / "merged"), "-o", str(o / "unmerged"), "--overwrite"],
        "plugins": ["plugins"],
    }


@pytest.mark.parametrize("width", [60, 200])
def test_no_plain_output_ends_lines_in_spaces(demo: dict[str, Path], tmp_path: Path, width: int) -> None:
    """Every command's plain output on the demo's files (stdout and stderr): no line ends in spaces (key-value
    blocks and borderless tables used to pad every line to the widest value), none is wider than the terminal."""
    for name, args in _every_command(demo, tmp_path).items():
        res = CliRunner().invoke(build_cli(), args, env={"COLUMNS": str(width)})
        assert res.exit_code == 0, (name, res.output)
        assert res.stdout.strip(), name
        for stream in (res.stdout, res.stderr):
            padded = [line for line in stream.splitlines() if line != line.rstrip()]
            assert padded == [], (name, padded)
        assert max(cell_len(line) for line in res.stdout.splitlines()) <= width, (name, res.stdout)


# ------------------------------------------------------------------------------------------ progress bars

_PROGRESS = """
import time
from adapterhub_cli.cli._output import out
with out.progress("crunching numbers") as update:
    for i in range(1, 4):
        update(i, 3)
        time.sleep(0.3)
print("done")
"""


def _run_progress(stdout_tty: bool, stderr_tty: bool, **env: str) -> tuple[str, str]:
    """Run a command that shows progress with stdout and stderr each a terminal (a pty) or a pipe; what each got."""
    import os
    import pty
    import subprocess
    import sys

    ends: dict[str, tuple[int, int]] = {}
    for name, tty in (("out", stdout_tty), ("err", stderr_tty)):
        ends[name] = pty.openpty() if tty else os.pipe()
    child_env = {k: v for k, v in os.environ.items() if k not in ("TERM", "NO_COLOR", "COLUMNS", "FORCE_COLOR")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROGRESS],
        stdin=subprocess.DEVNULL,
        stdout=ends["out"][1],
        stderr=ends["err"][1],
        env={**child_env, "TERM": "xterm-256color", **env},
    )
    for _, write_end in ends.values():
        os.close(write_end)
    got = {}
    for name, (read_end, _) in ends.items():
        chunks = []
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:  # a pty's reader gets EIO once the child has gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        got[name] = b"".join(chunks).decode("utf-8", "replace")
    assert proc.wait(timeout=120) == 0, got
    return got["out"], got["err"]


def test_progress_shows_on_terminals_only() -> None:
    out, err = _run_progress(True, True)
    assert "done" in out and "crunching numbers" in err  # both streams terminals: the bar is drawn (then cleared)
    out, err = _run_progress(False, True)
    assert out == "done\n" and "crunching" not in err  # stdout piped (| tee log): no bar
    out, err = _run_progress(True, False, FORCE_COLOR="1")
    assert "done" in out and err == ""  # stderr to a file or CI log, even with FORCE_COLOR: no bar
    out, err = _run_progress(False, False, FORCE_COLOR="1")
    assert out == "done\n" and err == ""


# ----------------------------------------------------------------------------------------- help texts


def _help(command: str) -> str:
    res = CliRunner().invoke(build_cli(), [command, "--help"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, res.output
    return " ".join(res.stdout.split())


def test_inspect_help_names_every_column_it_shows(demo: dict[str, Path]) -> None:
    """``--modules`` and ``--spectrum`` help name each column of the tables they add (read from the tables)."""
    text = _help("inspect")
    modules_help = text.split("--modules", 1)[1].split("--spectrum", 1)[0]
    [table] = _reference(["inspect", str(demo["adapter"]), "--modules", "--no-hash"], 1)
    header = table[0]
    assert header[0] == "module" and "name" in modules_help
    assert [h for h in header[1:] if h not in modules_help] == []
    spectrum_help = text.split("--spectrum", 1)[1].split("--no-hash", 1)[0]
    [table] = _reference(["inspect", str(demo["adapter"]), "--spectrum", "--no-hash"], 1)
    assert [h for h in table[0][1:] if h.removeprefix("top ") not in spectrum_help] == []
    assert "ADAPTER" in text and "store ref" in text


def test_diff_help_names_every_column_and_the_verdicts(demo: dict[str, Path]) -> None:
    text = _help("diff")
    config, modules = _reference(["diff", str(demo["adapter"]), str(demo["reduced"])], 2)
    assert config[0] == ["key", "A", "B"] and "config" in text
    assert [h for h in modules[0][1:] if h not in text] == []
    doc = json.loads(cli(1000, "diff", str(demo["adapter"]), str(demo["reduced"]), "--json").stdout)
    assert doc["verdict"] in text
    assert all(v in text for v in ("identical", "scaled copy", "different"))
    assert "--top" in text and "--exit-code" in text and "--base" in text and "--token" in text


@pytest.fixture(scope="module")
def registry(demo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local (file://) registry holding two versions of the demo adapter."""
    root = tmp_path_factory.mktemp("registry")
    repo = f"{root.as_uri()}/org/demo"
    for version in ("1.0.0", "1.1.0"):
        res = CliRunner().invoke(
            build_cli(), ["push", str(demo["adapter"]), repo, "--version", version, "-m", f"release {version} of it"]
        )
        assert res.exit_code == 0, res.output
    return repo


@pytest.mark.parametrize("width", WIDTHS)
def test_store_tables(registry: str, tmp_path: Path, width: int) -> None:
    """`versions` (tag, commit, date, message) and `pull` (file, sha256)."""
    [versions] = _reference(["versions", registry], 1)
    doc = json.loads(cli(1000, "versions", registry, "--json").stdout)
    assert sorted(r[0] for r in versions[1:]) == sorted(v["tag"] for v in doc) == ["v1.0.0", "v1.1.0"]
    narrow = cli(width, "versions", registry).stdout
    check_shape(narrow, width)
    check_rows(narrow, versions, width)
    args = ["pull", f"{registry}@v1.1.0", "-o", str(tmp_path / "pulled"), "--overwrite"]
    [files] = _reference(args, 1)
    doc = json.loads(cli(1000, *args, "--json").stdout)
    assert {r[0]: r[1] for r in files[1:]} == doc["files"]
    narrow = cli(width, *args).stdout
    check_shape(narrow, width)
    check_rows(narrow, files, width)
