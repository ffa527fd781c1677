"""Tiny random-weight models built in code, a tokenizer trained in code, and one shared compiled artifact."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nectar
from nectar.cli.main import main

FAST = nectar.CompileConfig(
    prompts=nectar.PromptConfig(recall=12, self_study=4, generic=6, direct=0, chunk_tokens=64, answer_tokens=12),
    fit=nectar.FitConfig(steps=60, eval_every=20),
    onpolicy_steps=20,
    onpolicy_rounds=1,
    refine_steps=0,  # refinement has tests of its own
    allocation="uniform",  # the per-layer allocations and exact tokens have tests of their own
    exact_share=0.0,
)

# A compile from the CLI in seconds on the tiny model.
QUICK_CLI = ["--set", "fit.steps=30", "--set", "prompts=12", "--set", "onpolicy_steps=10"]

def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random-weight Llama with GQA and RoPE, small enough for CPU tests in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{
        **dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0, pad_token_id=0,
               bos_token_id=1, eos_token_id=2),
        **overrides,
    })
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform attention; sharper weights make the checks meaningful.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@pytest.fixture
def model():
    return tiny_llama()


def tiny_tokenizer():
    """A byte-level BPE with 300 ids (the tiny model's vocabulary), trained in code on CPython's help text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = "\n".join(list(topics.values())[:40])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def sample_document(chars: int = 3000) -> str:
    from pydoc_data.topics import topics

    return topics["assert"][:chars] + "\n" + topics["if"][:chars]


@pytest.fixture(scope="session")
def compiled(tokenizer):
    """(tiny model, its artifact): one compile shared by every test that only reads an artifact."""
    model = tiny_llama()
    return model, nectar.compile(model, tokenizer, sample_document(1500), FAST)


@pytest.fixture(scope="session")
def saved(compiled, tmp_path_factory):
    """The shared artifact on disk (read-only: a test that changes the file copies it first)."""
    return compiled[1].save(tmp_path_factory.mktemp("artifact") / "a.nectar")


@pytest.fixture
def doc(tmp_path):
    """A 1500-character document file."""
    path = tmp_path / "doc.txt"
    path.write_text(sample_document(1500))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command loads a model: its arguments should have been refused first."""
    def load(*args, **kwargs):
        pytest.fail("loaded a model before checking the arguments")
    monkeypatch.setattr("nectar.cli.commands._load", load)


@pytest.fixture
def cli_model(monkeypatch, compiled, tokenizer):
    """`nectar`'s CLI loads the tiny model of the shared artifact instead of a real one."""
    model = compiled[0]
    monkeypatch.setattr("nectar.cli.commands._load", lambda name, dtype, device="auto": (model, tokenizer))
    return model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `nectar ARGV`, with whatever was printed before dropped."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit (--help, or a bad flag)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_one_line_error(result, pattern: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("nectar: error:"), err
    assert pattern in err, err


def assert_same_logits(model, tokenizer, loaded, original) -> None:
    """A loaded artifact answers like the one saved (up to the fp16 rounding of stored weights)."""
    ids = torch.randint(3, 300, (1, 6), device=model.device)
    pos = original.n + torch.arange(6, device=model.device)[None]
    logits = []
    for art in (loaded, original):
        with nectar.attach(model, art, tokenizer):
            logits.append(model(input_ids=ids, position_ids=pos).logits)
    torch.testing.assert_close(*logits, atol=1e-2, rtol=1e-2)


def full_logits(model, doc, prompt):
    """Logits of `prompt` after `doc` with transformers' own attention and no nectar in the way."""
    return model(input_ids=torch.cat([doc, prompt]).view(1, -1)).logits[0, len(doc):]


# The device axis of parametrised tests: the GPU runs where torch sees one, and is skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@torch.no_grad()
def assert_replay_matches_eager(model, art, provider, switch: str, device="cpu", tol=1e-5) -> None:
    """Greedy decode on `art` with each layer's document step replayed (CUDA graphs, CPU traces) equals it
    eager (`provider`'s `switch` attribute turned off), replays one graph per layer, and makes none again."""
    from nectar.model.padding import positions_after
    from nectar.providers.graphs import forget, graphs_for

    bound_provider = art.providers(model)[0]
    forget(bound_provider)  # other tests on this artifact made their own shapes
    ids = torch.randint(3, 300, (2, 6), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def decode():
        with nectar.attach(model, art):
            out = model.generate(input_ids=ids, attention_mask=mask, position_ids=positions_after(art.n, mask),
                                 max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    setattr(provider, switch, False)
    try:
        eager_tokens, eager_logits = decode()
        assert not graphs_for(bound_provider).graphs
    finally:
        delattr(provider, switch)
    tokens, logits = decode()
    made = len(graphs_for(bound_provider).graphs)
    assert made == model.config.num_hidden_layers  # one shape (batch 2, one query) per layer
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, atol=tol, rtol=tol)
    decode()
    assert len(graphs_for(bound_provider).graphs) == made  # replayed, not made again
