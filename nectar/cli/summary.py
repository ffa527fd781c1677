"""What the CLI prints about a compiled document: its summary, and its answers beside the full cache's."""
from __future__ import annotations

import time
from pathlib import Path

from ..measure.metrics import pooled_kinds
from ..runtime.ask import ask, ask_full


def brief(artifact, path: str | Path | None = None, wrote: bool = True) -> str:
    """The few lines a compile ends with: where the artifact is and its size against the cache, one line of
    fidelity against the full cache and against no document, and the time."""
    m = artifact.manifest
    size = f"{Path(path).stat().st_size / 1e6:.2f} MB" if path else f"{artifact.nbytes() / 1e6:.2f} MB"
    lines = [f"{'wrote ' if wrote else ''}{path or 'compiled'} ({size}: {artifact.memory_ratio():.4f} x the "
             f"{artifact.kv_bytes() / 1e6:.1f} MB KV cache of its {m['document']['tokens']} tokens)"]
    mine, none, what = _headline(m["metrics"])
    if mine:
        lines.append(f"on {mine['tokens']} answer tokens of {what}: agreement with the full cache "
                     f"{mine['agreement']:.3f} (no document: {none['agreement']:.3f}), KL {mine['kl']:.4f} "
                     f"(no document: {none['kl']:.4f})")
    seconds = m["timings"].get("total", 0.0)
    lines.append(f"compiled in {seconds // 60:.0f} min {seconds % 60:.0f} s; per stage and per layer: nectar info "
                 f"{path or 'ARTIFACT'} --verbose")
    return "\n".join(lines)


def _headline(metrics: dict) -> tuple[dict | None, dict | None, str]:
    """(nectar's, no document's held-out fidelity, on what): the questions, or every held-out prompt where
    validation held out no question."""
    questions = metrics.get("questions") or {}
    if questions.get("nectar", {}).get("tokens"):
        return questions["nectar"], questions["no_document"], "held-out questions"
    fidelity = metrics.get("fidelity") or {}
    if not fidelity:
        return None, None, ""
    pooled = [pooled_kinds({k: f[m] for k, f in fidelity.items()}, fidelity) for m in ("nectar", "no_document")]
    return (*pooled, "held-out prompts") if pooled[0]["tokens"] else (None, None, "")


def summary(artifact, path: str | Path | None = None) -> str:
    """Sizes, held-out fidelity against the full cache and no document, and time per stage."""
    m = artifact.manifest
    lines = [f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)"] if path else []
    lines.append(f"document: {m['document']['tokens']} tokens; modules: {describe(m['modules'])}, "
                 f"{artifact.memory_ratio():.4f} x the KV cache's bytes")
    if m["metrics"].get("exact_tokens"):
        lines.append(f"exact tokens per head: {m['sink_tokens']} sinks (16-bit) and up to "
                     f"{m['metrics']['exact_tokens']} chosen ({_bits(artifact)})")
    sliding = [w for w in artifact.windows if w is not None]
    if sliding:
        lines.append(f"sliding-window layers: {len(sliding)} of {len(artifact.windows)} keep their last "
                     f"{artifact.sinks.keys[artifact.windows.index(sliding[0])].shape[-2]} tokens exact; modules "
                     "stand in for the global ones")
    lines += hardest_layers(artifact)
    val = m["metrics"]["validation"]
    lines.append(f"validation: o_ctx rel err {val['o_rel']:.3f}, |lse err| {val['lse_abs']:.3f}, "
                 f"merged rel err {val['merged_rel']:.4f}")
    for name, a in m["metrics"].get("questions", {}).items():
        decided = "" if a.get("decided_agreement") is None else (
            f"; {a['decided_agreement']:.3f} where the full cache had decided ({a['decided_tokens']} tokens)")
        lines.append(f"  questions, {name:>11}: agreement {a['agreement']:.3f}, KL {a['kl']:.4f} ({a['tokens']} "
                     f"answer tokens of questions){decided}")
    for kind, methods in m["metrics"]["fidelity"].items():
        for name, parts in methods.items():
            a = parts["answer"]
            lines.append(f"{kind:>10} answers, {name:>11}: agreement {a['agreement']:.3f}, KL {a['kl']:.4f} "
                         f"({a['tokens']} tokens)")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings"].items()))
    return "\n".join(lines)


def hardest_layers(artifact, top: int = 3) -> list[str]:
    """The layers whose modules move the next token most (what the `gap` allocation measured), and the
    exact tokens each keeps: where a user would look first if answers drift."""
    metrics = artifact.manifest["metrics"]
    if not metrics.get("layer_gaps"):
        return []
    layers = [layer for layer, w in enumerate(artifact.windows) if w is None]
    exact = metrics.get("exact_per_layer") or [0] * len(artifact.windows)
    by_head = metrics.get("exact_per_head")  # tokens placed by KV head: say each head's
    worst = sorted(zip(metrics["layer_gaps"], layers), reverse=True)[:top]

    def tokens(layer: int) -> str:
        if by_head:
            return f"; exact tokens by KV head {'/'.join(map(str, by_head[layer]))})"
        return f"; {exact[layer]} exact tokens per head)" if exact[layer] else ")"
    return ["hardest layers (answer KL with only that layer on modules): " + ", ".join(
        f"{layer} ({gap:.3f}" + tokens(layer) for gap, layer in worst)]


def describe(modules: dict) -> str:
    if modules["variant"] == "quadrature":
        return f"quadrature, {modules['nodes']} nodes"
    t, s = modules["target_widths"], modules["score_widths"]
    widths = f"{t[0]}/{s[0]}" if len(set(t)) == 1 and len(set(s)) == 1 else f"{min(t)}-{max(t)}/{min(s)}-{max(s)}"
    first = ", pseudo-key first layer" if modules.get("target_softmax") else ""
    return (f"mlp ({modules.get('allocation', 'uniform')}), widths {widths}, {modules.get('weight_bits', 16)}-bit "
            f"weights{first}")


def compare_answers(model, tokenizer, artifact, questions: list[str], max_new_tokens: int) -> str:
    """Answer with nectar, then with the full cache; each pair, then what the user compiled for:
    how alike the answers are, the memory kept and the time."""
    start = time.perf_counter()
    print(f"[nectar] answering {len(questions)} question(s) with the compiled document...", flush=True)
    answers = ask(model, tokenizer, artifact, questions, max_new_tokens=max_new_tokens)
    took = time.perf_counter() - start
    print(f"[nectar] answering them again with the full cache ({artifact.n} document tokens)...", flush=True)
    full = ask_full(model, tokenizer, artifact, questions, max_new_tokens=max_new_tokens)
    took_full = time.perf_counter() - start - took
    print("[nectar] comparing the answers...", flush=True)
    scores, measure = similarities(answers, full)
    lines = []
    for q, a, f, score in zip(questions, answers, full, scores):
        lines.append(f"Q: {q}\n  nectar:     {indent(a)}\n  full cache: {indent(f)}\n  {measure}: {score:.3f}\n")
    lines.append(f"{measure} of the answers to the full cache's: mean {sum(scores) / len(scores):.3f}, "
                 f"identical answers {sum(a == f for a, f in zip(answers, full))}/{len(full)}")
    exact = "exact tokens" if not any(artifact.windows) else "exact tokens (sliding-window tails included)"
    lines.append(f"memory for the document: {artifact.nbytes() / 1e6:.2f} MB of modules and {exact} on disk "
                 f"({artifact.resident_bytes(model) / 1e6:.2f} MB in memory here) against "
                 f"{artifact.kv_bytes() / 1e6:.1f} MB of the model's bf16 KV cache ({artifact.memory_ratio():.4f})")
    lines.append(f"time: {took:.1f} s with nectar, {took_full:.1f} s with the full cache (including its prefill)")
    return "\n".join(lines)


def indent(answer: str) -> str:
    """An answer on the report's layout: continuation lines under the first, an empty one said as such."""
    if not answer.strip():
        return "(empty answer)"
    return answer.replace("\n", "\n" + " " * 14)


def similarities(answers: list[str], references: list[str]) -> tuple[list[float], str]:
    """(scores, what they are): MiniLM sentence-embedding cosine, or word overlap without the eval extra."""
    try:
        from ..measure.semantic import cosine

        return [cosine(a, r) for a, r in zip(answers, references)], "MiniLM cosine"
    except ImportError:
        overlap = [len(set(a.split()) & set(r.split())) / max(1, len(set(a.split()) | set(r.split())))
                   for a, r in zip(answers, references)]
        return overlap, "word overlap (Jaccard; pip install 'nectar[eval]' for MiniLM cosine)"


def _bits(artifact) -> str:
    keys, values = artifact.exact_bits, artifact.exact_value_bits
    return f"{keys}-bit" if keys == values else f"{keys}-bit keys, {values}-bit values"
