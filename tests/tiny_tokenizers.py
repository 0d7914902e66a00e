"""Tokenizers for the tiny test pipelines and reward models, built deterministically and offline.

The ``tokenizers`` library's trainers are not deterministic across processes (training.md §5.5), so the vocabularies
here are written out by rule: every byte of the byte-level alphabet (alone and word-final), the special
tokens, and a few merges of common letter pairs so that real BPE merging is exercised.
"""

from __future__ import annotations

from functools import cache

CLIP_MERGES = ["t h", "th e</w>", "o n", "a n", "i n", "e r", "o r", "a t"]


@cache
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable unicode map, in byte order (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary (word-final ``</w>`` tokens) and its merges; ids are fixed by construction."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in byte_alphabet():
        tokens += [c, c + "</w>"]
    for merge in CLIP_MERGES:
        tokens.append(merge.replace(" ", ""))
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, [tuple(m.split(" ")) for m in CLIP_MERGES]


def clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` on :func:`clip_vocab` (save it with ``save_pretrained`` next to a tiny model)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


# T5 (SentencePiece-style Unigram) -------------------------------------------------------------------------------
T5_WORDS = ["the", "of", "and", "with", "photo", "cat", "dog", "red", "blue", "on"]


def t5_vocab() -> list[tuple[str, float]]:
    """A T5-style Unigram vocabulary: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁``, then every printable ASCII
    character alone and with the word-start marker ``▁``, then a few whole words. Scores are fixed by rule
    (whole words > word-start characters > bare characters) so segmentation prefers the longest piece."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [(c, -8.0) for c in chars]
    pieces += [("▁" + c, -7.0) for c in chars]
    pieces += [("▁" + w, -4.0) for w in T5_WORDS]
    return pieces


def t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` (transformers 5: ``T5Tokenizer``, backed by ``tokenizers``) on :func:`t5_vocab`.

    Appends ``</s>`` like the real T5 tokenizer; characters outside the vocabulary map to ``<unk>``. No sentinel
    ``<extra_id_*>`` tokens: only the encoder is used."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)


# Qwen (byte-level BPE with ChatML) ------------------------------------------------------------------------------
QWEN_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "Ġ o", "Ġo f", "i n", "e r", "o n", "a t"]
QWEN_CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_THINK = ["<think>", "</think>"]

# Our own ChatML template. Like Qwen3's, ``enable_thinking=False`` appends an empty think block after the
# generation prompt; FLUX.2-klein's pipeline calls it that way.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A Qwen2-style byte-level BPE vocabulary: the 256 byte symbols (ids 0..255), the merge results, then the
    special and think tokens (as in Qwen3, after the BPE vocabulary); ids are fixed by construction."""
    tokens = list(byte_alphabet())
    tokens += [m.replace(" ", "") for m in QWEN_MERGES]
    tokens += QWEN_CONTROL_TOKENS + QWEN_THINK
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, [tuple(m.split(" ")) for m in QWEN_MERGES]


def qwen_tokenizer(model_max_length: int = 32768):
    """A ``Qwen2TokenizerFast`` (transformers 5: ``Qwen2Tokenizer``) on :func:`qwen_vocab` with a chat template.

    As Qwen3's: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk, right padding; ``<|im_start|>``/
    ``<|im_end|>`` are special added tokens and ``<think>``/``</think>`` non-special added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab()
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN_CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False) for t in QWEN_THINK])
    return tok
