"""Serving targets: what llama.cpp (GGUF) and vLLM would refuse, or load and silently get wrong, for an adapter.

``validate --target gguf`` / ``--target vllm`` add these findings to the fit-to-base report. Each rule cites the
serving stack's own source; the versions read are listed in the project's serving notes (llama.cpp
``ggml-org/llama.cpp@0c1e57098``, the copy vendored in llama-cpp-python 0.3.36; vLLM v0.33.0 release source).
The checks read the adapter's config and tensor headers (and the base's config.json when given), never weights.

The rules behind ``vllm-rank-mismatch``, ``vllm-bad-tensor-key``, ``vllm-missing-weights``, ``vllm-vocab-mismatch``
and ``vllm-target-filter-drop`` were re-read in vllm-project/vllm's own source (indexed GitHub copies of
``vllm/lora/lora_model.py`` @532cc258, ``vllm/lora/utils.py`` @0fd15707, ``vllm/lora/lora_weights.py``
@4c78406e, ``vllm/lora/peft_helper.py`` @e745baff, ``model_manager.py`` ``_create_lora_modules`` and
``utils.py`` ``is_in_target_modules`` of a 2026 main); ``gguf-unsupported-arch`` / ``gguf-filtered-modules`` in
the vendored llama.cpp converter (tests/vendor, run by the tests on the same adapters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.validate import Finding
from adapterhub_cli.errors import CorruptFileError, UsageError


#: The safetensors metadata key ``adapters quantize`` writes (formats/quantized.py ``QUANT_KEY``; artifact/ sits
#: below formats/, so the key is read here by value).
_QUANT_KEY = "adapterhub.quantization"


def _quantized_scheme(adapter: Adapter) -> str | None:
    raw = adapter.metadata.get(_QUANT_KEY)
    if raw is None:
        return None
    try:
        scheme = parse_json(raw.encode(), path=adapter.path, what=_QUANT_KEY).get("scheme")
    except (CorruptFileError, UnicodeEncodeError, AttributeError):
        return "unknown"
    return scheme if isinstance(scheme, str) else "unknown"


def _copies(adapter: Adapter) -> tuple[list[str], list[str], list[str]]:
    """Extra tensors split as (LoRA / base biases, norm-layer copies, other full-module copies). PEFT's own
    ``*.base_layer.weight`` copies of embed_tokens / lm_head (``save_embedding_layers``) are left out: both
    stacks skip them (llama.cpp convert_lora_to_gguf.py ``get_tensors``; vLLM utils.py
    ``is_base_embedding_weights``)."""
    names = [n for n in sorted(adapter.extra_tensors) if not n.endswith(".base_layer.weight")]
    listed = {str(m) for m in adapter.config.modules_to_save or []}

    def copied(n: str) -> bool:  # a tensor of a modules_to_save module (its bias included)
        return bool(listed & set(n.split(".")))

    bias = [n for n in names if n.endswith(".bias") and not copied(n)]
    rest = [n for n in names if n not in bias]
    norm = [n for n in rest if "norm" in n.rsplit(".", 2)[-2]] if rest else []
    return bias, norm, [n for n in rest if n not in norm]


# ------------------------------------------------------------------------------------------- llama.cpp (GGUF)

#: The ``architectures`` names llama.cpp's converter maps to a text model class (``conversion/__init__.py``
#: ``TEXT_MODEL_MAP``, which ``get_model_class`` looks up; ``convert_lora_to_gguf.py`` exits with "Model X is not
#: supported" for any other). Copied from ggml-org/llama.cpp@0c1e57098 (the copy vendored under tests/vendor,
#: which tests/test_gguf.py compares this set with).
LLAMA_CPP_TEXT_ARCHITECTURES = frozenset(
    """
    AfmoeForCausalLM ApertusForCausalLM ArceeForCausalLM ArcticForCausalLM AudioFlamingo3ForConditionalGeneration
    BaiChuanForCausalLM BaichuanForCausalLM BailingMoeForCausalLM BailingMoeV2ForCausalLM BailingMoeV3ForCausalLM
    BailingMoeV3VLForConditionalGeneration BambaForCausalLM BertForMaskedLM BertForSequenceClassification BertModel
    BitNetForCausalLM BitnetForCausalLM BloomForCausalLM BloomModel CamembertModel ChameleonForCausalLM
    ChameleonForConditionalGeneration ChatGLMForConditionalGeneration ChatGLMModel CodeShellForCausalLM
    CogVLMForCausalLM Cohere2ForCausalLM Cohere2MoeForCausalLM CohereForCausalLM DFlash2DraftModel DFlashDraftModel
    DSparkDraftModel DSparkSpeculator DbrxForCausalLM DeciLMForCausalLM DeepseekForCausalLM DeepseekOCRForCausalLM
    DeepseekV2ForCausalLM DeepseekV32ForCausalLM DeepseekV3ForCausalLM DeepseekV4DSparkModel DeepseekV4ForCausalLM
    DistilBertForMaskedLM DistilBertForSequenceClassification DistilBertModel Dots1ForCausalLM Dots3NoteForCausalLM
    Dots3NoteForConditionalGeneration Dots3NoteTextForCausalLM DotsOCRForCausalLM DreamModel Eagle3DraftModel
    Eagle3LlamaForCausalLM Eagle3Speculator Ernie4_5ForCausalLM Ernie4_5_ForCausalLM Ernie4_5_MoeForCausalLM
    EuroBertModel Exaone4ForCausalLM Exaone4_5_ForConditionalGeneration ExaoneForCausalLM ExaoneMoEForCausalLM
    ExaoneMoeForCausalLM FalconForCausalLM FalconH1ForCausalLM FalconMambaForCausalLM GPT2LMHeadModel
    GPTBigCodeForCausalLM GPTNeoXForCausalLM GPTRefactForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM
    Gemma3ForConditionalGeneration Gemma3TextModel Gemma3nForCausalLM Gemma3nForConditionalGeneration
    Gemma4AssistantForCausalLM Gemma4DSparkModel Gemma4ForCausalLM Gemma4ForConditionalGeneration
    Gemma4UnifiedAssistantForCausalLM Gemma4UnifiedForConditionalGeneration GemmaForCausalLM Glm4ForCausalLM
    Glm4MoeForCausalLM Glm4MoeLiteForCausalLM Glm4vForConditionalGeneration Glm4vMoeForConditionalGeneration
    Glm5NextForConditionalGeneration GlmForCausalLM GlmMoeDsaForCausalLM GlmOcrForConditionalGeneration
    GptOssForCausalLM GraniteForCausalLM GraniteMoeForCausalLM GraniteMoeHybridForCausalLM GraniteMoeSWAForCausalLM
    GraniteMoeSharedForCausalLM GraniteSWAForCausalLM GraniteSpeechForConditionalGeneration
    GraniteSpeechPlusForConditionalGeneration GraniteSwitchForCausalLM Grok1ForCausalLM GrokForCausalLM
    GroveMoeForCausalLM HYV3ForCausalLM HYV4ForCausalLM HrmTextForCausalLM HunYuanDenseV1ForCausalLM
    HunYuanMoEV1ForCausalLM HunYuanVLForConditionalGeneration IQuestCoderForCausalLM InternLM2ForCausalLM
    InternLM3ForCausalLM JAISLMHeadModel Jais2ForCausalLM JambaForCausalLM JanusForConditionalGeneration
    JinaBertForMaskedLM JinaBertModel JinaEmbeddingsV5Model KORMoForCausalLM KimiK25ForConditionalGeneration
    KimiK3ForConditionalGeneration KimiLinearForCausalLM KimiLinearModel KimiVLForConditionalGeneration
    LFM2ForCausalLM LLaDAMoEModel LLaDAMoEModelLM LLaDAModelLM LLaMAForCausalLM LagunaForCausalLM
    Lfm25AudioTokenizer Lfm2BidirectionalModel Lfm2DSparkDraftModel Lfm2ForCausalLM Lfm2Model Lfm2MoeForCausalLM
    LingDSparkModel Llama4ForCausalLM Llama4ForConditionalGeneration LlamaBidirectionalModel LlamaForCausalLM
    LlamaForCausalLMEagle3 LlamaModel LlavaForConditionalGeneration LlavaStableLMEpochForCausalLM MPTForCausalLM
    MT5ForConditionalGeneration MaincoderForCausalLM Mamba2ForCausalLM MambaForCausalLM MambaLMHeadModel
    MapleForCausalLM MellumForCausalLM MiMoV2FlashForCausalLM MiMoV2ForCausalLM MiniCPM3ForCausalLM
    MiniCPMForCausalLM MiniCPMV4_6ForConditionalGeneration MiniMaxM1ForCausalLM MiniMaxM2ForCausalLM
    MiniMaxM3SparseForCausalLM MiniMaxM3SparseForConditionalGeneration MiniMaxText01ForCausalLM
    Ministral3ForCausalLM Mistral3ForConditionalGeneration MistralForCausalLM MixtralForCausalLM
    ModernBertForMaskedLM ModernBertForSequenceClassification ModernBertModel MuseGlimmerAssistantModel
    MuseGlimmerForConditionalGeneration NanbeigeForCausalLM NemotronForCausalLM NemotronHForCausalLM
    NemotronHPuzzleForCausalLM NeoBERT NeoBERTForSequenceClassification NeoBERTLMHead NomicBertModel
    OLMoForCausalLM Olmo2ForCausalLM Olmo3ForCausalLM OlmoForCausalLM OlmoeForCausalLM OpenELMForCausalLM
    OrionForCausalLM PLMForCausalLM PLaMo2ForCausalLM PLaMo3ForCausalLM PaddleOCRVLForConditionalGeneration
    PanguEmbeddedForCausalLM Phi3ForCausalLM Phi4ForCausalLMV PhiForCausalLM PhiMoEForCausalLM Plamo2ForCausalLM
    Plamo3ForCausalLM PlamoForCausalLM PocketTTSModel QWenLMHeadModel Qwen2AudioForConditionalGeneration
    Qwen2ForCausalLM Qwen2Model Qwen2MoeForCausalLM Qwen2VLForConditionalGeneration Qwen2VLModel Qwen2_5OmniModel
    Qwen2_5_VLForConditionalGeneration Qwen3ASRForConditionalGeneration Qwen3DSparkModel Qwen3ForCausalLM
    Qwen3Model Qwen3MoeForCausalLM Qwen3NextForCausalLM Qwen3OmniMoeForConditionalGeneration
    Qwen3TTSForConditionalGeneration Qwen3VLForConditionalGeneration Qwen3VLMoeForConditionalGeneration
    Qwen3_5ForCausalLM Qwen3_5ForConditionalGeneration Qwen3_5MoeForCausalLM Qwen3_5MoeForConditionalGeneration
    Qwen4ExpForCausalLM Qwen4ExpForConditionalGeneration RND1 RWForCausalLM RWKV6Qwen2ForCausalLM RWKV7ForCausalLM
    RobertaForSequenceClassification RobertaModel RuGPT3XLForCausalLM Rwkv6ForCausalLM Rwkv7ForCausalLM
    RwkvHybridForCausalLM Sarashina2VisionForCausalLM SarvamMoEForCausalLM SeedOssForCausalLM
    SmallThinkerForCausalLM SmolLM3ForCausalLM SolarOpenForCausalLM Spark2_5ForCausalLM StableLMEpochForCausalLM
    StableLmForCausalLM Starcoder2ForCausalLM Step3p5ForCausalLM Step3p7ForConditionalGeneration
    StepVLForConditionalGeneration T5EncoderModel T5ForConditionalGeneration T5WithLMHeadModel TalkieForCausalLM
    UMT5ForConditionalGeneration UMT5Model UltravoxModel UnlimitedOCRForCausalLM VLlama3ForCausalLM
    VoxtralForConditionalGeneration WavTokenizerDec XLMRobertaForSequenceClassification XLMRobertaModel
    XverseForCausalLM YoutuForCausalLM YoutuVLForConditionalGeneration modeling_grove_moe.GroveMoeForCausalLM
    modeling_sarvam_moe.SarvamMoEForCausalLM
    """.split()
)
#: ``conversion/base.py`` ``get_model_architecture``: these top-level names win over ``text_config``'s.
_LLAMA_CPP_TOP_LEVEL = frozenset(
    {
        "StepVLForConditionalGeneration",
        "Sarashina2VisionForCausalLM",
        "Exaone4_5_ForConditionalGeneration",
        "Step3p7ForConditionalGeneration",
        "KimiK3ForConditionalGeneration",
    }
)


def llama_cpp_architecture(config: dict[str, Any]) -> str | None:
    """The architecture name llama.cpp's converter looks up for a base ``config.json`` (``conversion/base.py``
    ``get_model_architecture`` for a text model): ``architectures[0]``, replaced by ``text_config``'s
    ``architectures[0]`` when that exists (a multimodal wrapper converted as its language model)."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None and isinstance(config.get("ssm_cfg"), dict):
        layer = config["ssm_cfg"].get("layer", "Mamba")
        arch = f"{layer}ForCausalLM" if isinstance(layer, str) else None
    if arch in _LLAMA_CPP_TOP_LEVEL:
        return arch
    text = config.get("text_config")
    sub = text.get("architectures") if isinstance(text, dict) else None
    if isinstance(sub, list) and sub and isinstance(sub[0], str):
        return sub[0]
    return arch


def _llama_cpp_filtered(base_name: str) -> bool:
    """conversion/base.py ``TextModel.filter_tensors``: multimodal tensors a text conversion skips (``get_tensors``
    of convert_lora_to_gguf.py then ``continue``s: no message). ``base_name`` is the LoRA key as
    ``get_base_tensor_name`` gives it (``base_model.model.`` removed, ``.lora_A.weight`` -> ``.weight``)."""
    name = base_name
    if name.startswith(
        (
            "mlp",
            "vit.",
            "vpm.",
            "siglip2.",
            "conformer.",
            "merger.",
            "resampler.",
            "sound_encoder.",
            "sound_projection.",
            "speech_embeddings.",
        )
    ):
        return True
    pieces = (
        "visual.",
        "vision.",
        "audio.",
        "talker.",
        "vision_",
        "audio_",
        "token2wav.",
        "code2wav.",
        "projector.",
        "pre_mm_projector_norm",
        "image_newline",
        "view_seperator",
        "patch_embed",
        "patch_embedding",
        "patch_merger.",
        "patch_merge_mlp.",
        "model.connector.",
    )
    return any(p in name for p in pieces)


def _gguf_base_checks(adapter: Adapter, base: BaseView | None) -> list[Finding]:
    """``gguf-unsupported-arch`` (convert_lora_to_gguf.py: ``get_model_class(get_model_architecture(hparams))``,
    else "Model X is not supported", exit 1) and ``gguf-filtered-modules`` (modules its ``filter_tensors`` skips
    without a word: their update is missing from the GGUF)."""
    out: list[Finding] = []
    if base is not None:
        arch = llama_cpp_architecture(base.config)
        if arch not in LLAMA_CPP_TEXT_ARCHITECTURES:
            out.append(
                Finding(
                    "gguf-unsupported-arch",
                    "error",
                    f"llama.cpp has no converter for the base architecture {arch or '(none in config.json)'}: "
                    f'convert_lora_to_gguf.py stops with "Model {arch} is not supported"; serve the adapter '
                    "with PEFT / transformers or vLLM, or merge it and use a runtime for that architecture",
                )
            )
    dropped = [n for n in sorted(adapter.modules) if _llama_cpp_filtered(n + ".weight")]
    if dropped:
        every = len(dropped) == len(adapter.modules)
        out.append(
            Finding(
                "gguf-filtered-modules",
                "error" if every else "warning",
                f"{len(dropped)} of {len(adapter.modules)} modules belong to a vision / audio tower or projector "
                f"(e.g. {dropped[0]}): llama.cpp's converter skips them without a word, so the GGUF lacks their "
                "update (llama.cpp converts the language model only); merge the adapter to keep them",
                dropped[0],
            )
        )
    return out


def check_gguf(adapter: Adapter, base: BaseView | None = None) -> list[Finding]:
    """What llama.cpp's ``convert_lora_to_gguf.py`` (and its loader, ``src/llama-adapter.cpp``) would refuse or
    silently lose. ``adapters convert --to gguf`` bakes per-module scales into lora_B, so the scale findings
    name it as the fix.

    A LoRA on ``embed_tokens`` / ``lm_head`` (``lora_embedding_A/B``, or lora_A/B on lm_head) is exported by the
    converter (``token_embd.weight.lora_a/b``, ``output.weight.lora_a/b``) and is not flagged, except lm_head on a
    base with tied embeddings (``"lm_head is present in adapter, but is ignored in base model"``).
    """
    cfg = adapter.config
    out: list[Finding] = _gguf_base_checks(adapter, base)
    fix = "or export with `adapters convert ADAPTER --to gguf --base BASE -o OUT.gguf`, which bakes it into lora_B"
    scheme = _quantized_scheme(adapter)
    if scheme is not None:
        # convert_lora_to_gguf.py loads the factors as stored (int8 / fp8 bytes plus separate scale tensors it does
        # not know): "Unexpected name" for the scales, or garbage factors; nothing in llama.cpp reads our scheme.
        out.append(
            Finding(
                "gguf-quantized",
                "error",
                f"the factors are stored quantized ({scheme}, written by `adapters quantize`): llama.cpp's converter "
                "cannot read them; run `adapters dequantize` first, or export with `adapters convert ADAPTER --to "
                "gguf --base BASE -o OUT.gguf`, which dequantizes",
            )
        )
    if cfg.alpha_pattern:
        # convert_lora_to_gguf.py reads only lparams["lora_alpha"]; llama-adapter.h get_scale: alpha / rank.
        out.append(
            Finding(
                "gguf-alpha-pattern",
                "error",
                f"alpha_pattern ({len(cfg.alpha_pattern)} entries) is lost by llama.cpp's converter: GGUF stores one "
                f"global alpha; {fix}",
            )
        )
    if cfg.use_rslora:
        out.append(
            Finding(
                "gguf-rslora",
                "error",
                f"rsLoRA's alpha/sqrt(r) scale is lost by llama.cpp's converter (llama.cpp applies alpha/r); {fix}",
            )
        )
    dora = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if cfg.use_dora or dora:
        out.append(
            Finding(
                "gguf-dora",
                "error",
                'DoRA magnitude vectors are refused by the converter ("Unexpected name"): merge the '
                "adapter into the base instead",
                dora[0] if dora else None,
            )
        )
    bias, norm, saved = _copies(adapter)
    if cfg.bias != "none" or bias:
        out.append(
            Finding(
                "gguf-bias",
                "error",
                "bias tensors are refused by the converter: retrain with bias='none' or merge instead",
                bias[0] if bias else None,
            )
        )
    if saved:
        out.append(
            Finding(
                "gguf-modules-to-save",
                "error",
                'modules_to_save full copies are refused by the converter ("Unexpected name … Not a lora_A or '
                'lora_B tensor"): merge the adapter into the base instead',
                saved[0],
            )
        )
    if norm:
        # convert_lora_to_gguf.py passes *_norm tensors through; llama-adapter.cpp skips them
        # ("TODO: add support for norm vector").
        out.append(
            Finding(
                "gguf-norm-dropped",
                "warning",
                f"{len(norm)} norm-layer copies are converted, then skipped by llama.cpp's loader: their change "
                "is lost; merge the adapter into the base to keep it",
                norm[0],
            )
        )
    head = [m.name for m in adapter.modules.values() if m.name.split(".")[-1] == "lm_head"]
    if head and base is not None and base.config.get("tie_word_embeddings") is True:
        out.append(
            Finding(
                "gguf-tied-lm-head",
                "error",
                "a LoRA on lm_head of a base with tied embeddings: llama.cpp's converter refuses it (the base has no "
                "output tensor); drop the lm_head module or merge instead",
                head[0],
            )
        )
    if cfg.rank_pattern:
        out.append(
            Finding(
                "gguf-rank-pattern", "info", "rank_pattern is kept: GGUF reads each module's rank from its tensors"
            )
        )
    return out


# ------------------------------------------------------------------------------------------------------- vLLM

#: vllm/config/lora.py (v0.33.0) L27: ``max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``, default 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: vllm/lora/peft_helper.py ``_init_is_supported``: string inits that leave the base weights alone.
_VLLM_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
#: vllm/lora/peft_helper.py L56-65: the only modules_to_save vLLM accepts (classification heads).
_VLLM_SAVED = {"classifier", "score"}


def check_vllm(
    adapter: Adapter,
    base: BaseView | None = None,
    *,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    lora_target_modules: Sequence[str] | None = None,
) -> list[Finding]:
    """What vLLM's LoRA loader (v0.33.0: ``vllm/lora/peft_helper.py`` ``PEFTHelper.from_dict`` / ``validate_legal``
    / ``_validate_features``, ``vllm/lora/lora_model.py`` ``from_local_checkpoint``, ``vllm/lora/utils.py``
    ``parse_fine_tuned_lora_name``, ``vllm/lora/worker_manager.py`` ``_load_adapter``) refuses or loses.

    ``max_lora_rank`` is the server's ``--max-lora-rank``; ``lora_target_modules`` its ``--lora-target-modules``
    (the deploy-time filter; None: no filter).
    """
    cfg = adapter.config
    raw: dict[str, Any] = cfg.raw
    out: list[Finding] = []

    def add(code: str, severity: str, message: str, module: str | None = None) -> None:
        out.append(Finding(code, severity, message, module))  # type: ignore[arg-type]

    # peft_helper.py PEFTHelper.from_dict L155-173: "Missing required configuration fields".
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]
    if missing and not adapter.config_inferred:
        add(
            "vllm-missing-config-field",
            "error",
            f'adapter_config.json lacks {", ".join(missing)}: vLLM refuses it ("Missing required configuration '
            'fields")',
        )
    # peft_helper.py validate_legal L188-198: max(r, *rank_pattern.values()) > max_lora_rank; tensors with a larger
    # rank than the slots fail at activation (layers/base_linear.py set_lora copy_).
    ranks = [int(cfg.r)] + [int(v) for v in (cfg.rank_pattern or {}).values() if isinstance(v, int)]
    ranks += [m.rank for m in adapter.modules.values()]
    top = max(ranks) if ranks else 0
    if top > VLLM_MAX_LORA_RANKS[-1]:
        add(
            "vllm-rank-too-high",
            "error",
            f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): reduce it "
            f"(adapters reduce --max-rank {VLLM_MAX_LORA_RANKS[-1]})",
        )
    elif top > max_lora_rank:
        need = next(v for v in VLLM_MAX_LORA_RANKS if v >= top)
        add(
            "vllm-rank-too-high",
            "error",
            f'rank {top} is above --max-lora-rank {max_lora_rank} ("LoRA rank {top} is greater than '
            f'max_lora_rank"): start vLLM with --max-lora-rank {need}, or reduce the adapter',
        )
    # peft_helper.py _validate_features L66-86.
    dora = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if cfg.use_dora or dora:
        add(
            "vllm-dora",
            "error",
            '"vLLM does not yet support DoRA": merge the adapter instead',
            dora[0] if dora else None,
        )
    bias, norm, saved = _copies(adapter)
    lora_bias = [n for n in bias if ".lora_B." in n]
    if cfg.bias != "none" or bias or raw.get("lora_bias") is True:
        add(
            "vllm-bias",
            "error",
            '"Adapter bias is not supported" / "vLLM does not support LoRA bias (lora_bias)": retrain with '
            "bias='none' or merge instead",
            (lora_bias or bias)[0] if bias else None,
        )
    listed = cfg.modules_to_save or []
    bad_saved = sorted({str(n) for n in listed} - _VLLM_SAVED) + [
        n for n in saved + norm if not set(n.split(".")) & _VLLM_SAVED
    ]
    unsaved = [n for n in bad_saved if n in listed and not any(n in t.split(".") for t in saved + norm)]
    if bad_saved and unsaved == bad_saved:  # listed, nothing saved: the list alone is refused
        why = (  # PEFT >= 0.22 lists it for every classification adapter, whether or not the model has one
            " (PEFT 0.22 and later list pre_classifier for every classification adapter)"
            if "pre_classifier" in unsaved
            else ""
        )
        add(
            "vllm-modules-to-save",
            "error",
            f'vLLM accepts modules_to_save only from ["classifier", "score"]; the config also lists '
            f"{', '.join(unsaved)}{why}, for which the adapter saved nothing: vLLM refuses the list as written; "
            "remove the entry from adapter_config.json",
            unsaved[0],
        )
    elif bad_saved:
        add(
            "vllm-modules-to-save",
            "error",
            'vLLM accepts modules_to_save only for ["classifier", "score"] on classification models; '
            f"{bad_saved[0]} is refused (embedding / lm_head copies, extra vocabulary included): merge instead",
            bad_saved[0],
        )
    elif listed:
        add(
            "vllm-classification-head",
            "info",
            "a classifier / score head is loaded only on a classification (pooling) model, one head per adapter",
        )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in _VLLM_INITS:
        add(
            "vllm-init-unsupported",
            "error",
            f'init_lora_weights={init!r} changes the base weights ("Inits such as PiSSA, OLoRA, CorDA and LoftQ '
            'modify the base model weights"): vLLM refuses it; convert it to a plain LoRA first',
        )
    for key, code, what in (
        ("alora_invocation_tokens", "vllm-alora", "Activated LoRA (aLoRA)"),
        ("layer_replication", "vllm-layer-replication", "layer_replication"),
        ("use_bdlora", "vllm-bdlora", "BD-LoRA"),
        ("use_qalora", "vllm-qalora", "QA-LoRA"),
    ):
        if raw.get(key):
            add(code, "error", f"vLLM does not support {what}: it refuses the adapter")
    scheme = _quantized_scheme(adapter)
    if scheme is not None:
        # lora_model.py casts every stored tensor with tensor.to(device, dtype): int8 / fp8 bytes become values and
        # our block scales are "unsupported LoRA weight" keys (utils.py parse_fine_tuned_lora_name).
        add(
            "vllm-quantized",
            "error",
            f"the factors are stored quantized ({scheme}, written by `adapters quantize`): vLLM cannot read them; "
            "run `adapters dequantize` first",
        )
    # worker_manager.py _load_adapter / lora_model.py check_unexpected_modules: the last name component must be a
    # Linear / MoE module of the model or one of its embedding_modules; convolutions never are.
    for m in adapter.modules.values():
        if m.kind == "conv":
            add("vllm-unexpected-module", "error", "vLLM serves LoRA on linear layers only", m.name)
            break
    out += _vllm_pickled_targets(adapter, base)
    emb = [m.name for m in adapter.modules.values() if m.kind == "embedding" or m.name.split(".")[-1] == "lm_head"]
    if emb:
        # vllm/model_executor/models/llama.py ``embedding_modules = {"embed_tokens": ..., "lm_head": ...}``;
        # gemma*.py declare ``embedding_modules = {}`` ("Gemma does not apply LoRA to the embedding layer").
        add(
            "vllm-embedding-lora",
            "warning",
            "a LoRA on embed_tokens / lm_head loads only on models whose vLLM class lists it in embedding_modules "
            "(Llama-family yes, Gemma no); elsewhere vLLM refuses the adapter",
            emb[0],
        )
    if cfg.rank_pattern or cfg.alpha_pattern:
        # v0.27.0 and earlier: PEFTHelper drops rank_pattern / alpha_pattern (one scale for every module).
        add(
            "vllm-pattern-ignored",
            "warning",
            "rank_pattern / alpha_pattern are applied by vLLM >= 0.33 only; older vLLM (<= 0.27) uses one scale for "
            "every module and serves a wrong update",
        )
    out += _vllm_rank_mismatch(adapter)
    out += _vllm_bad_keys(adapter, bias + saved + norm)
    out += _vllm_missing_weights(adapter)
    out += _vllm_vocab(adapter, base)
    out += _vllm_dropped(adapter, base, lora_target_modules)
    if adapter.format != "peft":
        add(
            "vllm-format",
            "error",
            f"vLLM loads PEFT folders (adapter_config.json + adapter_model.safetensors); this is {adapter.format}: "
            "run `adapters convert ADAPTER --to peft -o OUT` first",
        )
    return out


def _vllm_rank_mismatch(adapter: Adapter) -> list[Finding]:
    """vLLM never compares the tensors' rank with the config: ``LoRALayerWeights.from_config`` (vllm/lora/
    lora_weights.py) takes rank and scale from ``PEFTHelper`` (``r`` / ``rank_pattern``, ``lora_alpha`` /
    ``alpha_pattern``), and ``set_lora`` (vllm/lora/layers/base_linear.py) copies any narrower factors into the first
    columns of its ``max_lora_rank`` slots. PEFT refuses such an adapter (size mismatch); vLLM serves it with the
    config's scale."""
    cfg = adapter.config
    if adapter.config_inferred:
        return []
    bad = [(m, cfg.rank_for(m.name)) for m in adapter.modules.values() if m.rank != cfg.rank_for(m.name)]
    if not bad:
        return []
    m, want = bad[0]
    rule = "rank_pattern" if want != cfg.r else "r"
    return [
        Finding(
            "vllm-rank-mismatch",
            "error",
            f"{len(bad)} modules have tensors of another rank than the config gives them (e.g. rank {m.rank}, "
            f"{rule} says {want}): vLLM does not check this and serves them with the config's scale (alpha/{want}, "
            f"not alpha/{m.rank}), a silently wrong update, where PEFT refuses the adapter; fix r / rank_pattern "
            "in adapter_config.json",
            m.name,
        )
    ]


def _vllm_parses(key: str) -> bool:
    """vllm/lora/utils.py ``parse_fine_tuned_lora_name``: ``….lora_A.weight`` / ``….lora_B.weight`` or
    ``….lora_embedding_A`` / ``….lora_embedding_B``; anything else raises "… is unsupported LoRA weight"
    (``is_base_embeddding_weights`` keys, PEFT's ``embed_tokens`` / ``lm_head`` ``base_layer`` copies, are skipped
    before it)."""
    parts = key.split(".")
    if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
        return True
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return True
    return parts[-1] in ("lora_embedding_A", "lora_embedding_B")


def _vllm_bad_keys(adapter: Adapter, reported: list[str]) -> list[Finding]:
    """Stored tensor names vLLM's parser refuses, beyond those other findings name (DoRA magnitudes, biases,
    modules_to_save copies): mostly keys still holding PEFT's adapter name (``….lora_A.default.weight``, from
    saving ``model.state_dict()`` instead of ``save_pretrained``)."""
    if adapter.format != "peft" or _quantized_scheme(adapter) is not None:
        return []  # vllm-format / vllm-quantized
    keys = [t.name for m in adapter.modules.values() for t in (m.A, m.B)]
    keys += [adapter.key_prefix + n for n in adapter.extra_tensors if n not in reported]
    bad = [k for k in keys if not _vllm_parses(k)]
    if not bad:
        return []
    return [
        Finding(
            "vllm-bad-tensor-key",
            "error",
            f"{len(bad)} tensor names are not PEFT's saved form (e.g. {bad[0]!r}): vLLM's loader refuses them "
            '("… is unsupported LoRA weight"; it reads only ….lora_A.weight / ….lora_B.weight / '
            "….lora_embedding_A / ….lora_embedding_B); run `adapters convert ADAPTER --to peft -o OUT`, which "
            "writes PEFT's names",
            bad[0],
        )
    ]


def _vllm_pickled_targets(adapter: Adapter, base: BaseView | None) -> list[Finding]:
    """vllm/lora/lora_model.py ``from_local_checkpoint``: for ``adapter_model.bin`` / ``.pt`` (no safetensors) vLLM
    checks the config's ``target_modules`` instead of the tensors: each entry's last name component must be one of
    the model's LoRA-capable modules, unless the whole entry is a regex string ``is_regex_target_modules``
    accepts, or it raises "While loading …, expected target modules in … but received …". Lists written for
    several architectures (fine for PEFT, which needs one match) are refused."""
    folder = adapter.path if adapter.path.is_dir() else None
    targets = adapter.config.target_modules
    if (
        folder is None
        or base is None
        or not isinstance(targets, list)
        or (folder / "adapter_model.safetensors").is_file()
    ):
        return []
    if not any((folder / f"adapter_model.{ext}").is_file() for ext in ("bin", "pt")):
        return []
    # the base's weight matrices stand for vLLM's Linear layers and embedding_modules
    capable = {k.removesuffix(".weight").rsplit(".", 1)[-1] for k, t in base.tensors.items() if len(t.shape) == 2}
    capable |= {kid for p, kids in _VLLM_PACKED.items() if p in capable for kid in kids}
    foreign = [t for t in targets if str(t).rsplit(".", 1)[-1] not in capable]
    if not foreign:
        return []
    return [
        Finding(
            "vllm-unexpected-module",
            "error",
            f"the weights are a pickle (adapter_model.bin), for which vLLM checks target_modules instead of the "
            f'tensors: {foreign} are no module of this model, so vLLM refuses the adapter ("expected target '
            "modules in … but received …\"); save it as adapter_model.safetensors (PEFT's save_pretrained "
            "default, or `adapters convert ADAPTER --to peft --allow-pickle -o OUT`), which vLLM checks by "
            "its tensors",
            str(foreign[0]),
        )
    ]


def _vllm_missing_weights(adapter: Adapter) -> list[Finding]:
    """vllm/lora/peft_helper.py ``from_local_dir`` opens ``<dir>/adapter_config.json`` and vllm/lora/lora_model.py
    ``from_local_checkpoint`` reads ``<dir>/adapter_model.safetensors`` (else ``.bin``, else ``.pt``; else "…
    doesn't contain tensors"): one folder holding both. A bare tensor file, or a folder without the config, is not
    found (``LoRAAdapterNotFoundError`` / HTTP 404 from the server)."""
    if adapter.format != "peft":
        return []  # vllm-format
    if adapter.path.is_dir() and not adapter.config_inferred:
        return []
    what = "a bare tensor file" if not adapter.path.is_dir() else "a folder without adapter_config.json"
    return [
        Finding(
            "vllm-missing-weights",
            "error",
            f"this is {what}: vLLM loads a folder holding adapter_config.json and adapter_model.safetensors, and "
            "finds no adapter here; run `adapters convert ADAPTER --to peft -o OUT` (check the written r and "
            "lora_alpha: they were inferred)",
        )
    ]


def _vocab_size(base: BaseView) -> int | None:
    """The vocabulary size vLLM compares with (``ModelConfig.get_vocab_size``: the text config's ``vocab_size``)."""
    text = base.config.get("text_config")
    for cfg in (text if isinstance(text, dict) else {}, base.config):
        value = cfg.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _vllm_vocab(adapter: Adapter, base: BaseView | None) -> list[Finding]:
    """Vocabulary the adapter brings that vLLM cannot serve.

    - vllm/lora/lora_model.py ``from_lora_tensors``: ``lora_embedding_A.shape[1]`` must equal the model's vocabulary
      size, or "The embedding LoRA size(…) must be consistent with the base model's vocabulary size(…)".
    - Extra vocabulary is gone since vLLM 0.12: ``new_embeddings.safetensors`` / ``.bin`` (read by v0.11's
      ``lora/models.py`` ``from_local_checkpoint`` with ``lora_extra_vocab_size``) are never read by v0.20 to
      v0.33, so rows for added tokens are silently lost; tokens an ``added_tokens.json`` numbers past the base's
      vocabulary have no embedding row at all.
    """
    out: list[Finding] = []
    vocab = _vocab_size(base) if base is not None else None
    for m in adapter.modules.values():
        if m.kind == "embedding" and vocab is not None and m.A.shape[1] != vocab:
            out.append(
                Finding(
                    "vllm-vocab-mismatch",
                    "error",
                    f"the embedding LoRA covers {m.A.shape[1]} tokens but the base's vocab_size is {vocab}: vLLM "
                    "refuses it (\"The embedding LoRA size … must be consistent with the base model's vocabulary "
                    'size"); serve a base resized to this vocabulary, or merge the adapter',
                    m.name,
                )
            )
            break
    folder = adapter.path if adapter.path.is_dir() else None
    if folder is None:
        return out
    new = [p.name for p in sorted(folder.glob("new_embeddings.*")) if p.suffix in (".safetensors", ".bin")]
    added = _added_token_ids(folder)
    past = sorted(i for i in added if vocab is not None and i >= vocab)
    if past:
        out.append(
            Finding(
                "vllm-vocab-mismatch",
                "error",
                f"added_tokens.json adds {len(past)} tokens past the base's vocabulary ({vocab}, first id "
                f"{past[0]}): vLLM (>= 0.12) has no extra-vocabulary support, so they have no embedding row; resize "
                "the base (resize_token_embeddings), merge the adapter into it and serve the merged model",
            )
        )
    elif new:
        out.append(
            Finding(
                "vllm-vocab-mismatch",
                "warning",
                f"{new[0]} holds embeddings for added tokens: vLLM >= 0.12 never reads it (extra vocabulary was "
                "removed), so those rows are lost; merge the adapter into a resized base instead",
            )
        )
    return out


def _added_token_ids(folder: Any) -> list[int]:
    path = folder / "added_tokens.json"
    if not path.is_file() or path.stat().st_size > 16 * 2**20:
        return []
    try:
        doc = parse_json(path.read_bytes(), path=path, what="added_tokens.json")
    except (CorruptFileError, OSError):
        return []
    if not isinstance(doc, dict):
        return []
    return [v for v in doc.values() if isinstance(v, int) and not isinstance(v, bool)]


#: The packed layers vLLM builds from separate HF projections (``packed_modules_mapping`` of its Llama, Mistral,
#: Qwen2/3, Gemma, … classes, e.g. vllm/model_executor/models/llama.py ``LlamaForCausalLM.packed_modules_mapping``).
_VLLM_PACKED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: Module-name pieces of vision / audio towers and their connectors: vLLM gives them no LoRA wrapper unless it
#: runs with ``--enable-tower-connector-lora`` (vllm/lora/model_manager.py ``_create_lora_modules``: "no matching
#: PunicaWrapper is found; … will be ignored").
_TOWER_MARKERS = (
    "vision_tower",
    "vision_model",
    "visual.",
    "vision_encoder",
    "audio_tower",
    "audio_encoder",
    "multi_modal_projector",
    "mm_projector",
)


def _vllm_passes_filter(name: str, wanted: set[str]) -> bool:
    """vllm/lora/utils.py ``is_in_target_modules`` on the layer vLLM builds for adapter module ``name``: its suffix
    (a q/k/v or gate/up projection lives in the packed layer), its full name, or a packed layer's child named."""
    suffix = name.rsplit(".", 1)[-1]
    layer = next((p for p, kids in _VLLM_PACKED.items() if suffix in kids), suffix)
    if layer in wanted or name in wanted:
        return True
    return any(kid in wanted for kid in _VLLM_PACKED.get(layer, ()))


def _vllm_dropped(adapter: Adapter, base: BaseView | None, wanted: Sequence[str] | None) -> list[Finding]:
    """Modules vLLM loads and never applies, without an error: those outside the server's ``--lora-target-modules``
    (vllm/lora/model_manager.py ``_create_lora_modules`` gives them no LoRA layer; the load check
    ``check_unexpected_modules`` uses the model's modules, not this filter), and vision / audio tower modules of a
    multimodal base (no punica wrapper without ``--enable-tower-connector-lora``)."""
    names = sorted(adapter.modules)
    out: list[Finding] = []
    if wanted is not None:
        dropped = [n for n in names if not _vllm_passes_filter(n, set(wanted))]
        if dropped:
            out.append(
                Finding(
                    "vllm-target-filter-drop",
                    "warning" if len(dropped) < len(names) else "error",
                    f"{len(dropped)} of {len(names)} modules are outside --lora-target-modules "
                    f"{','.join(wanted)} (e.g. {dropped[0]}): vLLM loads them and silently never applies them; add "
                    f"{sorted({n.rsplit('.', 1)[-1] for n in dropped})} to --lora-target-modules",
                    dropped[0],
                )
            )
    multimodal = base is None or any(k in base.config for k in ("vision_config", "audio_config"))
    towers = [n for n in names if multimodal and "language_model" not in n and any(t in n for t in _TOWER_MARKERS)]
    if towers:
        out.append(
            Finding(
                "vllm-target-filter-drop",
                "warning",
                f"{len(towers)} modules sit in a vision / audio tower or its connector (e.g. {towers[0]}): vLLM "
                'ignores them unless it runs with --enable-tower-connector-lora ("no matching PunicaWrapper is '
                'found; … will be ignored"); start it with that flag, or merge the adapter',
                towers[0],
            )
        )
    return out


#: ``validate --target NAME`` -> its check.
TARGETS: dict[str, Callable[..., list[Finding]]] = {"gguf": check_gguf, "vllm": check_vllm}


def check_target(
    target: str,
    adapter: Adapter,
    base: BaseView | None = None,
    *,
    max_lora_rank: int | None = None,
    lora_target_modules: Sequence[str] | None = None,
) -> list[Finding]:
    """The findings of one serving target (``gguf`` or ``vllm``).

    Raises:
        UsageError: an unknown target (the message lists the known ones).
    """
    if target not in TARGETS:
        raise UsageError(f"unknown serving target {target!r}; known targets: {', '.join(sorted(TARGETS))}")
    if target == "vllm":
        return check_vllm(
            adapter,
            base,
            max_lora_rank=VLLM_DEFAULT_MAX_LORA_RANK if max_lora_rank is None else max_lora_rank,
            lora_target_modules=lora_target_modules,
        )
    return TARGETS[target](adapter, base)
