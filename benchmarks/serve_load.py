"""Load on `nectar serve`: concurrent streaming clients over several compiled documents, loopback only.

    python benchmarks/serve_load.py DIR [--clients 64] [--requests 200] [--max-batch 32 1]

For each --max-batch value it starts `nectar serve DIR` on 127.0.0.1, sends --requests chat requests
(greedy, streamed) from --clients concurrent clients, round-robin over the documents, and reports
throughput, time to first token, per-token latency and the server's peak RSS. `--max-batch 1` is the
baseline that serves each request alone. `--memory N` instead loads N copies of one artifact and
reports the server's RSS against what N full KV caches of those documents would take. `--same-as-ask`
first checks, per document, that the server's greedy chat answer is `nectar.ask`'s word for word.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

QUESTIONS = [
    "What does the assert statement do?", "When is the else clause of a loop executed?",
    "What does the global statement do?", "How do I leave a loop early?", "What is a lambda expression?",
    "What does the return statement return when it has no expression?", "How does the with statement work?",
    "What happens when an exception is not handled?",
]


def start(folder: Path, max_batch: int | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`nectar serve folder` on a free loopback port, once it answers: (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    batch = [] if max_batch is None else ["--max-batch", str(max_batch)]
    proc = subprocess.Popen([sys.executable, "-m", "nectar.cli.main", "serve", str(folder), "--port", str(port),
                             *batch, *extra], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            httpx.get(url + "/models").raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit("the server exited while starting")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 10 minutes")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  temperature=0, max_tokens=max_tokens, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    first, last = first or time.perf_counter(), last or time.perf_counter()
    return {"ttft": first - start, "per_token": (last - first) / max(1, tokens - 1), "tokens": tokens,
            "total": time.perf_counter() - start}


async def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    jobs = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait((models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]))
    results, failures = [], []

    async def worker():
        while not jobs.empty():
            model, question = jobs.get_nowait()
            try:
                results.append(await one(client, model, question, max_tokens))
            except Exception as e:  # counted, not raised: the run reports how many failed
                failures.append(repr(e))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    stats = httpx.get(url + "/stats").json()

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    ttft, per_token = [r["ttft"] for r in results], [r["per_token"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": requests, "failed": len(failures), "failures": failures[:3], "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "per_token_p50_s": pct(per_token, 0.5), "per_token_p99_s": pct(per_token, 0.99),
            "mean_batch": stats["mean_batch"], "largest_batch": stats["largest_batch"],
            "median_tokens": statistics.median(r["tokens"] for r in results) if results else 0}


def same_as_ask(url: str, folder: Path, models: list[str], max_tokens: int) -> dict[str, bool]:
    """Per document, whether the server's greedy chat answer to the first question is `nectar.ask`'s (fp32, the
    server's default dtype), on a model loaded here."""
    import nectar
    from nectar.manifest import model_name

    client, same, loaded = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600), {}, {}
    for name in models:
        artifact = nectar.Artifact.load(folder / f"{name}.nectar")
        name_of_model = model_name(artifact.manifest)
        if name_of_model not in loaded:
            loaded[name_of_model] = nectar.load_model(name_of_model, dtype="float32")
        model, tokenizer = loaded[name_of_model]
        served = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                temperature=0, max_tokens=max_tokens).choices[0].message.content
        same[name] = served == nectar.ask(model, tokenizer, artifact, [QUESTIONS[0]], max_new_tokens=max_tokens)[0]
        print(f"{name}: served answer {'is' if same[name] else 'is NOT'} nectar ask's: {served[:60]!r}", flush=True)
    return same


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def memory(artifact: Path, copies: int, extra: list[str]) -> dict:
    """RSS of a server holding `copies` compiled documents, against one holding a single one."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from nectar.artifact import Artifact

    a = Artifact.load(artifact)
    rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, copies):
            folder = Path(tmp) / str(count)
            folder.mkdir()
            for i in range(count):
                shutil.copy(artifact, folder / f"doc{i:03d}.nectar")
            proc, url = start(folder, 1, extra)
            assert len(httpx.get(url + "/models").json()["data"]) == count
            rss[count] = peak_rss_mb(proc.pid)
            stop(proc)
    return {"copies": copies, "document_tokens": a.n, "rss_one_mb": rss[1], "rss_all_mb": rss[copies],
            "per_document_mb": (rss[copies] - rss[1]) / (copies - 1), "artifact_mb": artifact.stat().st_size / 2**20,
            "full_kv_cache_mb_each": a.kv_bytes() / 2**20, "full_kv_caches_mb": copies * a.kv_bytes() / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of compiled documents (or, with --memory, one artifact)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--memory", type=int, default=0, help="load this many copies of the artifact instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="serve this model's documents of a folder that holds several models'")
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    p.add_argument("--same-as-ask", action="store_true", help="first check each document's greedy answer against "
                   "nectar ask's")
    args = p.parse_args()
    extra = ["--device", args.device] + (["--model", args.model] if args.model else [])
    if args.memory:
        report = memory(args.folder, args.memory, extra)
    else:
        report = {}
        for batch in args.max_batch:
            proc, url = start(args.folder, batch, extra)
            models = [m["id"] for m in httpx.get(url + "/models").json()["data"]]
            same = same_as_ask(url, args.folder, models, args.max_tokens) if args.same_as_ask else None
            row = asyncio.run(load(url, models, args.clients, args.requests, args.max_tokens))
            row["same_as_ask"] = same
            row.update(documents=len(models), clients=args.clients, peak_rss_mb=peak_rss_mb(proc.pid),
                       exit_code=stop(proc))
            report[f"max_batch={batch}"] = row
            print(json.dumps({f"max_batch={batch}": row}, indent=1), flush=True)
        if len(args.max_batch) == 2:
            a, b = (report[f"max_batch={m}"]["tokens_per_s"] for m in args.max_batch)
            report["throughput_ratio"] = a / b
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
