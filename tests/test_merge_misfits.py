"""Merges the engine cannot do exactly are refused while planning: a clear error, exit status 2, and nothing on
disk (no output folder, no ``.incomplete`` temporary folder). The adapters are real PEFT DoRA adapters: one on the
tiny llama (unmerging it cannot be undone exactly) and one on a tiny Conv2d net (DoRA on a convolution)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from cli_helpers import status_and_output as cli
from test_merge_conv import build_conv_case

import adapterhub_cli as ah
from adapterhub_cli.errors import UsageError


ENGINE = importlib.import_module("adapterhub_cli.merge.engine")


@pytest.fixture(scope="module")
def conv_dora_case(tmp_path_factory):
    return build_conv_case(tmp_path_factory.mktemp("conv_dora"), use_dora=True)


@pytest.fixture(scope="module")
def dora_merged(llama_base, llama_dora, tmp_path_factory) -> Path:
    """The tiny llama with the DoRA adapter merged into it (what an unmerge would start from)."""
    return ah.merge(llama_dora, base=llama_base, out=tmp_path_factory.mktemp("dora") / "merged").path


@pytest.fixture
def no_output_folder(monkeypatch):
    """Fails the test if the merge gets as far as creating its temporary output folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the merge created its output folder before refusing")

    monkeypatch.setattr(ENGINE, "atomic_dir", refuse)


def assert_nothing_written(work: Path) -> None:
    assert sorted(p.name for p in work.iterdir()) == []  # neither the output nor a .<name>.*.incomplete folder


def test_conv_dora_merge_is_refused_before_anything_is_written(conv_dora_case, tmp_path, no_output_folder):
    base, adapter = conv_dora_case
    with pytest.raises(UsageError, match="DoRA on convolutions cannot be merged") as raised:
        ah.merge(adapter, base=base, out=tmp_path / "merged")
    assert "conv_in" in str(raised.value) and raised.value.hint
    assert_nothing_written(tmp_path)


def test_conv_dora_merge_through_the_cli_exits_2(conv_dora_case, tmp_path):
    base, adapter = conv_dora_case
    work = tmp_path / "work"
    work.mkdir()
    code, output = cli("merge", adapter, "--into", base, "-o", work / "merged")
    assert code == 2, output
    assert "DoRA on convolutions" in output and "Traceback" not in output
    assert_nothing_written(work)


def test_dora_unmerge_is_refused_before_anything_is_written(dora_merged, llama_dora, tmp_path, no_output_folder):
    with pytest.raises(UsageError, match="DoRA merges cannot be undone") as raised:
        ah.unmerge(llama_dora, merged=dora_merged, out=tmp_path / "back")
    assert raised.value.hint and "original base" in raised.value.hint
    assert_nothing_written(tmp_path)


def test_dora_unmerge_among_plain_loras_is_refused(dora_merged, llama_lora, llama_dora, tmp_path, no_output_folder):
    with pytest.raises(UsageError, match="DoRA merges cannot be undone"):
        ah.unmerge([llama_lora, llama_dora], merged=dora_merged, out=tmp_path / "back")
    assert_nothing_written(tmp_path)


def test_dora_unmerge_through_the_cli_exits_2(dora_merged, llama_dora, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    code, output = cli("unmerge", llama_dora, "--from", dora_merged, "-o", work / "back")
    assert code == 2, output
    assert "DoRA merges cannot be undone" in output and "Traceback" not in output
    assert_nothing_written(work)
