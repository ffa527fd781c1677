"""One compiled document = one file: safetensors tensors with a JSON manifest in its header.

Writes go to a temporary file renamed into place, so an interrupted save never leaves a file that
loads. The manifest holds a hash of the tensor bytes, so a corrupted file is refused, not run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .attention import ExactContext
from .errors import NectarError
from .models import model_fingerprint, tokenizer_fingerprint
from .modules import BANKS, Bank

FORMAT_VERSION = 2  # 2: per-layer module widths, quadrature variant
STORE_DTYPE = torch.float16


@dataclass
class Artifact:
    manifest: dict
    bank: Bank
    kept: ExactContext  # the exact-kept document tokens (attention sinks)
    document_ids: list[int] | None = None  # kept for reference runs only, never read at inference

    @property
    def n(self) -> int:
        """Document length in tokens: questions start at this position."""
        return self.manifest["document"]["tokens"]

    @property
    def question_template(self) -> str:
        return self.manifest["templates"]["question"]

    def providers(self, model) -> tuple[torch.nn.Module, ExactContext]:
        """(modules, exact-kept tokens) ready for `model`'s device and dtype, built once per artifact."""
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        key = (dtype, device)
        if getattr(self, "_providers_key", None) != key:
            # Modules stay fp32: they are tiny, and bf16 would cost the lse its precision.
            fused = self.bank.inference().to(device)
            kept = ExactContext([k.to(device, dtype) for k in self.kept.keys],
                                [v.to(device, dtype) for v in self.kept.values])
            self._providers, self._providers_key = (fused, kept), key
        return self._providers

    def kv_bytes(self, dtype_bytes: int = 2) -> int:
        m = self.manifest["model"]
        return 2 * self.n * m["layers"] * m["kv_heads"] * m["head_dim"] * dtype_bytes

    def nbytes(self, dtype_bytes: int = 2) -> int:
        """Bytes kept for the document (modules + exact tokens) at `dtype_bytes` per number."""
        kept = sum(k.numel() + v.numel() for k, v in zip(self.kept.keys, self.kept.values))
        return (self.bank.num_params() + kept) * dtype_bytes

    def memory_ratio(self) -> float:
        return self.nbytes() / self.kv_bytes()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"bank.{k}": v.detach().to(STORE_DTYPE).contiguous() for k, v in self.bank.export().items()}
        out["kept.keys"] = torch.stack(self.kept.keys).to(STORE_DTYPE).contiguous()
        out["kept.values"] = torch.stack(self.kept.values).to(STORE_DTYPE).contiguous()
        if self.document_ids is not None:
            out["document.ids"] = torch.tensor(self.document_ids, dtype=torch.int32)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = self.tensors()
        manifest = dict(self.manifest, format_version=FORMAT_VERSION, tensors_sha256=_tensor_hash(tensors))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"nectar": json.dumps(manifest)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.manifest = manifest
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Artifact":
        path = Path(path)
        if not path.is_file():
            raise NectarError(f"no artifact at {path}: compile one with `nectar compile DOC -o {path}`")
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
        if manifest.get("tensors_sha256") != _tensor_hash(tensors):
            raise NectarError(f"{path} is corrupted (its tensors do not match their checksum): recompile it")
        ids = tensors.get("document.ids")
        return cls(manifest, _bank_from(manifest, tensors), _kept_from(tensors), None if ids is None else ids.tolist())

    def check_compatible(self, model, tokenizer=None) -> None:
        """Refuse a model (or tokenizer) other than the one the artifact was compiled for."""
        want, have = self.manifest["model"]["fingerprint"], model_fingerprint(model)
        if (want["config"], want["weights"]) != (have["config"], have["weights"]):
            raise NectarError(f"this artifact was compiled for model '{want['name']}' and does not fit "
                              f"'{have['name']}': load that model, or recompile the document for this one")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest["tokenizer"]:
            raise NectarError("this artifact was compiled with another tokenizer: use the model's own tokenizer")


def _bank_from(manifest: dict, tensors: dict) -> Bank:
    sizes = manifest["modules"]
    state = {k.removeprefix("bank."): v.float() for k, v in tensors.items() if k.startswith("bank.")}
    bank = BANKS[sizes["variant"]].from_export(manifest["model"], sizes, state)
    return bank.eval().requires_grad_(False)


def _kept_from(tensors: dict) -> ExactContext:
    keys, values = tensors["kept.keys"].float(), tensors["kept.values"].float()
    return ExactContext(list(keys.unbind(0)), list(values.unbind(0)))


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
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
    return {
        "model": {
            "fingerprint": model_fingerprint(model),
            "layers": cfg.num_hidden_layers,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": bank.head_dim,
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
            "params_per_module": bank.num_params() // (cfg.num_hidden_layers * cfg.num_key_value_heads),
            "dtype": str(STORE_DTYPE).removeprefix("torch."),
        },
        "config": config.to_dict(),
        "budget": config.budget,
        "sink_tokens": config.sink_tokens,
        "seed": config.seed,
        "metrics": metrics,
        "timings": timings,
    }
