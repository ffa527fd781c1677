"""One compiled document = one file: safetensors tensors with a JSON manifest in its header.

Writes go to a temporary file renamed into place, so an interrupted save never leaves a file that
loads. The manifest holds a hash of itself and of the tensor bytes, so a file changed by one byte,
header included, is refused, not run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .providers.attention import ExactContext, WithExact
from .errors import NectarError
from .files import atomic_path
from .manifest import check_fields, missing_artifact
from .providers.fused import FusedBank
from .model.models import dtype_name, layer_windows, model_fingerprint, modeled_layers, tokenizer_fingerprint, window_tokens
from .providers.modules import MLPBank
from .providers.quadrature import QuadratureBank
from .providers.quant import CodedTokens, token_numbers
from .providers.tokenstore import STORE_DTYPE, quantized, sinks_from, stored

FORMAT_VERSION = 3  # 3: the checksum covers the manifest too
Bank = MLPBank | QuadratureBank
BANKS = {cls.variant: cls for cls in (MLPBank, QuadratureBank)}


@dataclass
class Artifact:
    manifest: dict
    bank: Bank
    sinks: ExactContext  # the first document tokens, kept exact
    document_ids: list[int] | None = None  # for reference runs only, never read at inference
    _providers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        """Document length in tokens: questions start at this position."""
        return self.manifest["document"]["tokens"]

    @property
    def question_template(self) -> str:
        return self.manifest["templates"]["question"]

    def providers(self, model) -> tuple:
        """(modules, sink tokens) ready for `model`'s device and dtype, built once per (dtype, device)."""
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        if (dtype, device) not in self._providers:
            # Modules compute in fp32 (bf16 would cost the lse its precision); 8-bit weights stay 8-bit.
            fused = (FusedBank(self.bank) if isinstance(self.bank, MLPBank) else self.bank).to(device)
            sinks = self.sinks
            if (self.exact_bits < 16 or sinks.bias is not None
                    or len({k.shape[-2] for k, w in zip(sinks.keys, self.windows) if w is None}) > 1):
                # Quantised exact tokens stay coded in memory, and tokens allocated by layer or head cannot
                # share a prefix cache: either way only the sinks (alike in every layer, 16-bit) go in the
                # cache, and the rest join the modules' side.
                fused, sinks = self._exact_beside(fused, device, dtype)
            sinks = replace(sinks, keys=[k.to(device, dtype) for k in sinks.keys],
                            values=[v.to(device, dtype) for v in sinks.values])
            self._providers[dtype, device] = (fused, sinks)
        return self._providers[dtype, device]

    def _exact_beside(self, provider, device, dtype) -> tuple[WithExact, ExactContext]:
        """(the provider with each layer's exact tokens past the sinks beside it, the sinks alone). Quantised
        tokens stay coded in memory; 16-bit ones go to the model's dtype with the sinks."""
        s, sinks = self.manifest["sink_tokens"], self.sinks
        # A sliding layer's tail stays whole with the sinks: it has no module to sit beside.
        past = [s if w is None else k.shape[-2] for k, w in zip(sinks.keys, self.windows)]
        bias = None if sinks.bias is None else [None if b is None else b[:, p:] for b, p in zip(sinks.bias, past)]
        rest = ExactContext([k[:, p:] for k, p in zip(sinks.keys, past)], [v[:, p:] for v, p in zip(sinks.values, past)],
                            bias)
        rest = CodedTokens.of(rest, self.exact_bits, self.exact_value_bits).to(device) if self.exact_bits < 16 else replace(
            rest, keys=[k.to(device, dtype) for k in rest.keys], values=[v.to(device, dtype) for v in rest.values])
        head = [s if w is None else None for w in self.windows]
        return WithExact(provider, rest), replace(sinks, keys=[k[:, :h] for k, h in zip(sinks.keys, head)],
                                                  values=[v[:, :h] for v, h in zip(sinks.values, head)], bias=None)

    @property
    def windows(self) -> list[int | None]:
        """Per model layer, its sliding window, or None for a global layer (the ones with modules)."""
        return self.manifest["model"].get("windows") or [None] * self.manifest["model"]["layers"]

    def kv_bytes(self, dtype_bytes: int = 2) -> int:
        """The model's own cache for this document: every token in global layers, the window in sliding ones."""
        m = self.manifest["model"]
        return 2 * window_tokens(self.windows, self.n) * m["kv_heads"] * m["head_dim"] * dtype_bytes

    @property
    def exact_bits(self) -> int:
        """How the exact tokens past the sinks of global layers are stored (nectar.quant); 16 when there are none."""
        s = self.manifest["sink_tokens"]
        if not any(k.shape[-2] > s for k, w in zip(self.sinks.keys, self.windows) if w is None):
            return 16
        return self.manifest["config"].get("exact_bits", 16)

    @property
    def exact_value_bits(self) -> int:
        """How those tokens' values are stored: as the keys in artifacts from before values had their own."""
        if self.exact_bits == 16:
            return 16
        return self.manifest["config"].get("exact_value_bits") or self.exact_bits

    def nbytes(self, dtype_bytes: int = 2) -> int:
        """Bytes kept for the document (modules + exact tokens: sinks, sliding tails) at `dtype_bytes` per
        16-bit number; b-bit exact tokens count as b/16 of a number each, their scales as whole ones."""
        return round((self.bank.num_params() + self._exact_numbers()) * dtype_bytes)

    def _exact_numbers(self) -> float:
        s, total = self.manifest["sink_tokens"], 0.0
        for layer, window in enumerate(self.windows):
            d = self.sinks.keys[layer].shape[-1]
            for tokens in self.sinks.head_counts(layer):  # real tokens only, not a head's padding
                for bits, values in ((self.exact_bits, False), (self.exact_value_bits, True)):
                    exact = window is None and bits < 16
                    total += s * d + token_numbers(tokens - s, d, bits, values) if exact else tokens * d
        return total

    def memory_ratio(self) -> float:
        return self.nbytes() / self.kv_bytes()

    def resident_bytes(self, model) -> int:
        """Bytes the attached form holds in memory on `model`: the fused modules (8-bit weights as codes, the
        rest fp32), quantised exact tokens as codes, the sinks at the model's dtype. Near `nbytes`, which counts
        the file."""
        return sum(t.numel() * t.element_size() for t in _held(self.providers(model)))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"bank.{k}": (v.to(STORE_DTYPE) if v.is_floating_point() else v).detach().contiguous()
               for k, v in self.bank.export().items()}  # 8-bit weight codes stay integers
        # Sinks of the global layers and tails of the sliding ones: each part stacks when its layers keep as
        # many tokens; exact tokens allocated by layer do not, and go end to end with their lengths.
        for name, slides in (("sinks", False), ("tails", True)):
            layers = [layer for layer, w in enumerate(self.windows) if (w is not None) == slides]
            if not layers:
                continue
            keys, values = [self.sinks.keys[i] for i in layers], [self.sinks.values[i] for i in layers]
            # Heads that keep unequal numbers of tokens store each head's real ones only, not its padding.
            heads = None if self.sinks.bias is None else [self.sinks.head_counts(i) for i in layers]
            if not slides and self.exact_bits < 16:  # the sinks 16-bit, the exact tokens past them quantised
                s = self.manifest["sink_tokens"]
                past = None if heads is None else [[c - s for c in layer] for layer in heads]
                out.update(quantized("exact", [k[:, s:] for k in keys], [v[:, s:] for v in values], self.exact_bits,
                                      past, self.exact_value_bits))
                keys, values, heads = [k[:, :s] for k in keys], [v[:, :s] for v in values], None
            out.update(stored(name, keys, values, heads))
        if self.document_ids is not None:
            out["document.ids"] = torch.tensor(self.document_ids, dtype=torch.int32)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return write_bytes(self.to_bytes(), path)

    def to_bytes(self) -> bytes:
        """The file's bytes: what a compile on another machine sends back."""
        tensors = self.tensors()
        manifest = dict(self.manifest, format_version=FORMAT_VERSION)
        manifest.pop("sha256", None)
        manifest["sha256"] = _checksum(manifest, tensors)
        self.manifest = manifest
        return save(tensors, metadata={"nectar": json.dumps(manifest)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Artifact":
        path = Path(path)
        error = missing_artifact(path)
        if error:
            raise error
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            manifest = json.loads(header["__metadata__"]["nectar"])
        except (SafetensorError, ValueError, KeyError, OSError, MemoryError) as e:
            raise NectarError(f"{path} is not a readable nectar artifact (truncated or corrupted?): recompile it") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise NectarError(f"{path} has format {manifest.get('format_version')}, this nectar reads "
                              f"{FORMAT_VERSION}: recompile it")
        if manifest.get("sha256") != _checksum({k: v for k, v in manifest.items() if k != "sha256"}, tensors):
            raise NectarError(f"{path} is corrupted (it does not match its checksum): recompile it")
        try:
            check_fields(manifest)
            bank, sinks = _bank_from(manifest, tensors), sinks_from(manifest, tensors)
            ids = tensors.get("document.ids")
            artifact = cls(manifest, bank, sinks, None if ids is None else _ids(ids, manifest))
            _check_shapes(artifact)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError, StopIteration) as e:
            # A checksum that matches says the file is as written, not that its writer was nectar: whatever a
            # hand-edited or hostile file holds that cannot be read as an artifact is refused here, not run.
            reason = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise NectarError(f"{path} does not hold what its manifest describes ({reason}): recompile it") from None
        return artifact

    def check_compatible(self, model, tokenizer=None) -> None:
        """Refuse a model (or tokenizer) other than the one the artifact was compiled for."""
        want, have = self.manifest["model"]["fingerprint"], model_fingerprint(model)
        cfg, m = model.config, self.manifest["model"]
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, self.bank.head_dim)
        if (want["config"], want["weights"]) != (have["config"], have["weights"]) or \
                shape != (m["layers"], m["kv_heads"], m["head_dim"]):
            raise NectarError(f"this artifact was compiled for model '{want['name']}' and does not fit "
                              f"'{have['name']}': load that model, or recompile the document for this one")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest["tokenizer"]:
            raise NectarError("this artifact was compiled with another tokenizer: use the model's own tokenizer")


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """An artifact's bytes to `path`, renamed into place: never a half-written file that loads."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def _held(obj) -> list[torch.Tensor]:
    """Every tensor a provider (or a tuple of them) holds."""
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _held(item)]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, FusedBank):
        return [t for layer in obj.layers for t in layer.tensors()]
    if isinstance(obj, WithExact):
        return _held([obj.provider, obj.exact])
    if isinstance(obj, ExactContext):
        return _held([obj.keys, obj.values])
    if isinstance(obj, CodedTokens):
        return obj.tensors()
    return []


def _check_shapes(artifact: Artifact) -> None:
    """Every layer's exact tokens [kv_heads, t, head_dim], keys and values alike, at least the sinks in a
    global layer and at most the window in a sliding one; the bank's size and its numbers finite."""
    m, sinks = artifact.manifest["model"], artifact.sinks
    if len(sinks.keys) != m["layers"] or len(sinks.values) != m["layers"]:
        raise ValueError(f"exact tokens for {len(sinks.keys)} layers, not {m['layers']}")
    for layer, (k, v, window) in enumerate(zip(sinks.keys, sinks.values, artifact.windows)):
        tokens = k.shape[-2] if k.dim() == 3 else -1
        fits = tokens <= window if window else tokens >= artifact.manifest["sink_tokens"]
        if k.shape != (m["kv_heads"], tokens, m["head_dim"]) or v.shape != k.shape or not fits:
            raise ValueError(f"layer {layer}'s exact tokens have shape {tuple(k.shape)}")
        bias = sinks.layer_bias(layer)
        if bias is not None and bias.shape != (m["kv_heads"], tokens):
            raise ValueError(f"layer {layer}'s exact-token bias has shape {tuple(bias.shape)}")
    bank = artifact.bank
    modeled = sum(w is None for w in artifact.windows)
    if (bank.layers, bank.kv_heads, bank.head_dim) != (modeled, m["kv_heads"], m["head_dim"]):
        raise ValueError("its modules are not sized for the model")
    if not all(torch.isfinite(t).all() for t in bank.state_dict().values() if t.is_floating_point()):
        raise ValueError("its modules hold NaN or infinite numbers")
    artifact.kv_bytes(), artifact.exact_bits  # what every use reads first


def _ids(ids: torch.Tensor, manifest: dict) -> list[int]:
    if ids.dim() != 1 or ids.is_floating_point() or ids.numel() != manifest["document"]["tokens"]:
        raise ValueError("document.ids does not match the document's length")
    return ids.tolist()


def _bank_from(manifest: dict, tensors: dict) -> Bank:
    sizes = manifest["modules"]
    state = {k.removeprefix("bank."): v.float() for k, v in tensors.items() if k.startswith("bank.")}
    windows = manifest["model"].get("windows") or []
    model = dict(manifest["model"], layers=manifest["model"]["layers"] - sum(w is not None for w in windows))
    bank = BANKS[sizes["variant"]].from_export(model, sizes, state)
    if windows:  # modules only for the global layers
        bank.model_layers = [layer for layer, w in enumerate(windows) if w is None]
    return bank.eval().requires_grad_(False)


def _checksum(manifest: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the manifest (without its checksum) and of every tensor's name and bytes."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def document_hash(doc_ids: list[int]) -> str:
    """What the manifest records of the document: a hash of its token ids."""
    return hashlib.sha256(json.dumps(list(doc_ids)).encode()).hexdigest()


def build_manifest(model, tokenizer, doc_ids: list[int], templates: dict, bank: Bank, config,
                   metrics: dict, timings: dict) -> dict:
    cfg = model.config
    windows = layer_windows(cfg)
    return {
        "model": {
            "fingerprint": model_fingerprint(model),
            "layers": cfg.num_hidden_layers,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": bank.head_dim,
            **({"windows": windows} if any(windows) else {}),
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "document": {
            "tokens": len(doc_ids),
            "sha256": document_hash(doc_ids),
        },
        "templates": templates,
        "modules": {
            "variant": bank.variant,
            "allocation": config.allocation,
            **bank.sizes(),
            "params_per_module": bank.num_params() // (len(modeled_layers(cfg)) * cfg.num_key_value_heads),
            "dtype": dtype_name(STORE_DTYPE),
        },
        "config": config.to_dict(),
        "budget": config.budget,
        "sink_tokens": config.sink_tokens,
        "seed": config.seed,
        "metrics": metrics,
        "timings": timings,
    }
