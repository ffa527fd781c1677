"""Compile a whole corpus: one task per document on Ray (or in this process), and an incremental index.

`index.json` in the output folder records, per document, the hashes of its text and of the compile's
settings, its status, bytes, fidelity and time. A document whose hashes match a compiled entry is
skipped; a changed one is recompiled; one whose file is gone is reported and its artifact removed.
Each task reads its document and compiles it where it runs; only the artifact's bytes come back, and
they are written (atomically) and indexed as each task finishes, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..artifact import Artifact, write_bytes
from ..config import CompileConfig
from ..model.documents import read_text
from ..errors import NectarError
from ..files import write_json
from .sources import Source

INDEX = "index.json"


def settings_hash(model: str, config: CompileConfig) -> str:
    return hashlib.sha256(json.dumps({"model": model, "config": config.to_dict()}, sort_keys=True).encode()).hexdigest()


def text_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_index(out: Path) -> dict:
    path = out / INDEX
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["documents"]
    except (ValueError, KeyError, TypeError):
        raise NectarError(f"{path} is not a nectar index: remove it, or pick another --out") from None


def plan(sources: list[Source], index: dict, out: Path, settings: str) -> tuple[list[Source], list[Source], list[str]]:
    """(to compile, unchanged since the last run, removed since then). An unchanged document that failed
    is not retried: it would fail the same way until its text (or the settings) change."""
    todo, fresh = [], []
    for source in sources:
        entry = index.get(source.name, {})
        same = entry.get("settings_sha256") == settings and entry.get("text_sha256") == text_hash(source.path)
        done = entry.get("status") == "failed" or (out / source.artifact).exists()
        (fresh if same and done else todo).append(source)
    names = {s.name for s in sources}
    return todo, fresh, sorted(name for name in index if name not in names)


_MODELS: dict = {}


def compile_document(path: str, model_name: str, dtype: str, device: str, config: CompileConfig,
                     keep_document: bool = True) -> dict:
    """Compile one document where this runs (a Ray worker or this process): {"bytes"} or {"error"}."""
    from .pipeline import compile
    from ..model.models import load_model

    start = time.perf_counter()
    try:
        text = read_text(Path(path))
        key = (model_name, dtype, device)
        if key not in _MODELS:  # a worker keeps its model for the next document
            _MODELS[key] = load_model(model_name, dtype=dtype, device=device)
        model, tokenizer = _MODELS[key]
        artifact = compile(model, tokenizer, text, config)
        if not keep_document:
            artifact.document_ids = None
        data = artifact.to_bytes()
    except NectarError as e:
        return {"error": str(e), "seconds": time.perf_counter() - start}
    return {"bytes": data, "seconds": time.perf_counter() - start}


@dataclass
class CorpusJob:
    sources: list[Source]
    out: Path
    model: str
    config: CompileConfig
    dtype: str = "auto"
    device: str = "cpu"
    use_ray: bool = True
    ray_address: str | None = None
    cpus_per_task: int = 1
    keep_document: bool = True  # False: artifacts without the document's ids (compile --no-document)

    def run(self) -> dict:
        """Compile what changed; returns the run's summary (index entries are written as tasks finish)."""
        settings = settings_hash(self.model, self.config) + ("" if self.keep_document else "-no-document")
        index = read_index(self.out)
        todo, fresh, removed = plan(self.sources, index, self.out, settings)
        for name in removed:
            (self.out / index.pop(name).get("artifact", f"{name}.nectar")).unlink(missing_ok=True)
        self._save(index)
        if self.use_ray and todo:
            tasks = self._ray_tasks(_ray(self.ray_address), todo)  # connected before any progress is drawn
        else:
            tasks = ((s, compile_document(*self._args(s))) for s in todo)
        failed = []
        with tqdm(total=len(todo), desc="compiling documents", unit="doc") as bar:
            for source, result in tasks:
                index[source.name] = self._record(source, result, settings)
                self._save(index)
                entry = index[source.name]
                if entry["status"] == "failed":
                    failed.append(source.name)
                bar.write(f"{source.name}: " + (f"failed: {entry['reason']}" if entry["status"] == "failed" else
                          f"{entry['bytes'] / 1e6:.2f} MB, held-out agreement {entry['fidelity']['agreement'] or 0:.3f}, "
                          f"{entry['seconds']:.0f} s"))
                bar.update()
        still = [s.name for s in fresh if index[s.name]["status"] == "failed"]
        return {"compiled": len(todo) - len(failed), "failed": failed + still, "up_to_date": len(fresh) - len(still),
                "removed": removed}

    def _args(self, source: Source) -> tuple:
        return str(source.path), self.model, self.dtype, self.device, self.config, self.keep_document

    def _ray_tasks(self, ray, todo: list[Source]):
        """(source, result) pairs in the order tasks finish."""
        resources = {"num_gpus": 1} if self.device.startswith("cuda") else {"num_cpus": self.cpus_per_task}
        remote = ray.remote(**resources)(compile_document)
        pending = {remote.remote(*self._args(s)): s for s in todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _record(self, source: Source, result: dict, settings: str) -> dict:
        entry = {"source": str(source.path), "artifact": source.artifact, "text_sha256": text_hash(source.path),
                 "settings_sha256": settings, "seconds": round(result["seconds"], 1)}
        if "error" in result:
            (self.out / source.artifact).unlink(missing_ok=True)
            return {**entry, "status": "failed", "reason": result["error"]}
        path = write_bytes(result["bytes"], self.out / source.artifact)
        artifact = Artifact.load(path)
        metrics = artifact.manifest["metrics"]
        questions = metrics.get("questions", {}).get("nectar", {})
        fidelity = {"agreement": questions.get("agreement"), "kl": questions.get("kl"),
                    "merged_error": metrics.get("validation", {}).get("merged_rel")}
        return {**entry, "status": "compiled", "bytes": path.stat().st_size, "tokens": artifact.n,
                "memory_ratio": artifact.memory_ratio(), "fidelity": fidelity}

    def _save(self, index: dict) -> None:
        write_json(self.out / INDEX, {"model": self.model, "documents": index})


def _ray(address: str | None):
    """Ray, started locally or joined at `address`; an unreachable address fails in seconds, not minutes."""
    try:
        import ray
    except ImportError:
        raise NectarError("compiling a corpus runs on Ray: pip install 'nectar[corpus]', or pass --no-ray") from None
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
        except (OSError, ValueError):
            raise NectarError(f"cannot reach a Ray cluster at {address}: check the address (HOST:PORT of its head "
                              "node), or leave --ray-address out to start a local one") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray
