"""`nectar serve` on a tiny model: the real `openai` client against a live server on 127.0.0.1."""
import copy
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import nectar
from nectar.runtime.binding import bound
from nectar.serve.engine import Engine, Request
from nectar.serve.rowbanks import RowBanks
from nectar.serve.server import Library, ServeConfig, create_app
from nectar.model.templates import question_ids

from conftest import FAST, sample_document, tiny_llama

pytestmark = pytest.mark.integration  # servers, Ray, subprocesses or multi-compile workflows: make test, not test-fast

QUESTIONS = ["What does assert do?", "When does the else branch of an if statement run?"]
ANSWER = 12  # tokens


@pytest.fixture(scope="module")
def second(compiled, tokenizer):
    """A second document compiled for the same tiny model, at another budget (so other module widths)."""
    from pydoc_data.topics import topics

    model = compiled[0]
    config = FAST.__class__(**{**FAST.__dict__, "budget": 0.05})
    return nectar.compile(model, tokenizer, topics["while"][:1500] + topics["for"][:800], config)


@pytest.fixture(scope="module")
def folder(compiled, second, tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    compiled[1].save(path / "alpha.nectar")
    second.save(path / "beta.nectar")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A server in a thread of this process, on a free loopback port."""

    def __init__(self, model, tokenizer, paths, **config):
        # Its own copy of the model: the engine binds the model's attention for as long as it runs, and
        # the tests' reference answers (`nectar.ask`) bind and unbind the original.
        model = copy.deepcopy(model)
        self.config = ServeConfig(port=_free_port(), **config)
        self.library = Library(paths, model, tokenizer)
        self.report = self.library.reload()
        self.engine = Engine(model, tokenizer, self.config.max_batch)
        app = create_app(self.engine, self.library, self.config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.config.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.config.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the test server did not start on port {self.config.port} within 60 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def live(compiled, tokenizer, folder):
    with Live(compiled[0], tokenizer, [folder], max_tokens=64) as server:
        yield server


def _ask(compiled, tokenizer, artifact, question, tokens=ANSWER) -> str:
    return nectar.ask(compiled[0], tokenizer, artifact, [question], max_new_tokens=tokens)[0]


def _chat(client, model, question, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=ANSWER, **kw)


def test_lists_every_compiled_document(live):
    ids = [m.id for m in live.client().models.list()]
    assert ids == ["alpha", "beta"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_answer_equals_nectar_ask(live, compiled, second, tokenizer, question):
    for name, artifact in (("alpha", compiled[1]), ("beta", second)):
        reply = _chat(live.client(), name, question)
        assert reply.choices[0].message.content == _ask(compiled, tokenizer, artifact, question)
        finish, tokens = reply.choices[0].finish_reason, reply.usage.completion_tokens
        assert (finish, tokens) == ("length", ANSWER) or (finish == "stop" and tokens <= ANSWER)


def test_streamed_text_equals_the_plain_answer(live):
    client = live.client()
    plain = _chat(client, "alpha", QUESTIONS[0]).choices[0].message.content
    chunks = list(_chat(client, "alpha", QUESTIONS[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_completions_endpoint_continues_raw_text(live, compiled, tokenizer):
    client = live.client()
    plain = client.completions.create(model="alpha", prompt="\nThe assert statement", max_tokens=8, temperature=0)
    streamed = client.completions.create(model="alpha", prompt="\nThe assert statement", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert plain.usage.completion_tokens <= 8


def test_same_seed_same_sample(live):
    client = live.client()
    kw = dict(model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8, temperature=1.0,
              top_p=0.9)
    first, again = (client.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2))
    assert first == again


def test_engine_prefill_is_the_attached_model_on_the_prompt_alone(compiled, tokenizer):
    """The sink tokens sit in the cache, not fed again as tokens: the logits are those of `attach`."""
    model, artifact = compiled
    prompt = [5, 17, 42, 99, 7]
    engine = Engine(model, tokenizer)
    with bound(model, engine.banks), torch.no_grad():
        logits, cache = engine.first_logits(artifact, prompt)
    with nectar.attach(model, artifact), torch.no_grad():
        want = model(input_ids=torch.tensor([prompt]), position_ids=artifact.n + torch.arange(5)[None]).logits[0, -1]
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == FAST.sink_tokens + len(prompt)


def test_two_documents_share_one_decode_batch(compiled, second, tokenizer):
    """Driven step by step: both rows sit in every decode step, and each answers as `nectar ask` does."""
    model = compiled[0]
    engine = Engine(model, tokenizer)
    texts = {0: [], 1: []}
    for i, artifact in enumerate((compiled[1], second)):
        prompt = question_ids(tokenizer, artifact.question_template, QUESTIONS[0])
        engine.submit(Request(artifact, prompt, ANSWER, lambda d, i=i: texts[i].append(d.text)))
    with bound(model, engine.banks), torch.no_grad():
        while engine.step():
            pass
    assert engine.stats.largest == 2 and engine.stats.prefills == 2
    assert "".join(texts[0]) == _ask(compiled, tokenizer, compiled[1], QUESTIONS[0])
    assert "".join(texts[1]) == _ask(compiled, tokenizer, second, QUESTIONS[0])


def test_concurrent_http_requests_across_documents(live, compiled, second, tokenizer):
    results = {}

    def run(name):
        results[name] = _chat(live.client(), name, QUESTIONS[1]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(name,)) for name in ("alpha", "beta", "alpha")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["alpha"] == _ask(compiled, tokenizer, compiled[1], QUESTIONS[1])
    assert results["beta"] == _ask(compiled, tokenizer, second, QUESTIONS[1])


def test_rowbanks_give_each_row_its_own_document(compiled, second):
    model = compiled[0]
    a, b = compiled[1].providers(model)[0], second.providers(model)[0]
    assert a.layers[0].shape() != b.layers[0].shape()
    q = torch.randn(3, 2, 1, 16)
    rows = RowBanks()
    rows.select([a, b, a])
    o, lse = rows(1, q)
    for i, bank in enumerate((a, b, a)):
        o_i, lse_i = bank(1, q[i:i + 1])
        torch.testing.assert_close(o[i:i + 1], o_i)
        torch.testing.assert_close(lse[i:i + 1], lse_i)


def _status(live, body, headers=None, path="/chat/completions"):
    r = httpx.post(live.url + path, content=body, headers={"content-type": "application/json", **(headers or {})})
    return r.status_code, r.json()


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, ""),
    (json.dumps({"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}), 404, "alpha, beta"),
    (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}), 400, "1..64"),
    (json.dumps({"model": "alpha", "messages": [{"role": "system", "content": "hi"}]}), 400, "user message"),
    (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi " * 2000}]}), 400, "window"),
    (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}), 400,
     "temperature"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(live, body, status, words):
    code, reply = _status(live, body)
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}
    assert words in reply["error"]["message"]
    assert _chat(live.client(), "alpha", "hi").choices[0].finish_reason in ("length", "stop")


def test_body_over_the_cap_is_refused(compiled, tokenizer, folder):
    with Live(compiled[0], tokenizer, [folder], max_body=200) as server:
        code, reply = _status(server, json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}]}))
        assert code == 413 and "cap" in reply["error"]["message"]


def test_api_key_is_required_when_set(compiled, tokenizer, folder):
    with Live(compiled[0], tokenizer, [folder], api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(server.url + "/models").status_code == 401
        assert [m.id for m in server.client("s3cret").models.list()] == ["alpha", "beta"]


def test_a_client_that_leaves_mid_stream_frees_its_row(compiled, tokenizer, folder):
    with Live(compiled[0], tokenizer, [folder], max_tokens=800) as server:
        stream = server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                         temperature=0, max_tokens=800, stream=True)
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
        deadline = time.time() + 20
        while server.engine.rows and time.time() < deadline:
            time.sleep(0.05)
        assert not server.engine.rows and server.engine.stats.steps < 700


def test_reload_serves_new_documents_and_skips_bad_ones(compiled, tokenizer, folder, tmp_path):
    shutil.copy(folder / "alpha.nectar", tmp_path / "one.nectar")
    (tmp_path / "broken.nectar").write_bytes(b"not an artifact")
    other = tiny_llama(seed=1)  # same shapes, other weights: an artifact of another model
    nectar.compile(other, tokenizer, "A short note about nothing in particular. " * 20, FAST).save(
        tmp_path / "foreign.nectar")
    with Live(compiled[0], tokenizer, [tmp_path]) as server:
        reasons = {Path(s["path"]).name: s["reason"] for s in server.report["skipped"]}
        assert set(reasons) == {"broken.nectar", "foreign.nectar"} and "compiled for model" in reasons["foreign.nectar"]
        assert [m.id for m in server.client().models.list()] == ["one"]
        shutil.copy(folder / "beta.nectar", tmp_path / "two.nectar")
        report = httpx.post(server.url + "/reload", content=b"", headers={"content-length": "0"}).json()
        assert report["loaded"] == ["two"] and [m.id for m in server.client().models.list()] == ["one", "two"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_server_with_exit_code_0(compiled, tokenizer, saved, tmp_path, stop):
    compiled[0].save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nectar.cli.main", "serve", str(saved), "--model", str(tmp_path / "tiny"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "a":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out


@pytest.mark.parametrize("stops, want", [
    ((), "The assert statement checks a condition. If not, it raises."),
    (("If not",), "The assert statement checks a condition."),
    (("zzz", "checks"), "The assert statement"),
])
def test_answer_text_deltas_add_up_to_the_stripped_text_cut_at_a_stop(tokenizer, stops, want):
    from nectar.serve.engine import AnswerText
    from nectar.model.templates import encode

    text = AnswerText(tokenizer, stops)
    parts, stopped = [], False
    for token in encode(tokenizer, "  The assert statement checks a condition. If not, it raises.  "):
        delta, stopped = text.push(token)
        parts.append(delta)
        if stopped:
            break
    if not stopped:
        parts.append(text.finish())
    assert "".join(parts) == want and stopped == bool(stops)


def test_a_taken_port_is_one_line_before_the_model_loads(saved, capsys):
    from conftest import assert_one_line_error, run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert_one_line_error(run_cli(capsys, "serve", saved, "--port", busy.getsockname()[1]), "pick another --port")


def test_uneven_exact_tokens_share_a_decode_batch_and_answer_as_ask(compiled, second, tokenizer):
    """Exact tokens allocated by layer ride beside the modules (the sinks stay in the cache)."""
    model = compiled[0]
    config = replace(FAST, allocation="gap", exact_share=0.3, probe_steps=10)
    uneven = nectar.compile(model, tokenizer, sample_document(1500), config)
    assert len({k.shape[1] for k in uneven.sinks.keys}) > 1
    engine = Engine(model, tokenizer)
    texts = {0: [], 1: []}
    for i, artifact in enumerate((uneven, second)):
        prompt = question_ids(tokenizer, artifact.question_template, QUESTIONS[1])
        engine.submit(Request(artifact, prompt, ANSWER, lambda d, i=i: texts[i].append(d.text)))
    with bound(model, engine.banks), torch.no_grad():
        while engine.step():
            pass
    assert engine.stats.largest == 2
    assert "".join(texts[0]) == _ask(compiled, tokenizer, uneven, QUESTIONS[1])
    assert "".join(texts[1]) == _ask(compiled, tokenizer, second, QUESTIONS[1])
