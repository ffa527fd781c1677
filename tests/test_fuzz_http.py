"""Fuzzing the HTTP API with Hypothesis: requests near the OpenAI schema (every field given odd values,
fields missing or extra), arbitrary JSON, and bytes that are not JSON, on every route. None gets a 5xx,
and the server answers a well-formed request afterwards.

NECTAR_FUZZ_EXAMPLES sets how many (default 100; the issue's bar ran 2,000).
"""
import copy
import json
import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from nectar.serve.engine import Engine
from nectar.serve.server import Library, ServeConfig, create_app

pytestmark = pytest.mark.integration  # a server (in this process)

EXAMPLES = int(os.environ.get("NECTAR_FUZZ_EXAMPLES", 100))
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/stats"), ("POST", "/v1/models"), ("GET", "/v1/chat/completions"), ("POST", "/v1/nothing"),
          ("DELETE", "/v1/completions")]

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4), max_leaves=12)
ODD = st.one_of(JSON, st.sampled_from([0, -1, 1, 2, 7, 8, 9, 10**9, 2**63, -2**63, 0.5, float("nan"), float("inf"),
                                       "", "alpha", "beta", "\x00", "🙂" * 50, [], {}, True]))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | ODD},
                                optional={"content": st.text(max_size=40) | ODD
                                          | st.lists(st.fixed_dictionaries({"type": st.just("text") | ODD,
                                                                            "text": st.text(max_size=20) | ODD}),
                                                     max_size=2)})
FIELDS = {"model": st.sampled_from(["alpha", "nope"]) | ODD, "max_tokens": st.integers(-3, 12) | ODD,
          "max_completion_tokens": st.integers(-3, 12) | ODD, "temperature": st.floats(-1, 3) | ODD,
          "top_p": st.floats(-1, 2) | ODD, "stop": st.lists(st.text(max_size=3), max_size=6) | ODD,
          "seed": st.integers(-2**70, 2**70) | ODD, "stream": st.booleans() | ODD, "n": st.integers(0, 3) | ODD,
          "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | ODD}) | ODD,
          "messages": st.lists(MESSAGE, max_size=3) | ODD, "prompt": st.text(max_size=60) | ODD}


@st.composite
def near_valid(draw, chat: bool) -> dict:
    """A valid chat or completion request, then some fields dropped, replaced by odd values, or added."""
    body = {"model": "alpha", "max_tokens": 4, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "Why?"}]} if chat else {"prompt": "Why"})
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(FIELDS[key])
    return body


@st.composite
def requests(draw) -> tuple[str, str, bytes, str]:
    """(method, path, body, content type): mostly near-valid bodies for the routes that decode."""
    method, path = draw(st.sampled_from(ROUTES + ROUTES[:2] * 3))
    near = near_valid(chat=draw(st.booleans()) if draw(st.integers(0, 5)) == 0 else path.endswith("chat/completions"))
    body = draw(st.one_of(near.map(json.dumps).map(str.encode), near.map(json.dumps).map(str.encode),
                          JSON.map(json.dumps).map(str.encode), st.binary(max_size=64)))
    kind = draw(st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded"]))
    return method, path, body, kind


@pytest.fixture(scope="module")
def client(compiled, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzed-server")
    compiled[1].save(folder / "alpha.nectar")
    model = copy.deepcopy(compiled[0])  # the engine binds its model's attention while it runs
    config = ServeConfig(max_tokens=8, max_body=4096)
    library = Library([folder], model, tokenizer)
    library.reload()
    with TestClient(create_app(Engine(model, tokenizer, config.max_batch), library, config),
                    raise_server_exceptions=False) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_no_request_gets_a_server_error(client, request):
    method, path, body, kind = request
    response = client.request(method, path, content=body, headers={"content-type": kind})
    assert response.status_code < 500, (response.status_code, response.text[:300])


def test_the_server_still_answers_after_the_fuzz(client):
    # Runs after the fuzz in file order; on its own it checks the fixture's server.
    response = client.post("/v1/chat/completions", json={"model": "alpha", "max_tokens": 3, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Why?"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_vanishing_temperature_decodes_greedily(client):
    """A temperature so small that logits / temperature overflow fp32 (the fuzz's first find) is greedy."""
    def answer(temperature):
        body = {"model": "alpha", "max_tokens": 4, "temperature": temperature, "seed": 2**70,
                "messages": [{"role": "user", "content": "Why?"}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert answer(4.7e-307) == answer(0)
