"""A tiny ImageReward checkpoint and BERT tokenizer for the ImageReward tests, built offline and deterministically.

* :func:`save_tiny_bert_tokenizer` writes a ``bert-base-uncased``-style WordPiece folder (``vocab.txt`` with the
  usual special tokens, lower-casing) with a small vocabulary fixed by rule.
* :func:`tiny_imagereward_state_dict` is a random state dict in the key layout of ``ImageReward.pt`` (the
  ``image-reward`` package's ``ImageReward`` module: ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
  ``blip.vision_proj``/``blip.text_proj`` and ``mlp.layers.*``) for the same architecture at small widths:
  a ViT of width 128 (2 heads of 64, 2 blocks, 8-px patches, 32-px images), a cross-attending BERT of width 128
  (2 heads, 2 layers, 40 positions), the original head widths (→1024→128→64→16→1).

Weights are drawn from a seeded generator with fan-in scaling so that the score moves with the image and the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH = 8
VISION_WIDTH = 128
VISION_LAYERS = 2
TEXT_WIDTH = 128
TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 512
MAX_POSITIONS = 40
PROJ_DIM = 256  # BLIP_Pretrain's embed_dim (the contrastive projections, unused by the score)
HEADS = 2
HEAD_DIMS = (TEXT_WIDTH, 1024, 128, 64, 16, 1)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "an", "of", "at", "on", "photo", "cat", "dog", "orange", "tree", "night", "red", "blue"]


def bert_vocab() -> list[str]:
    """Specials, then single characters, ``##``-continuations of letters and digits, and a few whole words."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'-:;()")
    cont = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return SPECIALS + chars + cont + WORDS


def save_tiny_bert_tokenizer(folder: str | Path) -> Path:
    """A lower-casing WordPiece tokenizer folder that ``BertTokenizer.from_pretrained`` reads (vocab.txt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512,
    }))
    return folder


def model_vocab_size() -> int:
    """The tiny model's vocabulary: the tokenizer's plus BLIP's ``[DEC]`` and ``[ENC]`` (as 30522 + 2 = 30524)."""
    return len(bert_vocab()) + 2


def tiny_med_config() -> dict:
    """BLIP's ``med_config.json`` at the tiny text size (what the original package builds its BERT from)."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02,
        "intermediate_size": TEXT_INTERMEDIATE, "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert", "num_attention_heads": HEADS, "num_hidden_layers": TEXT_LAYERS, "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": model_vocab_size(), "encoder_width": VISION_WIDTH,
        "add_cross_attention": True,
    }


def tiny_imagereward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in ``ImageReward.pt``'s layout at the tiny sizes (including the saved
    ``embeddings.position_ids`` buffer and BLIP's unused contrastive projections)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def linear(key: str, n_out: int, n_in: int) -> None:
        sd[key + ".weight"] = randn(n_out, n_in, scale=n_in ** -0.5)
        sd[key + ".bias"] = randn(n_out, scale=0.05)

    def norm(key: str, n: int) -> None:
        sd[key + ".weight"] = 1.0 + randn(n, scale=0.1)
        sd[key + ".bias"] = randn(n, scale=0.1)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    grid = IMAGE_SIZE // PATCH
    sd[v + "cls_token"] = randn(1, 1, VISION_WIDTH, scale=0.5)
    sd[v + "pos_embed"] = randn(1, grid * grid + 1, VISION_WIDTH, scale=0.5)
    sd[v + "patch_embed.proj.weight"] = randn(VISION_WIDTH, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5)
    sd[v + "patch_embed.proj.bias"] = randn(VISION_WIDTH, scale=0.05)
    for i in range(VISION_LAYERS):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", VISION_WIDTH)
        linear(b + "attn.qkv", 3 * VISION_WIDTH, VISION_WIDTH)
        linear(b + "attn.proj", VISION_WIDTH, VISION_WIDTH)
        norm(b + "norm2", VISION_WIDTH)
        linear(b + "mlp.fc1", 4 * VISION_WIDTH, VISION_WIDTH)
        linear(b + "mlp.fc2", VISION_WIDTH, 4 * VISION_WIDTH)
    norm(v + "norm", VISION_WIDTH)

    sd[t + "embeddings.position_ids"] = torch.arange(MAX_POSITIONS).expand((1, -1)).clone()
    sd[t + "embeddings.word_embeddings.weight"] = randn(model_vocab_size(), TEXT_WIDTH, scale=1.0)
    sd[t + "embeddings.position_embeddings.weight"] = randn(MAX_POSITIONS, TEXT_WIDTH, scale=0.5)
    norm(t + "embeddings.LayerNorm", TEXT_WIDTH)
    for i in range(TEXT_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for attn, kv_width in (("attention", TEXT_WIDTH), ("crossattention", VISION_WIDTH)):
            linear(b + attn + ".self.query", TEXT_WIDTH, TEXT_WIDTH)
            linear(b + attn + ".self.key", TEXT_WIDTH, kv_width)
            linear(b + attn + ".self.value", TEXT_WIDTH, kv_width)
            linear(b + attn + ".output.dense", TEXT_WIDTH, TEXT_WIDTH)
            norm(b + attn + ".output.LayerNorm", TEXT_WIDTH)
        linear(b + "intermediate.dense", TEXT_INTERMEDIATE, TEXT_WIDTH)
        linear(b + "output.dense", TEXT_WIDTH, TEXT_INTERMEDIATE)
        norm(b + "output.LayerNorm", TEXT_WIDTH)

    linear("blip.vision_proj", PROJ_DIM, VISION_WIDTH)
    linear("blip.text_proj", PROJ_DIM, TEXT_WIDTH)
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(HEAD_DIMS[:-1], HEAD_DIMS[1:], strict=True), strict=True):
        linear(f"mlp.layers.{i}", n_out, n_in)
    return sd
