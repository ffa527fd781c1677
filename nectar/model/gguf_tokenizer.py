"""A SentencePiece-BPE tokenizer rebuilt from a GGUF file's vocabulary, for Gemma-family GGUFs.

transformers 5.2 reads such a vocabulary as a Unigram model, with no BOS, and splits "capital" into
"c ap it al": the model then answers junk. A GGUF holds the pieces, their scores and types, but no
merges. SentencePiece BPE merges pairs in the order of the merged piece's id, so the merges follow
from the vocabulary, as transformers' own SentencePiece converter derives them. Spaces are written
"▁" in the pieces, as in the text the normalizer hands to the BPE. On the ~113k tokens of
CPython's help topics this gives the ids of transformers 5.24's fixed reader, every one.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

SPACE = "\u2581"
CONTROL, USER_DEFINED = 3, 4  # SentencePiece piece types, as GGUF stores them


def spm_bpe_tokenizer(path: Path) -> PreTrainedTokenizerFast | None:
    """The rebuilt tokenizer, or None when the file's vocabulary is not a SentencePiece one with spaces in its
    pieces (Gemma's), which transformers reads right. The file is read once (about 10 s for 262k pieces)."""
    fields = GGUFReader(str(path)).fields
    raw = fields["tokenizer.ggml.tokens"].contents()
    if (fields["tokenizer.ggml.model"].contents() != "llama" or "tokenizer.ggml.merges" in fields
            or not any(" " in piece for piece in raw[:1000])):
        return None
    pieces = [piece.replace(" ", SPACE) for piece in raw]
    types = fields["tokenizer.ggml.token_type"].contents()
    special = {name: pieces[fields[f"tokenizer.ggml.{name}_token_id"].contents()]
               for name in ("bos", "eos", "unknown", "padding")}
    vocab = {piece: index for index, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, generate_merges(vocab, None), unk_token=special["unknown"],
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = special["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, vocab[bos])])
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for p, t in zip(pieces, types) if t == CONTROL])
    # Runs of newlines and markup tags match whole; runs of spaces stay BPE pieces, as in SentencePiece.
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False)
                          for p, t in zip(pieces, types) if t == USER_DEFINED and SPACE not in p])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=special["eos"],
                                   unk_token=special["unknown"], pad_token=special["padding"])
