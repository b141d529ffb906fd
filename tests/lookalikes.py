"""Small look-alikes of the Chinese GPT-2 checkpoints people have, in their real file layouts, random weights.

- GPT2-chitchat (dialogue model and MMI model): config.json as transformers 4.2 wrote it (bos/eos 50256,
  n_ctx, tokenizer_class), pytorch_model.bin with the old causal-mask buffers, a BERT-Chinese vocab.txt
  ([PAD], [unused..], [UNK] [CLS] [SEP] [MASK], characters, ##pieces);
- CDial-GPT2: its vocab order ([CLS] [PAD] [SEP] [UNK] ... [speaker1] [speaker2], no [MASK]), no tokenizer files;
- uer/gpt2-chinese: a BERT vocab, tokenizer_config.json and special_tokens_map.json beside it.

Nothing is downloaded: shapes are tiny, the vocabularies are written here (or GPT2-chitchat's real one).
"""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

FIXTURE_TEXT = Path(__file__).resolve().parent.parent / "corpus" / "fixtures" / "chitchat_train.txt"
REAL_CHITCHAT_VOCAB = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "vocab" / \
    "gpt2-chitchat-vocab.txt"
KINDS = ("chitchat", "cdial", "uer")


def fixture_chars() -> list[str]:
    """The fixture corpus's characters, as written and as the cleaner normalises them (NFKC: "，" -> ",")."""
    text = FIXTURE_TEXT.read_text(encoding="utf-8")
    text += unicodedata.normalize("NFKC", text)
    return sorted({ch for ch in text if not ch.isspace()})


def bert_vocab(extra: list[str] = ()) -> list[str]:
    """A BERT-Chinese-ordered vocabulary: [PAD], unused slots, [UNK] [CLS] [SEP] [MASK], then characters."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 6)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return _unique(tokens + _text_tokens() + list(extra))


def cdial_vocab() -> list[str]:
    return _unique(["[CLS]", "[PAD]", "[SEP]", "[UNK]"] + _text_tokens() + ["[speaker1]", "[speaker2]"])


def _text_tokens() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return fixture_chars() + list(letters + "0123456789") + [f"##{c}" for c in letters] + ["##ing", "hello"]


def _unique(tokens: list[str]) -> list[str]:
    return list(dict.fromkeys(tokens))


def _config(kind: str, vocab_size: int, n_positions: int) -> dict:
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
              "embd_pdrop": 0.1, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
              "n_ctx": n_positions, "n_embd": 32, "n_head": 2, "n_inner": None, "n_layer": 2,
              "n_positions": n_positions, "resid_pdrop": 0.1, "vocab_size": vocab_size}
    if kind == "chitchat":   # as GPT2-chitchat's config/config.json (transformers 4.2)
        config.update({"bos_token_id": 50256, "eos_token_id": 50256, "gradient_checkpointing": False,
                       "output_past": True, "tokenizer_class": "BertTokenizer", "transformers_version": "4.2.0",
                       "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 400}}})
    elif kind == "uer":
        config.update({"tokenizer_class": "BertTokenizer", "gradient_checkpointing": False, "output_past": True,
                       "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 320}}})
    return config


_MODEL_KEYS = ("activation_function", "n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "layer_norm_epsilon")


def make_lookalike(out: Path, kind: str, seed: int = 0, vocab: list[str] | None = None,
                   vocab_file: Path | None = None, n_positions: int = 128, old_buffers: bool = True,
                   shape: dict | None = None) -> Path:
    """Write a look-alike of `kind` ("chitchat", "cdial", "uer") into `out` (created); returns `out`. The
    vocabulary: `vocab` (tokens), `vocab_file` (copied as it is), else the kind's own small one. `shape`:
    n_layer / n_embd / n_head instead of the tiny default (12 / 768 / 12 is the real models')."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    if vocab_file is not None:
        shutil.copy(vocab_file, out / "vocab.txt")
        data = vocab_file.read_bytes()
        size = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)   # lines as transformers counts them
    else:
        if vocab is None:
            vocab = cdial_vocab() if kind == "cdial" else bert_vocab()
        (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        size = len(vocab)
    config = {**_config(kind, size, n_positions), **(shape or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=None, eos_token_id=None,
                                       **{k: v for k, v in config.items() if k in _MODEL_KEYS}))
    # untrained weights are near-uniform; spread them so that models differ visibly and rankings are not ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"]  # old save_pretrained wrote the tied head too
    if old_buffers:  # transformers < 4.20 saved the causal mask with the weights
        mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.uint8)).view(1, 1, n_positions,
                                                                                          n_positions)
        for i in range(config["n_layer"]):
            state[f"transformer.h.{i}.attn.bias"] = mask
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, out / "pytorch_model.bin")
    if kind == "uer":
        (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(
            {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"}), encoding="utf-8")
    return out
