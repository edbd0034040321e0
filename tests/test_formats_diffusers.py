"""diffusers LoRA files -> PEFT: component prefixes removed, one PEFT adapter per component, and PEFT's own
loading of the result on that component gives the same outputs as diffusers' ``load_lora_weights``."""

from __future__ import annotations

from pathlib import Path

import fixtures_diffusion as fd
import pytest
import torch

import adapterhub_cli as ah
from adapterhub_cli.formats import get_writer
from adapterhub_cli.formats.diffusers import split_components, write_peft_components


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fd.build_tiny_sd(tmp_path_factory.mktemp("diffusion") / "tiny-sd")


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    enc = torch.randn(1, 5, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return unet(x, torch.tensor([3]), encoder_hidden_states=enc).sample  # type: ignore[no-any-return]


def _te_output(te: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state  # type: ignore[no-any-return]


def _diffusers_loaded(sd_base: Path, lora: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' own loading (``load_lora_weights``) of ``lora`` into the tiny pipeline's UNet and text encoder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(sd_base / "unet").double().eval()
    te = CLIPTextModel.from_pretrained(sd_base / "text_encoder").double().eval()
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(lora, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=meta)
    if any(k.startswith("text_encoder.") for k in state):
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, te, metadata=meta)
    return unet, te


def _peft_unet(sd_base: Path, adapter: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    unet = UNet2DConditionModel.from_pretrained(sd_base / "unet").double().eval()
    return PeftModel.from_pretrained(unet, adapter).eval()


def test_diffusers_file_converts_to_a_peft_adapter_of_the_unet(sd_base: Path, tmp_path: Path) -> None:
    """A file written by diffusers' save_lora_weights -> PEFT: names lose ``unet.``, ranks / alphas resolve per
    module, and PeftModel on the UNet gives the output diffusers' own loader gives."""
    src = fd.save_diffusers_lora(sd_base, tmp_path / "d")
    a = ah.load(src)
    assert all(n.startswith("unet.") for n in a.modules)
    out = write_peft_components(a, tmp_path / "p", get_writer("peft").write)
    p = ah.load(out)
    assert sorted(p.modules) == sorted(n.removeprefix("unet.") for n in a.modules)
    for name, m in a.modules.items():
        q = p.modules[name.removeprefix("unet.")]
        assert (q.rank, q.alpha, q.scale, q.kind) == (m.rank, m.alpha, m.scale, m.kind)
        fa, fq = a.factors(name), p.factors(q.name)
        assert torch.equal(fa.A, fq.A) and torch.equal(fa.B, fq.B)
    theirs, _ = _diffusers_loaded(sd_base, src)
    ours = _peft_unet(sd_base, out)
    assert not torch.equal(_unet_output(ours), _unet_output(_peft_unet_free(sd_base)))  # the adapter acts
    torch.testing.assert_close(_unet_output(ours), _unet_output(theirs), rtol=0, atol=1e-10)


def _peft_unet_free(sd_base: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(sd_base / "unet").double().eval()


def test_unet_and_text_encoder_give_one_peft_adapter_each(sd_base: Path, tmp_path: Path) -> None:
    """unet + text_encoder in one diffusers file -> OUT/unet and OUT/text_encoder, each loaded by PeftModel on
    its component with diffusers' outputs."""
    from peft import PeftModel
    from transformers import CLIPTextModel

    src = fd.save_diffusers_lora(sd_base, tmp_path / "d", text_encoder=True)
    a = ah.load(src)
    parts = split_components(a)
    assert sorted(parts) == ["text_encoder", "unet"]
    out = write_peft_components(a, tmp_path / "p", get_writer("peft").write)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["text_encoder", "unet"]
    theirs_unet, theirs_te = _diffusers_loaded(sd_base, src)
    torch.testing.assert_close(
        _unet_output(_peft_unet(sd_base, out / "unet")), _unet_output(theirs_unet), rtol=0, atol=1e-10
    )
    te = CLIPTextModel.from_pretrained(sd_base / "text_encoder").double().eval()
    base_out = _te_output(te)
    ours_te = PeftModel.from_pretrained(te, out / "text_encoder").eval()
    assert not torch.equal(_te_output(ours_te), base_out)
    torch.testing.assert_close(_te_output(ours_te), _te_output(theirs_te), rtol=0, atol=1e-10)
    te_mods = ah.load(out / "text_encoder").modules
    assert len(te_mods) == 2 and not any(n.startswith("text_encoder.") for n in te_mods)


def test_convert_cli_writes_one_peft_adapter_per_component(sd_base: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterhub_cli.cli.main import build_cli

    src = fd.save_diffusers_lora(sd_base, tmp_path / "d", text_encoder=True)
    r = CliRunner().invoke(build_cli(), ["convert", str(src), "--to", "peft", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    for comp in ("unet", "text_encoder"):
        assert not any(n.startswith(comp + ".") for n in ah.load(tmp_path / "p" / comp).modules)
