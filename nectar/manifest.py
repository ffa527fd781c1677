"""An artifact's manifest, read from its file header without torch: what the CLI checks before it loads
anything (the model named, the document's length), and what it warns about (an artifact no better than
no document).

The full load (nectar.artifact) verifies the checksum; this only reads, so it never vouches for a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import NectarError

HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header; past it the file is not one


def missing_artifact(path: Path) -> NectarError | None:
    """The error for a path that holds no artifact file, or None when it is a file."""
    if path.is_dir():
        found = sorted(path.glob("*.nectar"))
        example = found[0] if found else path / "NAME.nectar"
        return NectarError(f"{path} is a folder: name an artifact file in it, e.g. {example}")
    if not path.is_file():
        return NectarError(f"no artifact at {path}: compile one with `nectar compile DOC -o {path}`")
    return None


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest in `path`'s header; a one-line NectarError where there is none."""
    return read_header(path)[0]


def read_header(path: str | os.PathLike) -> tuple[dict, set[str]]:
    """(the manifest, the names of the tensors) in `path`'s safetensors header."""
    path = Path(path)
    error = missing_artifact(path)
    if error:
        raise error
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= HEADER_LIMIT:
                raise ValueError("header size")
            header = json.loads(f.read(size))
        # A cut file (an interrupted copy) shows here, before torch loads: the tensors end where the file must.
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if path.stat().st_size != 8 + size + max(ends, default=0):
            raise ValueError("file size")
        manifest = json.loads(header["__metadata__"]["nectar"])
        model_name(manifest)  # every check reads it
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NectarError(f"{path} is not a readable nectar artifact (truncated or corrupted?): recompile it") from e
    return manifest, set(header) - {"__metadata__"}


def model_name(manifest: dict) -> str:
    name = manifest["model"]["fingerprint"]["name"]
    if not isinstance(name, str):
        raise TypeError("model name")
    return name


def check_model_for(manifest: dict, model: str | None) -> str:
    """The model to load for an artifact: its own, or `model` when that can be it. A known name other than the
    artifact's, or a folder whose layers or heads differ, is refused before anything loads."""
    from .model.registry import KNOWN_MODELS, check_model

    want = model_name(manifest)
    if model is None or model == want:
        return want
    config = check_model(model)
    # Two known names are two models; a folder may hold the same one, which the fingerprint decides on load.
    if (config is None and want in KNOWN_MODELS) or (config is not None and not _shaped_like(manifest, config)):
        raise NectarError(f"this artifact was compiled for model '{want}', not {model}: drop --model, or recompile "
                          "the document for that model")
    return model


def _shaped_like(manifest: dict, config: dict) -> bool:
    text = config.get("text_config")
    text = text if isinstance(text, dict) else config
    m = manifest["model"]
    return (text.get("num_hidden_layers"), text.get("num_key_value_heads", text.get("num_attention_heads"))) == \
        (m.get("layers"), m.get("kv_heads"))


def useless_warning(manifest: dict) -> str | None:
    """A warning line where the compile measured this artifact no better than no document at all."""
    questions = manifest.get("metrics", {}).get("questions") or {}
    mine, none = questions.get("nectar") or {}, questions.get("no_document") or {}
    if mine.get("tokens") and mine.get("agreement", 1.0) <= none.get("agreement", 0.0):
        return (f"[nectar] warning: on held-out questions this artifact agrees with the full cache on "
                f"{mine['agreement']:.3f} of answer tokens, no better than no document at all "
                f"({none['agreement']:.3f}): recompile with a higher --budget or --effort")
    return None


LIMIT = 1 << 24  # past any real model's layers, heads, widths or document tokens: a corrupted number


def check_fields(manifest: dict) -> None:
    """Raise ValueError naming the first field the loader or runtime reads that has the wrong type or an
    impossible value: a hand-edited or hostile manifest is refused, never run (nor sized into a huge
    allocation)."""
    model = _section(manifest, "model")
    for key in ("layers", "kv_heads", "head_dim"):
        _need(_whole(model.get(key), 1), f"model.{key}")
    fingerprint = model.get("fingerprint")
    _need(isinstance(fingerprint, dict) and all(isinstance(fingerprint.get(k), str) for k in
                                                ("name", "config", "weights")), "model.fingerprint")
    windows = model.get("windows")
    _need(windows is None or (isinstance(windows, list) and len(windows) == model["layers"]
                              and all(w is None or _whole(w, 1) for w in windows)), "model.windows")
    _need(isinstance(manifest.get("tokenizer"), str), "tokenizer")
    document = _section(manifest, "document")
    _need(_whole(document.get("tokens"), 1) and isinstance(document.get("sha256"), str), "document")
    templates = _section(manifest, "templates")
    _need(isinstance(templates.get("question"), str) and "{question}" in templates["question"], "templates.question")
    modules = _section(manifest, "modules")
    _need(modules.get("variant") in ("mlp", "quadrature"), "modules.variant")
    for key in ("target_widths", "score_widths", "nodes"):
        value = modules.get(key)
        _need(value is None or _whole(value, 1) or (isinstance(value, list) and value
                                                   and all(_whole(v, 1) for v in value)), f"modules.{key}")
    _need(modules.get("depth") is None or _whole(modules["depth"], 1, 64), "modules.depth")
    _need(modules.get("weight_bits", 16) in (8, 16), "modules.weight_bits")
    if modules["variant"] == "quadrature":
        scaling = modules.get("scaling")
        _need(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and 0 < scaling < LIMIT,
              "modules.scaling")
        _need(modules.get("nodes") is not None, "modules.nodes")
    else:
        _need(all(modules.get(k) is not None for k in ("target_widths", "score_widths", "depth")), "modules")
    _need(_whole(manifest.get("sink_tokens"), 0), "sink_tokens")
    config = _section(manifest, "config")
    for key in ("exact_bits", "exact_value_bits"):
        _need(config.get(key) in (None, 4, 8, 16), f"config.{key}")
    _section(manifest, "metrics")
    _section(manifest, "timings")


def _section(manifest: dict, key: str) -> dict:
    _need(isinstance(manifest.get(key), dict), key)
    return manifest[key]


def _whole(value, low: int, high: int = LIMIT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _need(ok: bool, field: str) -> None:
    if not ok:
        raise ValueError(f"its manifest's {field} is missing or invalid")
