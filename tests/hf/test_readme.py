"""The README's Hugging Face examples, run as written on tiny models built from configs:
``from_pretrained`` returns a word-level tokenizer over the examples' words and a tiny model
instead of downloading anything."""

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

README = Path(__file__).resolve().parents[2] / "README.md"
WORDS = (
    "a great film dull and far too long i loved it not for me what the cat sat on mat dogs chase "
    "sun is hot ice cold"
).split()


def _block(marker: str) -> str:
    match = re.search(
        rf"<!-- {marker} -->\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S
    )
    assert match, f"README has no code block after <!-- {marker} -->"
    return match.group(1)


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def _tiny(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "classifier":
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=16,
            num_labels=2,
        )
        return transformers.BertForSequenceClassification(config)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=8,
        bos_token_id=2,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    ("marker", "auto_model", "kind"),
    [
        ("hf-classifier", "AutoModelForSequenceClassification", "classifier"),
        ("hf-causal-lm", "AutoModelForCausalLM", "lm"),
    ],
)
def test_readme_example_runs(marker, auto_model, kind, monkeypatch, capsys):
    tokenizer = _tokenizer()
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda name: tokenizer)
    )
    monkeypatch.setattr(
        getattr(transformers, auto_model),
        "from_pretrained",
        staticmethod(lambda name: _tiny(kind, len(tokenizer))),
    )
    namespace: dict = {}
    exec(compile(_block(marker), f"README.md <!-- {marker} -->", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.indices.shape == (1, 2) and scores.opponent_indices.shape == (1, 2)
    assert (scores.values[:, -1] >= scores.opponent_values[:, -1]).all()
    assert scores.settings["task"]["task"] == (
        "ClassificationTask" if kind == "classifier" else "LanguageModelingTask"
    )
    assert "tensor(" in capsys.readouterr().out
