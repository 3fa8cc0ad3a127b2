"""Tiny Hugging Face models built from configs (no downloads) and their seeded batches."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 12
LENGTH = 6


def _tokens(n: int, seed: int, low: int = 1) -> torch.Tensor:
    return torch.randint(low, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def _padding_mask(n: int) -> torch.Tensor:
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[1::3, -2:] = 0  # every third sequence padded at its end
    return mask


def _build(cls, config, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    return model.eval()


def gpt2(dtype: torch.dtype = torch.float64, seed: int = 0):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _build(transformers.GPT2LMHeadModel, config, seed, dtype)


def llama(dtype: torch.dtype = torch.float64, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return _build(transformers.LlamaForCausalLM, config, seed, dtype)


def bert(dtype: torch.dtype = torch.float64, seed: int = 0, num_labels: int = 3):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=LENGTH,
        type_vocab_size=1,
        num_labels=num_labels,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _build(transformers.BertForSequenceClassification, config, seed, dtype)


def t5(dtype: torch.dtype = torch.float64, seed: int = 0):
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=8,
        d_kv=4,
        d_ff=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return _build(transformers.T5ForConditionalGeneration, config, seed, dtype)


def vit(dtype: torch.dtype = torch.float64, seed: int = 0, num_labels: int = 3):
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _build(transformers.ViTForImageClassification, config, seed, dtype)


def lm_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """A causal-LM batch: padded positions are not scored (label -100)."""
    ids = _tokens(n, seed)
    mask = _padding_mask(n)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classification_batch(n: int, seed: int, num_labels: int = 3) -> dict[str, torch.Tensor]:
    ids = _tokens(n, seed)
    labels = torch.randint(0, num_labels, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return {"input_ids": ids, "attention_mask": _padding_mask(n), "labels": labels}


def seq2seq_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    source = _tokens(n, seed)
    target = _tokens(n, seed + 1)[:, :4]
    target[1::3, -1] = -100  # padded target positions are not scored
    return {"input_ids": source, "attention_mask": _padding_mask(n), "labels": target}


def image_batch(n: int, seed: int, num_labels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(
        0, num_labels, (n,), generator=g
    )


CASES = {
    "gpt2": (gpt2, lm_batch),
    "llama": (llama, lm_batch),
    "bert": (bert, classification_batch),
    "t5": (t5, seq2seq_batch),
    "vit": (vit, image_batch),
}
"""name -> (model builder, batch builder ``(n, seed)``)."""
