"""Tiny diffusion bases (a diffusers UNet2DConditionModel and a CLIP text encoder, no download) and
synthetic kohya / LyCORIS LoRA files written against them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterhub_cli.artifact.safetensors import save_safetensors


UNET_KWARGS = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
CLIP_KWARGS = {
    "hidden_size": 12,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 16,
    "projection_dim": 12,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

# (module in the pipeline, rank): Linear (attn, time_emb_proj, TE q_proj), conv 1x1 (proj_in, conv_shortcut),
# conv 3x3 (resnet conv1, conv_in); mixed ranks
SD_TARGETS = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 2),
    ("unet.down_blocks.0.attentions.0.proj_in", 2),
    ("unet.down_blocks.0.resnets.0.conv1", 1),
    ("unet.down_blocks.0.resnets.0.time_emb_proj", 2),
    ("unet.down_blocks.1.resnets.0.conv_shortcut", 3),
    ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4),
    ("unet.conv_in", 2),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 2),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1", 3),
]


def build_tiny_sd(out: Path, seed: int = 0) -> Path:
    """A pipeline-shaped folder: ``unet/`` (diffusers save_pretrained) and ``text_encoder/`` (HF names with
    ``text_model.``, as SD checkpoints on the Hub store them)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_KWARGS)
    unet.save_pretrained(out / "unet")
    te = CLIPTextModel(CLIPTextConfig(**CLIP_KWARGS))
    sd = te.state_dict()
    prefix = "" if any(k.startswith("text_model.") for k in sd) else "text_model."
    (out / "text_encoder").mkdir(parents=True)
    save_safetensors({prefix + k: v.contiguous() for k, v in sd.items()}, out / "text_encoder" / "model.safetensors")
    (out / "text_encoder" / "config.json").write_text(json.dumps(te.config.to_dict()))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return out


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    """Every base tensor by pipeline name (``unet.X.weight``, ``text_encoder.X.weight``)."""
    from adapterhub_cli.artifact.safetensors import load_safetensors

    out = {}
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        for k, v in load_safetensors(base / sub / fname).items():
            out[f"{sub}.{k}"] = v
    return out


def kohya_name(module: str) -> str:
    comp, rest = module.split(".", 1)
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}[comp]
    return prefix + "_" + rest.replace(".", "_")


def make_kohya(
    path: Path,
    base: Path,
    targets: list[tuple[str, int]] = SD_TARGETS,
    *,
    dtype: torch.dtype = torch.float16,
    alpha: dict[str, object] | None = None,
    default_alpha: float = 1.0,
    alpha_dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Write a kohya LoRA for ``targets`` (module, rank); ``alpha`` overrides per module (a tensor, a number, or
    None for no alpha tensor). Returns the state dict written."""
    weights = base_weights(base)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    alpha = alpha or {}
    for module, r in targets:
        w = weights[module + ".weight"]
        name = kohya_name(module)
        down_shape = (r, *w.shape[1:])
        up_shape = (w.shape[0], r) + (1,) * (w.ndim - 2)
        sd[f"{name}.lora_down.weight"] = (torch.randn(down_shape, generator=g) * 0.5).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.5).to(dtype)
        a = alpha.get(module, default_alpha)
        if a is None:
            continue
        if isinstance(a, torch.Tensor):
            sd[f"{name}.alpha"] = a
        else:
            sd[f"{name}.alpha"] = torch.tensor(a, dtype=alpha_dtype or dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0"}
    meta.update(metadata or {})
    save_safetensors(sd, path, meta)
    return sd


def dense_reference(sd: dict[str, torch.Tensor], name: str, alpha_if_missing_or_zero: bool = True) -> torch.Tensor:
    """kohya's update for one module, computed the plain way in float64: alpha / r * up @ down."""
    down = sd[f"{name}.lora_down.weight"].double()
    up = sd[f"{name}.lora_up.weight"].double()
    r = down.shape[0]
    a = sd.get(f"{name}.alpha")
    alpha = float(a.reshape(-1)[0]) if a is not None else float(r)
    if alpha == 0 and alpha_if_missing_or_zero:
        alpha = float(r)
    return alpha / r * (up.flatten(1) @ down.flatten(1))


def build_unet_and_lora(tmp: Path) -> tuple[Path, Path]:
    """A diffusers UNet component folder (``diffusion_pytorch_model.safetensors``) and a PEFT adapter for it,
    converted from a kohya file made for the tiny SD pipeline."""
    import adapterhub_cli as ah

    sd_base = build_tiny_sd(tmp / "tiny-sd")
    targets = [(m, r) for m, r in SD_TARGETS if m.startswith("unet.")]
    make_kohya(tmp / "k.safetensors", sd_base, targets, dtype=torch.float32)
    ah.convert(tmp / "k.safetensors", tmp / "unet-lora", to="peft", base=sd_base / "unet")
    return sd_base / "unet", tmp / "unet-lora"


def save_diffusers_lora(base: Path, out: Path, *, text_encoder: bool = False, seed: int = 3) -> Path:
    """A LoRA file written by diffusers itself (``save_lora_weights``) for the tiny pipeline: the UNet with mixed
    ranks and alphas (rank_pattern, alpha_pattern, a conv), and with ``text_encoder`` the CLIP text encoder too;
    r / alpha in ``lora_adapter_metadata``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(seed)

    def fill(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g))

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    ucfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "conv1"], rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 3}
    )
    unet.add_adapter(ucfg)
    fill(unet)
    kwargs: dict[str, object] = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": ucfg.to_dict(),
    }
    if text_encoder:
        te = CLIPTextModel.from_pretrained(base / "text_encoder")
        tcfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "fc1"])
        try:
            te.add_adapter(tcfg)
        except ValueError as e:  # transformers >= 5.24 asks for a PEFT newer than any released (0.21.2)
            if "version of PEFT" not in str(e):
                raise
            import pytest

            pytest.skip(
                f"this transformers cannot load text-encoder LoRA with this PEFT ({e}); diffusers cannot either"
            )
        fill(te)
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        kwargs["text_encoder_lora_adapter_metadata"] = tcfg.to_dict()
    StableDiffusionPipeline.save_lora_weights(out, **kwargs)  # type: ignore[arg-type]
    return out
