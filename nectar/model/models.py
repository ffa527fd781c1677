"""Load the models nectar knows by name, offline, from GGUF files shipped in PyPI packages.

A GGUF load dequantizes every tensor (about 30 s for the default model), so the first load writes a
safetensors copy under the cache folder and later loads read that (about a second).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..errors import NectarError
from .gguf_tokenizer import spm_bpe_tokenizer
from .registry import DEFAULT_MODEL, KNOWN_MODELS, GGUFSource, cache_dir, check_model

def _gguf_path(source: GGUFSource) -> Path:
    spec = importlib.util.find_spec(source.package)  # importing the package itself fails: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise NectarError(f"model package '{source.package}' is not installed: run `{source.install}`")
    if not source.filename:
        try:
            return importlib.import_module(source.package).assemble()  # checks the parts and the hash
        except (ImportError, OSError, ValueError) as e:
            raise NectarError(f"could not assemble the model file from '{source.package}' ({e}): reinstall with "
                              f"`{source.install}`") from None
    path = Path(spec.submodule_search_locations[0]) / source.filename
    if not path.is_file():
        raise NectarError(f"{path} is missing: reinstall with `{source.install}`")
    return path


@contextmanager
def offline() -> Iterator[None]:
    """No network while a model loads (this machine has no hub); the rest of the process is left alone."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _convert(source: GGUFSource, target: Path) -> None:
    gguf = _gguf_path(source)
    print(f"converting {gguf.name} to safetensors once (under a minute)...", flush=True)
    _quiet()
    with offline():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = spm_bpe_tokenizer(gguf) or AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                              local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: an interrupted conversion leaves no half copy behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet() -> None:
    hf_logging.disable_progress_bar()  # a per-tensor bar for a one-second load is noise
    hf_logging.set_verbosity_error()


def resolve(name: str) -> Path:
    """A local model folder for `name`: a known model name, or a folder saved by transformers."""
    if name in KNOWN_MODELS:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert(KNOWN_MODELS[name], target)
        return target
    check_model(name)
    return Path(name)


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in eval mode. fp32 for numerics; bf16 runs prefill about 3x faster where the hardware
    has bf16 units; "auto" picks between them (`resolve_dtype`)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve(name)
    _quiet()
    try:
        with offline():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                         local_files_only=True).eval().to(device)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a folder transformers cannot read as a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NectarError(f"could not load the model in {path} ({first[:160]}): give a folder written by a "
                          "transformers save_pretrained, with its weights and tokenizer") from None
    model.name_or_path = name  # fingerprints name the model as the user did, not by a cache path
    return model, tokenizer


def resolve_device(device: str) -> torch.device:
    """"auto" is the GPU when there is one; asking for one that is not there is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise NectarError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NectarError(f"device '{device}' asked for, but torch sees no GPU: use --device cpu")
    return resolved


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively on `device` (a CPU without bf16 units emulates them, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 where `device` runs it natively and fp32 elsewhere: an AVX2-only CPU emulates bf16
    matmuls ~30x slower than fp32 ones, where a CPU with AVX512-BF16 or AMX runs them ~3x faster."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NectarError(f"unknown dtype '{dtype}': use {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    return getattr(torch, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how configs, keys and reports spell a dtype."""
    return str(dtype).removeprefix("torch.")


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_windows(config) -> list[int | None]:
    """Per layer, the sliding window it attends over (tokens), or None for a global layer.

    Families with `layer_types` (Gemma 3, Qwen 2/3) slide only on "sliding_attention" layers; Mistral and
    Phi-3 slide on every layer when `sliding_window` is set. A window as long as the context is global.
    """
    window, layers = getattr(config, "sliding_window", None), config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        slides = getattr(config, "use_sliding_window", True) is not False
        types = ["sliding_attention" if slides else "full_attention"] * layers
    if not window or window >= config.max_position_embeddings:
        return [None] * layers
    return [window if kind == "sliding_attention" else None for kind in types]


def modeled_layers(config) -> list[int]:
    """The layers a module learns the document for: the global ones. A sliding layer keeps its window exactly."""
    return [layer for layer, window in enumerate(layer_windows(config)) if window is None]


def cache_tokens(config, n: int) -> int:
    """Tokens of an n-token document the model's own cache holds, summed over layers (per KV head)."""
    return window_tokens(layer_windows(config), n)


def window_tokens(windows: list[int | None], n: int) -> int:
    """The same from the layers' windows alone (what an artifact's manifest keeps)."""
    return sum(n if window is None else min(n, window) for window in windows)


# The families whose attention the test matrix checks against transformers' eager attention.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "gemma3_text")


def unsupported(config) -> str | None:
    """Why nectar's split attention cannot run this model exactly, or None when it can."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        return (f"its attention logits are soft-capped ({cap}), so attention is not the plain softmax whose "
                "log-sum-exp merge nectar relies on")
    if config.model_type not in FAMILIES:
        return f"nectar checks its attention only for the {', '.join(FAMILIES)} families"
    return None


def check_supported(model: nn.Module) -> None:
    """Refuse, in one line, a model the split attention would run with silently wrong numbers."""
    reason = unsupported(model.config)
    if reason:
        raise NectarError(f"{model.config.model_type} is not supported yet: {reason}")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules in layer order (those transformers tags with a `layer_idx`)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(layers, key=lambda m: m.layer_idx)


def attention_scaling(model: nn.Module) -> float:
    """The factor on q.k in the model's attention (1/sqrt(head_dim) unless the model sets its own)."""
    layer = attention_layers(model)[0]
    return float(getattr(layer, "scaling", head_dim(model.config) ** -0.5))


@contextmanager
def attn_implementation(model: PreTrainedModel, name: str) -> Iterator[PreTrainedModel]:
    """Run `model` with attention implementation `name` inside, and put the previous one back after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def model_fingerprint(model: PreTrainedModel) -> dict:
    """Name, config hash and a weights hash that is the same whether the model runs in fp32 or bf16."""
    config = model.config.to_dict()
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rope_parameters", "rope_theta", "max_position_embeddings")
    config_hash = _digest(json.dumps({k: config.get(k) for k in keep}, sort_keys=True, default=str).encode())
    weights = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        # Rounding to bf16 makes the hash agree between a model and its bf16 cast.
        weights.update(name.encode() + sample.to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes())
    return {"name": getattr(model, "name_or_path", ""), "config": config_hash, "weights": weights.hexdigest()[:16]}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _digest(json.dumps(vocab).encode())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
