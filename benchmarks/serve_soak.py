"""Soak `nectar serve`: many streaming clients for many minutes, with cancellations, malformed requests,
and artifacts added and removed (POST /v1/reload) while it runs.

    python benchmarks/serve_soak.py A.nectar B.nectar --extra C.nectar --minutes 10 --clients 64 --out soak

The server is the real CLI in a subprocess. Each client loops: a streamed chat request about one of the
documents (a fifth cancelled after a few chunks), or, one time in ten, a malformed request that must get a
4xx. Every --reload-every seconds the extra artifact is copied into (or removed from) the served folder and
/v1/reload called. A failure is a well-formed request that does not end in a 200 with a finish reason (a
404 for the extra document while it is away is expected), or any 5xx. Writes soak.json and soak.png:
failures, p50/p99 latency of completed answers and the server's RSS, per minute.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve_load import start, stop  # benchmarks/ is on the path when this script runs

QUESTIONS = ["What does this document say about errors?", "Summarise the first section.", "What is a module?",
             "How do I use the main statement it describes?", "List three terms it defines.", "Why?",
             "What does the assert statement do?", "Explain the for loop.", "What is a keyword argument?"]
MALFORMED = [b"{", b"[]", json.dumps({"model": "a"}).encode(), json.dumps({"messages": "hi", "model": 3}).encode(),
             json.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).encode(),
             json.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, url: str, names: list[str], extra: str | None, deadline: float):
        self.url, self.names, self.extra, self.deadline = url, names, extra, deadline
        self.extra_present = False
        self.records: list[dict] = []  # one per request: t, kind, latency, ok, reason

    def record(self, start: float, kind: str, ok: bool, reason: str = "") -> None:
        self.records.append({"t": start, "kind": kind, "latency": time.time() - start, "ok": ok, "reason": reason})

    async def client(self, http: httpx.AsyncClient, seed: int, delay: float = 0.0) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(delay)  # clients arrive over the ramp, as users do, not in one burst
        while time.time() < self.deadline:
            if rng.random() < 0.1:
                await self.malformed(http, rng)
            else:
                await self.ask(http, rng)

    async def malformed(self, http, rng) -> None:
        start = time.time()
        try:
            r = await http.post("/chat/completions", content=rng.choice(MALFORMED),
                                headers={"content-type": "application/json"})
            self.record(start, "malformed", 400 <= r.status_code < 500, f"status {r.status_code}")
        except httpx.HTTPError as e:
            self.record(start, "malformed", False, f"{type(e).__name__}: {e}")

    async def ask(self, http, rng) -> None:
        extra = self.extra and rng.random() < 0.1
        name = self.extra if extra else rng.choice(self.names)
        cancel_after = rng.randint(1, 4) if rng.random() < 0.2 else None
        body = {"model": name, "stream": True, "max_tokens": rng.randint(8, 48), "temperature": rng.choice([0, 0.7]),
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
        start, chunks, finish = time.time(), 0, None
        try:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    expected = extra and r.status_code == 404  # the extra document may be away
                    self.record(start, "absent" if expected else "answer", expected, f"status {r.status_code}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    finish = choices[0].get("finish_reason") or finish
                    if cancel_after and chunks >= cancel_after:
                        self.record(start, "cancelled", True)
                        return  # leaving the block closes the stream mid-answer
            self.record(start, "answer", finish in ("stop", "length"), f"finish {finish}")
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self.record(start, "answer", False, f"{type(e).__name__}: {e}")

    async def reloader(self, http, folder: Path, extra_path: Path | None, every: float) -> None:
        while extra_path and time.time() + every < self.deadline:
            await asyncio.sleep(every)
            target = folder / extra_path.name
            if self.extra_present:
                target.unlink()
            else:
                shutil.copy(extra_path, target)
            self.extra_present = not self.extra_present
            start = time.time()
            r = await http.post("/reload")
            self.record(start, "reload", r.status_code == 200, f"status {r.status_code}")


async def sample_rss(pid: int, deadline: float, out: list) -> None:
    start = time.time()
    while time.time() < deadline:
        out.append((time.time() - start, rss_mb(pid)))
        await asyncio.sleep(1.0)


def per_minute(records: list[dict], t0: float) -> list[dict]:
    rows = {}
    for r in records:
        rows.setdefault(int((r["t"] - t0) // 60), []).append(r)
    out = []
    for minute, rs in sorted(rows.items()):
        done = sorted(r["latency"] for r in rs if r["kind"] == "answer" and r["ok"])
        out.append({"minute": minute + 1, "requests": len(rs), "failed": sum(not r["ok"] for r in rs),
                    "answers": len(done), "p50_s": statistics.median(done) if done else None,
                    "p99_s": done[min(len(done) - 1, int(0.99 * len(done)))] if done else None})
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["minutes"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    minutes = [r["minute"] for r in rows]
    a.plot(minutes, [r["p50_s"] for r in rows], "o-", label="p50")
    a.plot(minutes, [r["p99_s"] for r in rows], "s-", label="p99")
    a.set(xlabel="minute", ylabel="answer latency (s)", title=f"{report['clients']} streaming clients")
    a.legend()
    t, rss = zip(*report["rss"])
    b.plot([x / 60 for x in t], rss)
    b.set(xlabel="minute", ylabel="server RSS (MB)", title=f"failed well-formed requests: {report['failed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--extra", help="an artifact added and removed during the run")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--ramp", type=float, default=30.0, help="seconds over which the clients arrive")
    p.add_argument("--reload-every", type=float, default=60)
    p.add_argument("--out", default="soak")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    for a in args.artifacts:
        shutil.copy(a, folder)
    proc, url = start(folder, None, ["--dtype", args.dtype])
    try:
        names = [Path(a).stem for a in args.artifacts]
        deadline = time.time() + args.minutes * 60
        soak = Soak(url, names, Path(args.extra).stem if args.extra else None, deadline)
        rss: list = []

        async def run():
            limits = httpx.Limits(max_connections=args.clients + 4)
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
                await asyncio.gather(sample_rss(proc.pid, deadline, rss),
                                     soak.reloader(http, folder, Path(args.extra) if args.extra else None,
                                                   args.reload_every),
                                     *(soak.client(http, seed, seed * args.ramp / args.clients) for seed in range(args.clients)))

        t0 = time.time()
        asyncio.run(run())
        alive = proc.poll() is None
    finally:
        stop(proc)
        shutil.rmtree(folder, ignore_errors=True)
    failures = [r for r in soak.records if not r["ok"]]
    minutes = per_minute(soak.records, t0)
    warm = [m for _, m in rss if _ >= 60] or [m for _, m in rss]
    report = {"clients": args.clients, "minutes_run": args.minutes, "requests": len(soak.records),
              "failed": len(failures), "failures": failures[:20], "server_alive_at_end": alive,
              "kinds": {k: sum(r["kind"] == k for r in soak.records) for k in
                        ("answer", "cancelled", "malformed", "absent", "reload")},
              "rss_after_warmup_mb": warm[0], "rss_end_mb": warm[-1], "rss_growth": warm[-1] / warm[0] - 1,
              "minutes": minutes, "rss": rss}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "soak.png")
    print(f"{len(soak.records)} requests, {len(failures)} failed; kinds {report['kinds']}; server alive: {alive}")
    print(f"RSS after warm-up {warm[0]:.0f} MB -> end {warm[-1]:.0f} MB ({report['rss_growth']:+.1%})")
    print("minute  requests  failed  answers  p50 s  p99 s")
    for m in minutes:
        p50 = f"{m['p50_s']:.2f}" if m["p50_s"] is not None else "-"
        p99 = f"{m['p99_s']:.2f}" if m["p99_s"] is not None else "-"
        print(f"{m['minute']:>6}  {m['requests']:>8}  {m['failed']:>6}  {m['answers']:>7}  {p50:>5}  {p99:>5}")
    for f in failures[:5]:
        print("failure:", f)
    print(f"wrote {out / 'soak.json'}, {out / 'soak.png'}")


if __name__ == "__main__":
    main()
