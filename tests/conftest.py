"""Shared pytest fixtures: tiny real models/adapters (built once per session) and env isolation."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


# Force offline mode before transformers / huggingface_hub are imported anywhere (their constants
# are read at import time), so fixture builders can never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Make `import fixtures_models` work whatever pytest import mode is used.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import fixtures_models as fm  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from huggingface_hub.utils import disable_progress_bars  # noqa: E402


transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
disable_progress_bars()

# ----------------------------------------------------------------------------- isolation


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Per-test: private HF cache, offline, plain terminal output, no plugins, no debug."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("ADAPTERS_CACHE", str(hf_home / "adapters-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("ADAPTERS_LOAD_PLUGINS", "")
    monkeypatch.delenv("ADAPTERS_DEBUG", raising=False)
    yield


# ---------------------------------------------------------------------------- model root


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory under which every base/adapter fixture is built (``<root>/<name>``)."""
    return tmp_path_factory.mktemp("models")


# ---------------------------------------------------------------------------------- bases


@pytest.fixture(scope="session")
def llama_base(models_root: Path) -> Path:
    """Tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 128), single model.safetensors."""
    return fm.build_named_base("llama_base", models_root / "llama_base")


@pytest.fixture(scope="session")
def llama_base_sharded(models_root: Path) -> Path:
    """Same weights as ``llama_base`` split into 4 shards + model.safetensors.index.json."""
    return fm.build_named_base("llama_base_sharded", models_root / "llama_base_sharded")


@pytest.fixture(scope="session")
def llama_base_wide(models_root: Path) -> Path:
    """Like ``llama_base`` but hidden_size=96 (for shape-mismatch tests)."""
    return fm.build_named_base("llama_base_wide", models_root / "llama_base_wide")


@pytest.fixture(scope="session")
def gpt2_base(models_root: Path) -> Path:
    """Tiny GPT2LMHeadModel (n_embd 64, 2 layers): Conv1D weights (d_in, d_out), tied lm_head."""
    return fm.build_named_base("gpt2_base", models_root / "gpt2_base")


@pytest.fixture(scope="session")
def roberta_base(models_root: Path) -> Path:
    """Tiny RobertaForSequenceClassification (hidden 64, 2 layers, 2 labels)."""
    return fm.build_named_base("roberta_base", models_root / "roberta_base")


# ------------------------------------------------------------------------------- adapters


def _adapter(name: str, base_dir: Path, models_root: Path) -> Path:
    return fm.build_named_adapter(name, base_dir, models_root / name)


@pytest.fixture(scope="session")
def llama_lora(llama_base: Path, models_root: Path) -> Path:
    """r=8, alpha=16, q_proj/v_proj, CAUSAL_LM."""
    return _adapter("llama_lora", llama_base, models_root)


@pytest.fixture(scope="session")
def llama_rslora(llama_base: Path, models_root: Path) -> Path:
    """r=8, alpha=16, use_rslora (scaling alpha/sqrt(r)), q/k/v/o_proj."""
    return _adapter("llama_rslora", llama_base, models_root)


@pytest.fixture(scope="session")
def llama_patterns(llama_base: Path, models_root: Path) -> Path:
    """r=8, alpha=16, q/v/up_proj; rank_pattern v_proj->4, layers.1 q_proj->2; alpha_pattern up_proj->32."""
    return _adapter("llama_patterns", llama_base, models_root)


@pytest.fixture(scope="session")
def llama_dora(llama_base: Path, models_root: Path) -> Path:
    """r=4, alpha=8, use_dora, q/v_proj (saved with ``lora_magnitude_vector`` tensors)."""
    return _adapter("llama_dora", llama_base, models_root)


@pytest.fixture(scope="session")
def llama_all_linear(llama_base: Path, models_root: Path) -> Path:
    """r=4, alpha=8, target_modules="all-linear" (all 7 projections per layer, not lm_head)."""
    return _adapter("llama_all_linear", llama_base, models_root)


@pytest.fixture(scope="session")
def gpt2_lora(gpt2_base: Path, models_root: Path) -> Path:
    """r=4, alpha=8, c_attn + c_proj (attn and mlp), fan_in_fan_out=True."""
    return _adapter("gpt2_lora", gpt2_base, models_root)


@pytest.fixture(scope="session")
def roberta_lora(roberta_base: Path, models_root: Path) -> Path:
    """r=4, alpha=8, query/value, SEQ_CLS, modules_to_save=["classifier"] (perturbed classifier)."""
    return _adapter("roberta_lora", roberta_base, models_root)


@pytest.fixture(scope="session")
def llama_lora_wide(llama_base_wide: Path, models_root: Path) -> Path:
    """r=8, alpha=16, q/v_proj on ``llama_base_wide`` (hidden 96)."""
    return _adapter("llama_lora_wide", llama_base_wide, models_root)


# -------------------------------------------------------------------------------- copies


@pytest.fixture
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh per-test directory (outside ``tmp_path``) that ``copy_adapter`` copies into."""
    return tmp_path_factory.mktemp("fixture_copies")


@pytest.fixture
def copy_adapter(fixture_dir: Path) -> Callable[..., Path]:
    """Callable ``copy_adapter(src, name=None) -> Path``: a private, corruptible copy of a fixture folder."""

    def _copy(src: Path | str, name: str | None = None) -> Path:
        return fm.copy_adapter(src, fixture_dir, name)

    return _copy
