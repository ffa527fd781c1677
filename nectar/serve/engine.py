"""Continuous batching across compiled documents: requests join and leave one shared decode batch.

Every step feeds one token per active row, whatever document each row asks about: `RowBanks` gives
each row its own document's modules, and the local KV cache (sink tokens, prompt, answer so far) is
one left-padded batch. A new request is prefilled alone, then joins between steps; a finished or
cancelled one leaves. The engine runs in its own thread and reports through each request's `emit`.

On a model with sliding-window layers the sink tokens cannot share that cache (a sliding layer must not
see them): `RowSinks` gives each row its own document's sinks and sliding-window tails instead.
"""
from __future__ import annotations

import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import DynamicCache

from ..artifact import Artifact
from ..model.models import layer_windows
from ..providers.attention import ExactContext
from ..runtime.binding import bound, generation_inputs
from ..runtime.decode import stop_ids
from .rowbanks import RowBanks
from .rowsinks import RowSinks


# Logits divided by a smaller temperature overflow fp32 into inf and NaN probabilities; sampling this cold is
# greedy decoding anyway.
GREEDY_BELOW = 1e-4

@dataclass
class Delta:
    """What one step added to a request's answer; `finish` is set on its last delta."""

    text: str
    tokens: int  # answer tokens so far
    finish: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass
class Request:
    artifact: Artifact  # the compiled document asked about
    prompt: list[int]  # token ids after the document
    max_tokens: int
    emit: Callable[[Delta], None]  # called from the engine's thread
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: bool = False  # set by the caller (a client left); the row leaves at the next step


class AnswerText:
    """Incremental detokenization whose deltas add up to `decode(ids).strip()` cut at the first stop
    string: the same text a non-streamed answer (or `nectar ask`) gives. Text that may still turn into
    a stop string, trailing blanks and half-decoded characters are held back until they are settled."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new settled text, whether a stop string was reached)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cuts = [full.index(s) for s in self.stops if s in full]
        if cuts:
            return self._advance(full[: min(cuts)].rstrip()), True
        settled = full.rstrip().rstrip("\ufffd")
        held = max((k for s in self.stops for k in range(1, len(s)) if settled.endswith(s[:k])), default=0)
        return self._advance(settled[: len(settled) - held].rstrip()), False

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return self._advance(full)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # an earlier character is still being decoded differently: wait for it to settle
        delta, self.sent = text[len(self.sent):], text
        return delta


@dataclass
class _Row:
    request: Request
    provider: object
    sinks: ExactContext
    position: int  # position id of the next token fed
    text: AnswerText
    generator: torch.Generator | None
    last: int = -1
    tokens: int = 0


@dataclass
class Stats:
    steps: int = 0
    rows: int = 0  # summed over steps: rows / steps is the mean batch
    prefills: int = 0
    largest: int = 0


class Engine:
    """One model, one decode batch, any number of compiled documents."""

    def __init__(self, model, tokenizer, max_batch: int = 32):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.window = model.config.max_position_embeddings
        self.stops = set(stop_ids(tokenizer))
        self.banks = RowBanks()
        windows = layer_windows(model.config)
        self.sinks = RowSinks(windows) if any(windows) else None  # else the sinks sit in the cache
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # [rows, columns]: 1 where a column holds one of the row's tokens
        self.stats = Stats()
        self._waiting: deque[Request] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the caller's side (any thread) --

    def submit(self, request: Request) -> None:
        self._waiting.append(request)
        self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="nectar-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish nothing more: every request still waiting or decoding ends as cancelled."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for request in list(self._waiting) + [row.request for row in self.rows]:
            request.emit(Delta("", 0, "cancelled"))
        self._waiting.clear()
        self.rows, self.cache, self.mask = [], None, None

    # -- the engine's thread --

    def bound(self):
        """The model bound to the batch's documents: what `step` runs inside."""
        return bound(self.model, self.banks, self.sinks)

    def _loop(self) -> None:
        with self.bound(), torch.no_grad():
            while not self._closing:
                if not self.step():
                    self._wake.wait(0.1)
                    self._wake.clear()

    def step(self) -> bool:
        """Admit waiting requests, then decode one token for every row; False when there was nothing to do."""
        self._admit()
        self._drop([i for i, row in enumerate(self.rows) if row.request.cancelled])
        if not self.rows:
            return False
        try:
            self._decode()
        except Exception as e:  # a failed step ends its rows, never the server
            traceback.print_exc()
            for row in self.rows:
                row.request.emit(Delta("", row.tokens, "error", f"decoding failed: {e}"))
            self.rows, self.cache, self.mask = [], None, None
        return True

    def _admit(self) -> None:
        while self._waiting and len(self.rows) < self.max_batch:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            try:
                self._prefill(request)
            except Exception as e:
                traceback.print_exc()
                request.emit(Delta("", 0, "error", f"prefill failed: {e}"))

    def _prefill(self, request: Request) -> None:
        artifact = request.artifact
        provider, sinks = artifact.providers(self.model)
        logits, cache = self.first_logits(artifact, request.prompt)
        self.stats.prefills += 1
        generator = None
        if request.temperature >= GREEDY_BELOW:
            generator = torch.Generator()
            # Any integer is a seed (OpenAI's API bounds none); the generator takes 64 bits of it.
            generator.manual_seed(request.seed % 2**64 if request.seed is not None else int(torch.randint(2**62, ())))
        row = _Row(request, provider, sinks, artifact.n + len(request.prompt),
                   AnswerText(self.tokenizer, request.stop), generator)
        if self._advance(row, self._sample(row, logits)):
            self._join(row, cache)

    def first_logits(self, artifact, prompt: list[int]) -> tuple[Tensor, DynamicCache]:
        """The prompt's last logits after the document, and its local cache (sink tokens, then the prompt)."""
        provider, sinks = artifact.providers(self.model)
        ids = torch.tensor([prompt])
        inputs = generation_inputs(self.model, ids, torch.ones_like(ids), artifact.n,
                                   None if self.sinks else sinks)
        cache = inputs.get("past_key_values")
        cached = 0 if cache is None else cache.get_seq_length()  # the sinks: in the cache, not fed again
        if self.sinks is not None:
            # Every layer keeps every local token (the sliding mask, not the cache, bounds what a layer sees),
            # so that rows join and leave one cache whose columns mean the same in all layers.
            cache = DynamicCache()
            self.sinks.select([sinks])
        self.banks.select([provider])
        out = self.model(input_ids=inputs["input_ids"][:, cached:], position_ids=inputs["position_ids"][:, cached:],
                         attention_mask=inputs["attention_mask"], past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    def _decode(self) -> None:
        self.banks.select([row.provider for row in self.rows])
        if self.sinks is not None:
            self.sinks.select([row.sinks for row in self.rows])
        ids = torch.tensor([[row.last] for row in self.rows])
        positions = torch.tensor([[row.position] for row in self.rows])
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        device = self.model.device
        out = self.model(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True)
        self.mask = mask
        self.stats.steps += 1
        self.stats.rows += len(self.rows)
        self.stats.largest = max(self.stats.largest, len(self.rows))
        logits = out.logits[:, -1]
        done = []
        for i, row in enumerate(self.rows):
            row.position += 1
            if not self._advance(row, self._sample(row, logits[i])):
                done.append(i)
        self._drop(done)

    def _sample(self, row: _Row, logits: Tensor) -> int:
        if row.generator is None:
            return int(logits.argmax())
        probs = F.softmax(logits.float().cpu() / row.request.temperature, dim=-1)
        if row.request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= row.request.top_p  # keep the smallest head
            sorted_probs[outside] = 0
            return int(order[torch.multinomial(sorted_probs, 1, generator=row.generator)])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> bool:
        """Record the row's new token and emit its text; False once the row is finished."""
        row.tokens += 1
        row.last = token
        request, finish = row.request, None
        if token in self.stops:
            text, finish = row.text.finish(), "stop"
        else:
            text, stopped = row.text.push(token)
            if stopped:
                finish = "stop"
            elif row.tokens >= request.max_tokens or row.position + 1 >= self.window:
                text, finish = text + row.text.finish(), "length"
        request.emit(Delta(text, row.tokens, finish))
        return finish is None

    def _join(self, row: _Row, cache: DynamicCache) -> None:
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.long, device=self.model.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(length, self.mask.shape[1])
            for mine, new in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(new.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(new.values, width)])
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows.append(row)

    def _drop(self, rows: list[int]) -> None:
        """Rows leave the batch; columns that no remaining row uses are cut off its left edge."""
        if not rows:
            return
        leaving = set(rows)
        keep = [i for i in range(len(self.rows)) if i not in leaving]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        unused = int((self.mask[index].cumsum(1) == 0).sum(1).min())
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, unused:]
            layer.values = layer.values[index, :, unused:]
        self.mask = self.mask[index, unused:]


def _pad_left(x: Tensor, width: int) -> Tensor:
    """Zero columns in front of the token axis (-2 for keys and values, -1 for a mask) up to `width`."""
    axis = -1 if x.dim() == 2 else -2
    missing = width - x.shape[axis]
    if missing == 0:
        return x
    pad = (missing, 0) if axis == -1 else (0, 0, missing, 0)
    return F.pad(x, pad)
