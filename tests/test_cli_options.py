"""A command line that keeps its word: one shared definition of ``--token``, ``--base`` and ``-o`` on every command
that needs them, flags that would be ignored refused through click's usage path, error text that names CLI options
only, help that says what is required and is never cut, and shell completion.

Hub cases run against the local Hub-compatible server (tests/hub_server.py) on 127.0.0.1.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import fixtures_diffusion as fd
import pytest
import torch
from cli_helpers import run_cli
from click.testing import Result
from hub_server import serving

import adapterhub_cli as ah
from adapterhub_cli.cli.main import build_cli


TOKEN = "hf_private_token_for_options_5b2c"
#: every command that can reach a store (a Hub ref as an adapter, a base or a target)
HUB_COMMANDS = [
    "inspect",
    "validate",
    "diff",
    "reduce",
    "combine",
    "quantize",
    "dequantize",
    "convert",
    "merge",
    "unmerge",
    "push",
    "pull",
    "versions",
    "extract",
    "analyze",
]
#: every command that reads adapters (merge and unmerge map names through --into / --from)
BASE_COMMANDS = ["inspect", "diff", "reduce", "combine", "quantize", "dequantize", "convert"]

# huggingface_hub's LFS upload passes data= to httpx2, which deprecates it; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def _option(command: str, name: str) -> click.Option | None:
    cmd = build_cli().commands[command]
    found = [p for p in cmd.params if isinstance(p, click.Option) and name in p.opts]
    return found[0] if found else None


def _usage_error(result: Result, command: str) -> str:
    """Check ``result`` took click's usage path (usage line, one ``Error:``, exit 2, no traceback hint); the
    message, unwrapped."""
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith(f"Usage: cli {command} "), err
    assert "ADAPTERS_DEBUG" not in err and "Traceback" not in err
    assert sum(line.startswith("Error: ") for line in err.splitlines()) == 1, err
    return " ".join(err.split("Error: ", 1)[1].split())


# ----------------------------------------------------------------------------------------- uniform options


def test_token_is_one_option_on_every_command_that_reaches_a_store() -> None:
    options = {c: _option(c, "--token") for c in HUB_COMMANDS}
    assert [c for c, o in options.items() if o is None] == []
    helps = {(o.help, o.metavar, o.default) for o in options.values() if o is not None}
    assert len(helps) == 1, helps  # one shared definition


def test_base_is_one_option_on_every_command_that_reads_adapters() -> None:
    options = {c: _option(c, "--base") for c in BASE_COMMANDS}
    assert [c for c, o in options.items() if o is None] == []
    helps = {(o.help, o.metavar, o.required) for o in options.values() if o is not None}
    assert len(helps) == 1, helps
    assert "kohya" in next(iter(helps))[0]
    validate_base = _option("validate", "--base")
    assert validate_base is not None and validate_base.required  # the base it checks against


def test_output_metavar_is_out_everywhere() -> None:
    cli = build_cli()
    with_o = {}
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and "-o" in p.opts:
                with_o[name] = p
    assert {"reduce", "combine", "convert", "quantize", "dequantize", "merge", "unmerge", "pull"} <= set(with_o)
    for name, p in with_o.items():
        assert p.metavar == "OUT", name
        assert "-o, --output OUT" in run_cli(name, "--help").output, name


def test_a_private_repo_needs_the_token_on_every_reading_command(
    monkeypatch: pytest.MonkeyPatch, llama_lora: Path, llama_base: Path, tmp_path: Path
) -> None:
    with serving(monkeypatch, tokens={TOKEN}, token=None):
        ah.push(llama_lora, "org/secret", version="1.0.0", private=True, token=TOKEN)
        ref = "org/secret@v1.0.0"
        cases = {
            "inspect": ["inspect", ref, "--json"],
            "validate": ["validate", ref, "--base", llama_base],
            "diff": ["diff", ref, llama_lora, "--json"],
            "reduce": ["reduce", ref, "--rank", "2", "-o", tmp_path / "reduced"],
            "combine": ["combine", ref, llama_lora, "--weights", "1,-1", "-o", tmp_path / "combined"],
            "quantize": ["quantize", ref, "--to", "int8", "-o", tmp_path / "int8"],
            "convert": ["convert", ref, "--to", "peft", "-o", tmp_path / "converted"],
            "merge": ["merge", ref, "--into", llama_base, "-o", tmp_path / "merged"],
        }
        for name, args in cases.items():
            refused = run_cli(*args)
            assert refused.exit_code == 2, (name, refused.output)
            assert "org/secret" in refused.stderr and "--token" in refused.stderr, (name, refused.stderr)
            assert "Traceback" not in refused.output
            allowed = run_cli(*args, "--token", TOKEN)
            assert allowed.exit_code == 0, (name, allowed.output)
            assert TOKEN not in allowed.output + refused.output
        assert json.loads(run_cli(*cases["diff"], "--token", TOKEN).stdout)["verdict"] == "identical"
        # a private base too: validate and merge read it with the same --token
        ah.push(llama_base, "org/base", version="1.0.0", private=True, force=True, token=TOKEN)
        for args in (
            ["validate", llama_lora, "--base", "org/base@v1.0.0"],
            ["merge", llama_lora, "--into", "org/base@v1.0.0", "-o", tmp_path / "merged-hub"],
        ):
            refused = run_cli(*args)
            assert refused.exit_code == 2 and "org/base" in refused.stderr, refused.output
            allowed = run_cli(*args, "--token", TOKEN)
            assert allowed.exit_code == 0, allowed.output
        combined = run_cli(*cases["combine"], "--token", TOKEN, "--overwrite")
        assert "zero" in combined.stderr  # the private copy minus the local one: the same adapter
        assert ah.load(tmp_path / "reduced").config.r == 2
        # the API takes the same token= keyword
        assert ah.inspect(ref, token=TOKEN).num_modules == len(ah.load(llama_lora).modules)
        with pytest.raises(ah.HubNotFoundError):
            ah.diff(ref, llama_lora)
        assert ah.diff(ref, llama_lora, token=TOKEN).verdict == "identical"


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny SD base and a kohya LoRA for it that this tool did not write (its names need the base)."""
    root = tmp_path_factory.mktemp("kohya")
    base = fd.build_tiny_sd(root / "tiny-sd")
    path = root / "k.safetensors"
    return base, path, fd.make_kohya(path, base, dtype=torch.float32)


def test_base_maps_a_kohya_file_for_reduce_and_diff(
    kohya_file: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    base, path, state = kohya_file
    unmapped = run_cli("reduce", path, "--rank", "1", "-o", tmp_path / "r")
    assert unmapped.exit_code == 2 and "--base" in unmapped.stderr and not (tmp_path / "r").exists()
    res = run_cli("reduce", path, "--rank", "1", "-o", tmp_path / "r", "--base", base, "--json")
    assert res.exit_code == 0, res.output
    reduced = ah.load(tmp_path / "r")
    assert all(m.rank == 1 for m in reduced.modules.values())
    assert set(reduced.modules) == {m for m, _ in fd.SD_TARGETS}
    for module, _ in fd.SD_TARGETS:  # each module is the best rank-1 approximation of the kohya update
        dense = fd.dense_reference(state, fd.kohya_name(module))  # (d_out, d_in * kh * kw), float64
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        f = reduced.factors(module)
        got = f.scale * (f.B.double() @ f.A.double())
        torch.testing.assert_close(got, s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-5)
    same = run_cli("diff", path, path, "--base", base, "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["verdict"] == "identical"
    assert ah.diff(path, tmp_path / "r", base=base).verdict == "different"


def test_merge_maps_a_kohya_adapter_through_into(
    kohya_file: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """--into is the base the names are mapped through: no --base, no ADAPTERS_BASE needed."""
    from safetensors.torch import load_file

    base, _, _ = kohya_file
    unet = base / "unet"
    targets = [(m, r) for m, r in fd.SD_TARGETS if m.startswith("unet.")]
    path = tmp_path / "k.safetensors"
    state = fd.make_kohya(path, base, targets, dtype=torch.float32)
    assert run_cli("validate", path, "--base", unet).exit_code == 0
    res = run_cli("merge", path, "--into", unet, "-o", tmp_path / "merged", "--json")
    assert res.exit_code == 0, res.output
    before = load_file(unet / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    for module, _ in targets:
        key = module.removeprefix("unet.") + ".weight"
        want = before[key].double() + fd.dense_reference(state, fd.kohya_name(module)).reshape(before[key].shape)
        torch.testing.assert_close(after[key].double(), want, rtol=0, atol=1e-6)


def test_convert_writes_a_legacy_pickle_as_safetensors_with_allow_pickle(llama_lora: Path, tmp_path: Path) -> None:
    """What validate's vllm-unexpected-module finding tells a user to run."""
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((llama_lora / "adapter_config.json").read_bytes())
    torch.save(load_file(llama_lora / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    refused = run_cli("convert", pickled, "--to", "peft", "-o", tmp_path / "out")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr and not (tmp_path / "out").exists()
    res = run_cli("convert", pickled, "--to", "peft", "--allow-pickle", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    want, got = (
        load_file(llama_lora / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------ flags that would be ignored


def test_reduce_refuses_a_rank_that_reduces_nothing_and_a_max_rank_it_would_ignore(
    llama_lora: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = max(m.rank for m in ah.load(llama_lora).modules.values())
    message = _usage_error(run_cli("reduce", llama_lora, "--rank", r * 2, "-o", out), "reduce")
    assert f"--rank {r * 2} is not below" in message and f"the largest is {r}" in message
    with pytest.raises(ah.UsageError, match="nothing would be reduced"):
        ah.reduce(llama_lora, out, rank=r)
    message = _usage_error(run_cli("reduce", llama_lora, "--rank", "4", "--max-rank", "2", "-o", out), "reduce")
    assert "--max-rank" in message and "--rank 4" in message and "no effect" in message
    message = _usage_error(run_cli("reduce", llama_lora, "-o", out), "reduce")
    assert "exactly one of --rank, --energy, --sv-ratio, --sv-fro" in message
    message = _usage_error(run_cli("reduce", llama_lora, "--rank", "2", "--energy", "0.9", "-o", out), "reduce")
    assert "(got --rank, --energy)" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--method", "cat", "--rank", "2"], "--rank"),
        (["--method", "cat", "--density", "0.5"], "--density"),
        (["--method", "svd", "--density", "0.5"], "--density"),
        (["--method", "ties", "--density", "0.5", "--seed", "3"], "--seed"),
        (["--method", "cat", "--seed", "3"], "--seed"),
    ],
)
def test_combine_refuses_options_the_method_ignores(
    args: list[str], option: str, llama_lora: Path, llama_rslora: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    message = _usage_error(run_cli("combine", llama_lora, llama_rslora, *args, "-o", out), "combine")
    method = args[1]
    assert message.startswith(f"{option} has no effect with --method {method}"), message
    assert not out.exists()
    kwargs = {"rank": 2} if option == "--rank" else {"density": 0.5} if option == "--density" else {"seed": 3}
    if method == "ties":
        kwargs["density"] = 0.5
    with pytest.raises(ah.UsageError, match=f"{option} has no effect"):
        ah.combine([llama_lora, llama_rslora], out, method=method, **kwargs)


def test_validate_refuses_vllm_options_without_the_vllm_target(llama_lora: Path, llama_base: Path) -> None:
    for args in (
        ["--max-lora-rank", "32"],
        ["--lora-target-modules", "q_proj"],
        ["--target", "gguf", "--max-lora-rank", "8"],
    ):
        message = _usage_error(run_cli("validate", llama_lora, "--base", llama_base, *args), "validate")
        assert message.startswith(f"{args[-2]} applies to --target vllm only"), message
    with pytest.raises(ah.UsageError, match="--max-lora-rank applies to --target vllm only"):
        ah.validate(llama_lora, base=llama_base, max_lora_rank=32)
    assert (
        run_cli("validate", llama_lora, "--base", llama_base, "--target", "vllm", "--max-lora-rank", "32").exit_code
        == 0
    )


def test_combine_needs_what_the_method_requires(llama_lora: Path, llama_rslora: Path, tmp_path: Path) -> None:
    message = _usage_error(
        run_cli("combine", llama_lora, llama_rslora, "--method", "ties", "-o", tmp_path / "o"), "combine"
    )
    assert "--density is required for ties" in message


def test_a_wrong_weight_count_is_the_same_usage_error_in_combine_and_merge(
    llama_lora: Path, llama_rslora: Path, llama_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    combine = _usage_error(run_cli("combine", llama_lora, llama_rslora, "--weights", "1", "-o", out), "combine")
    merge = _usage_error(
        run_cli("merge", llama_lora, llama_rslora, "--into", llama_base, "--weights", "1", "-o", out), "merge"
    )
    unmerge = _usage_error(
        run_cli("unmerge", llama_lora, "--from", llama_base, "--weights", "1,2", "-o", out), "unmerge"
    )
    assert combine.startswith("--weights has 1 value(s) for 2 adapter(s)")
    assert merge.startswith("--weights has 1 value(s) for 2 adapter(s)")
    assert unmerge.startswith("--weights has 2 value(s) for 1 adapter(s)")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- error text


def test_known_errors_have_no_traceback_hint_and_unexpected_ones_do(
    llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = run_cli("inspect", tmp_path / "nope")
    assert missing.exit_code == 2 and missing.stderr.startswith("Error: adapter not found")
    assert "ADAPTERS_DEBUG" not in missing.stderr and "Usage:" not in missing.stderr
    exists = tmp_path / "exists"
    assert run_cli("reduce", llama_lora, "--rank", "2", "-o", exists).exit_code == 0
    again = run_cli("reduce", llama_lora, "--rank", "2", "-o", exists)
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "pass overwrite" not in again.stderr and "ADAPTERS_DEBUG" not in again.stderr

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(ah.api, "reduce", disk_full)
    failed = run_cli("reduce", llama_lora, "--rank", "2", "-o", tmp_path / "x")
    assert failed.exit_code == 2 and "No space left on device" in failed.stderr
    assert "(set ADAPTERS_DEBUG=1 to see the traceback)" in failed.stderr


_PYTHON_SPELLING = re.compile(r"\b(overwrite|force|allow_pickle|fold_tucker|fold_loha)=True\b")
_BARE_PASS = re.compile(r"\bpass (overwrite|force|allow_pickle|token|base)\b")


def test_messages_name_cli_options_not_python_arguments() -> None:
    """No message or hint in the package says ``overwrite=True`` or ``pass overwrite``: errors name options as the
    CLI spells them (errors.py states the rule)."""
    root = Path(ah.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if _PYTHON_SPELLING.search(node.value) or _BARE_PASS.search(node.value):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == []


# ---------------------------------------------------------------------------------------------------- help


def test_group_help_never_cuts_a_summary() -> None:
    cli = build_cli()
    res = run_cli("--help", env={"COLUMNS": "80"})
    assert res.exit_code == 0
    commands = res.output.split("Commands:", 1)[1]
    assert "..." not in commands
    flat = " ".join(commands.split())
    for name, cmd in cli.commands.items():
        summary = " ".join(cmd.get_short_help_str(limit=10_000).split())
        assert f"{name} {summary}" in flat, name
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_reduce_and_combine_help_say_what_is_required_and_the_defaults() -> None:
    reduce_help = " ".join(run_cli("reduce", "--help").output.split())
    assert "Give exactly one rule: --rank, --energy, --sv-ratio or --sv-fro" in reduce_help
    assert "--max-rank K Cap the rank --energy, --sv-ratio or --sv-fro may choose (not with --rank)" in reduce_help
    combine_help = " ".join(run_cli("combine", "--help").output.split())
    options = combine_help.split("Options:", 1)[1]
    density = options.split("--density FLOAT RANGE", 1)[1].split("--seed INTEGER", 1)[0]
    assert "Required by ties, dare_linear, dare_ties, magnitude_prune" in density and "[default: none]" in density
    seed = options.split("--seed INTEGER", 1)[1].split("--force", 1)[0]
    assert "dare_linear, dare_ties" in seed and "[default: 0]" in seed
    rank = options.split("--rank K", 1)[1].split("--density", 1)[0]
    assert "cat is exact" in rank and "linear, svd" in rank


def test_every_option_has_help() -> None:
    for name, cmd in build_cli().commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help",):
                assert (p.help or "").strip(), f"{name} {p.opts}"


# ----------------------------------------------------------------------------------------------- completion


def _complete(words: str, cword: int) -> list[str]:
    env = {
        **os.environ,
        "_ADAPTERS_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    code = "from adapterhub_cli.cli.main import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if "," in line]


def test_bash_completion_completes_commands_options_and_methods() -> None:
    script = subprocess.run(
        [sys.executable, "-c", "from adapterhub_cli.cli.main import main; main()"],
        env={**os.environ, "_ADAPTERS_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0 and "complete -o nosort -F _adapters_completion adapters" in script.stdout
    assert {"reduce", "validate", "versions"} <= set(_complete("adapters ", 1))
    assert _complete("adapters re", 1) == ["reduce"]
    assert "--rank" in _complete("adapters reduce --r", 2)
    assert {"--token", "--base"} <= set(_complete("adapters diff --", 2))
    assert _complete("adapters combine --method dare", 3) == ["dare_linear", "dare_ties"]
    # paths (adapters, bases, outputs) are left to the shell's file completion: one "file" item, the typed prefix
    paths = [("adapters reduce ada", 2), ("adapters merge a --into ba", 4), ("adapters reduce a -o ou", 4)]
    for words, cword in paths:
        env = {**os.environ, "_ADAPTERS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        proc = subprocess.run(
            [sys.executable, "-c", "from adapterhub_cli.cli.main import main; main()"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.split() == [f"file,{words.split()[-1]}"], (words, proc.stdout)


# ------------------------------------------------------------------------------------------------- packaging


def test_the_license_is_an_spdx_string_that_setuptools_reads_without_a_warning() -> None:
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table
    assert all((root / name).is_file() for name in project["license-files"])
    assert "Apache License" in (root / "LICENSE").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # setuptools' deprecation of the table form is a warning
        dist = apply_configuration(Distribution(), root / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


# ----------------------------------------------------------------------------------------------- fast exit

_CONSOLE = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from pathlib import Path
    marker = Path(sys.argv.pop(1))
    mode = sys.argv.pop(1)
    atexit.register(lambda: marker.with_suffix(".atexit").write_text("ran"))

    class Teardown:  # destroyed by the interpreter's teardown, which the fast exit skips
        def __del__(self):
            marker.with_suffix(".teardown").write_text("ran")

    keep = Teardown()
    if mode == "cstdio":  # native code's output, still in the C library's buffer (stdout is a pipe)
        import ctypes
        ctypes.CDLL(None).printf(b"printed by C\\n")
    if mode == "thread":  # a worker thread still running: the orderly exit waits for it, and so must we
        threading.Thread(target=lambda: (time.sleep(1), marker.with_suffix(".thread").write_text("done"))).start()
    from adapterhub_cli.cli.main import console_main
    sys.argv[0] = "adapters"
    console_main()
    marker.with_suffix(".returned").write_text("console_main returned")
    """
)


def _console(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (the C streams keep their buffers)
    return subprocess.run(
        [sys.executable, "-c", _CONSOLE, str(tmp_path / "m"), mode, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_the_installed_command_exits_with_the_status_after_atexit_and_flushed_output(
    tmp_path: Path, llama_lora: Path
) -> None:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"adapters": "adapterhub_cli.cli.main:console_main"}
    # a whole JSON report through a pipe (flushed before the process ends), status 0, atexit handlers run
    proc = _console(tmp_path, "plain", "inspect", str(llama_lora), "--json", "--modules")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modules"]
    assert (tmp_path / "m.atexit").read_text() == "ran"
    assert not (tmp_path / "m.returned").exists()  # the process ended inside console_main,
    assert not (tmp_path / "m.teardown").exists()  # without the interpreter's teardown
    # an error keeps its status and message
    (tmp_path / "m.atexit").unlink()
    proc = _console(tmp_path, "plain", "inspect", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "adapter not found" in proc.stderr
    assert (tmp_path / "m.atexit").read_text() == "ran"


def test_the_installed_command_waits_for_a_running_thread_like_an_orderly_exit(tmp_path: Path) -> None:
    proc = _console(tmp_path, "thread", "--version")
    assert proc.returncode == 0 and "version" in proc.stdout, proc.stderr
    assert (tmp_path / "m.thread").read_text() == "done"  # not cut off by the fast exit
    assert (tmp_path / "m.atexit").read_text() == "ran"


def test_the_installed_command_flushes_what_native_code_printed(tmp_path: Path) -> None:
    proc = _console(tmp_path, "cstdio", "--version")
    assert proc.returncode == 0, proc.stderr
    assert "printed by C" in proc.stdout and "version" in proc.stdout
    assert not (tmp_path / "m.teardown").exists()  # (the fast exit was taken)
