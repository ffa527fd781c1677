"""Training prompts: the questions a user might ask after the document, in the user's own layout.

Four kinds, each tied to one chunk of the document, so that validation can hold out whole chunks:
- recall: quote or continue a span, answered with the document's own next tokens (teacher-forced);
- self-study: a question the model writes itself about the chunk (answered later with the full cache);
- generic: summarise / explain / list about a term that occurs in the chunk (answered likewise);
- direct: a short question about such a term, worded as a person asks it (answered likewise).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from ..providers.attention import ExactContext, NoContext
from ..config import CompileConfig, PromptConfig
from ..runtime.decode import generate_ids
from ..model.templates import chat, encode, question_ids

RECALL = (
    'Continue the text that follows "{cue}" in the document.',
    'Quote the passage of the document that begins with "{cue}".',
    'What does the document say right after "{cue}"?',
    'Find "{cue}" in the document and repeat what comes next.',
)
GENERIC = (
    'Summarise what the document says about "{term}".',
    'Explain what "{term}" means in the document.',
    'List the main points the document makes about "{term}".',
    'How is "{term}" used, according to the document?',
    'Give an example of "{term}" from the document.',
)
DIRECT = (
    "What is {term}?",
    "What does {term} mean?",
    "How does {term} work?",
    "When does {term} apply?",
    "What happens with {term}?",
    "Can you explain {term}?",
    "What are the rules for {term}?",
    "Why does the document mention {term}?",
)
STUDY_REQUEST = (
    "{chunk}\n\nWrite one question that the text above answers. Reply with the question only."
)
STOPWORDS = set("this that with from have will when which there their these those into than then they them "
                "been were what where also only other such some more most must should would could return "
                "value values none true false used uses using given each".split())


@dataclass
class Prompt:
    """A question after the document and its answer, in token ids once templated and answered."""

    kind: str  # recall, self_study, generic (training) or user (a user's own question)
    question: str
    chunk: int | None = None  # the document chunk it is about, for the train/validation split
    answer_ids: list[int] | None = None  # None until answered (teacher-forced for recall)
    question_ids: list[int] | None = None  # the question in the user's layout, once templated

    @property
    def ids(self) -> list[int]:
        return self.question_ids + self.answer_ids


def chunk_bounds(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    starts = list(range(0, n, chunk_tokens))
    bounds = [(s, min(s + chunk_tokens, n)) for s in starts]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < chunk_tokens // 2:
        bounds[-2:] = [(bounds[-2][0], n)]  # fold a short tail into its neighbour
    return bounds


def split_chunks(num_chunks: int, val_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(num_chunks))
    rng.shuffle(order)
    num_val = max(1, round(num_chunks * val_fraction)) if num_chunks > 1 else 0
    return sorted(order[num_val:]), sorted(order[:num_val])


def split_prompts(prompts: list[Prompt], val_fraction: float, rng: random.Random) -> list[int]:
    """Indices of `val_fraction` of each kind's prompts, drawn at random but never a chunk's last training
    prompt: every kind is validated and every chunk trained on."""
    quota = {kind: max(1, round(count * val_fraction)) if count > 1 else 0
             for kind, count in Counter(p.kind for p in prompts).items()}
    left = Counter(p.chunk for p in prompts)  # training prompts each chunk still has
    order = list(range(len(prompts)))
    rng.shuffle(order)
    held = []
    for i in order:
        kind, chunk = prompts[i].kind, prompts[i].chunk
        if quota[kind] and left[chunk] > 1:
            quota[kind], left[chunk] = quota[kind] - 1, left[chunk] - 1
            held.append(i)
    return sorted(held)


def held_out(prompts: list[Prompt], n: int, config: PromptConfig, rng: random.Random) -> set[int]:
    """Indices of the validation prompts: those about whole held-out chunks (generalisation to unseen
    text), or a share of each kind at random (to unseen questions about text that trains)."""
    if config.holdout == "prompts":
        return set(split_prompts(prompts, config.val_fraction, rng))
    chunks = set(split_chunks(len(chunk_bounds(n, config.chunk_tokens)), config.val_fraction, rng)[1])
    return {i for i, p in enumerate(prompts) if p.chunk in chunks}


def _decode(tokenizer, ids) -> str:
    # Without clean-up, decoded text keeps the spaces the ids had (`sed 's/` does not become `sed's/`).
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False, skip_special_tokens=True)


def recall_prompt(doc_ids, bounds, chunk, tokenizer, config: PromptConfig, rng: random.Random) -> Prompt:
    start, end = bounds[chunk]
    cue_len = rng.randint(8, 16)
    answer_len = min(config.answer_tokens, max(1, end - start - cue_len))
    at = rng.randint(start, max(start, end - cue_len - answer_len))
    cue = " ".join(_decode(tokenizer, doc_ids[at: at + cue_len]).split())
    answer = list(doc_ids[at + cue_len: at + cue_len + answer_len])
    return Prompt("recall", rng.choice(RECALL).format(cue=cue), chunk, answer)


def salient_terms(text: str) -> list[str]:
    words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_.]{3,}", text) if w.lower() not in STOPWORDS]
    return [w for w, _ in Counter(words).most_common(8)]


def generic_prompt(chunk_text: str, chunk: int, rng: random.Random, kind: str = "generic") -> Prompt:
    terms = salient_terms(chunk_text) or [" ".join(chunk_text.split()[:4])]
    templates = GENERIC if kind == "generic" else DIRECT
    return Prompt(kind, rng.choice(templates).format(term=rng.choice(terms)), chunk)


def study_request(chunk_text: str) -> str:
    return STUDY_REQUEST.format(chunk=chunk_text.strip())


def clean_question(generated: str) -> str | None:
    """First line of what the model wrote, if it looks like a question at all."""
    line = next((ln.strip() for ln in generated.splitlines() if ln.strip()), "")
    line = re.sub(r"^(question|q)\s*[:.]\s*", "", line, flags=re.IGNORECASE)
    return line if len(line.split()) >= 3 else None


def plan(doc_ids: list[int], tokenizer, config: PromptConfig, seed: int) -> tuple[list[Prompt], list[str], list[int]]:
    """Recall and generic prompts, plus (study requests, their chunks) for the model to turn into questions.

    Chunks are drawn round-robin over a shuffled order so that every part of the document is covered.
    """
    rng = random.Random(seed)
    bounds = chunk_bounds(len(doc_ids), config.chunk_tokens)
    texts = [_decode(tokenizer, doc_ids[s:e]) for s, e in bounds]
    cycle = _round_robin(len(bounds), rng)
    prompts = [recall_prompt(doc_ids, bounds, next(cycle), tokenizer, config, rng) for _ in range(config.recall)]
    for _ in range(config.generic):
        chunk = next(cycle)
        prompts.append(generic_prompt(texts[chunk], chunk, rng))
    for _ in range(config.direct):
        chunk = next(cycle)
        prompts.append(generic_prompt(texts[chunk], chunk, rng, "direct"))
    study_chunks = [next(cycle) for _ in range(config.self_study)]
    return prompts, [study_request(texts[c]) for c in study_chunks], study_chunks


def _round_robin(count: int, rng: random.Random):
    while True:
        order = list(range(count))
        rng.shuffle(order)
        yield from order


def build_prompts(model, tokenizer, doc_ids, full: ExactContext, templates, config: CompileConfig) -> list[Prompt]:
    """Training prompts of every kind, each templated and with teacher-forcing answer ids."""
    prompts, requests, chunks = plan(doc_ids, tokenizer, config.prompts, config.seed)
    if requests:
        written = generate_ids(model, tokenizer, [encode(tokenizer, chat(tokenizer, r, "\n")) for r in requests], 0,
                               NoContext(), max_new_tokens=40, sample=True, batch_size=config.generate_batch,
                               desc="write questions")
        for chunk, ids in zip(chunks, written):
            question = clean_question(tokenizer.decode(ids, skip_special_tokens=True))
            if question:
                prompts.append(Prompt("self_study", question, chunk))
    for p in prompts:
        p.question_ids = question_ids(tokenizer, templates["question"], p.question)
    open_ = [p for p in prompts if p.answer_ids is None]
    answers = generate_ids(model, tokenizer, [p.question_ids for p in open_], len(doc_ids), full,
                           max_new_tokens=config.prompts.answer_tokens, batch_size=config.generate_batch,
                           desc="answer with full cache")
    for prompt, answer in zip(open_, answers):
        prompt.answer_ids = answer
    return [p for p in prompts if p.answer_ids]
