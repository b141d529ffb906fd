"""Tokenizers: a character-level BERT-style vocabulary built from a corpus, or an existing BERT vocab.

Both are saved as Hugging Face tokenizer directories that `AutoTokenizer.from_pretrained(dir)` loads.
(In transformers 5, `BertTokenizer(vocab_file=...)` silently yields an all-[UNK] tokenizer, so we never
construct tokenizers from a vocab file directly; we go through `from_pretrained`.)
"""
from __future__ import annotations

import json
import unicodedata
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from dialogpt_zh.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS


def count_chars(texts: Iterable[str], counter: Counter | None = None) -> Counter:
    """Count the characters a char-level vocabulary is built from (whitespace is not a token)."""
    counter = counter if counter is not None else Counter()
    for text in texts:
        # The same normalisation as the tokenizer pipeline, so counted chars are the chars it looks up.
        counter.update(unicodedata.normalize("NFKC", text).lower())  # counted in C: fast on big chunks
    for ch in [ch for ch in counter if ch.isspace()]:
        del counter[ch]
    return counter


def build_char_tokenizer(char_counts: Counter, min_frequency: int = 1):
    """A char-level tokenizer: every non-space character is one token; rarer than `min_frequency` -> [UNK].

    The pipeline (in the `tokenizers` library): NFKC + lowercase, split on whitespace, then isolate
    every character, WordPiece lookup with [UNK] fallback. Ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK].
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(ch for ch, n in char_counts.items() if n >= min_frequency and ch not in SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=1000))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    core.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token=PAD, cls_token=CLS,
                                   sep_token=SEP, mask_token=MASK)


def load_vocab_tokenizer(vocab_path: str | Path):
    """A BERT-Chinese tokenizer from a `vocab.txt` (e.g. GPT2-chitchat's), so its models stay compatible."""
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise UserError("vocab file not found", path=vocab_path)
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    missing = [t for t in SPECIAL_TOKENS if t not in lines]
    if missing:
        raise UserError(f"vocab lacks the special tokens {missing}", path=vocab_path)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(vocab_path, Path(tmp) / "vocab.txt")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True}))
        return load_tokenizer(tmp)


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory saved by `save_pretrained` (ours or a GPT2-chitchat model's)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError("tokenizer directory not found", path=path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - report any loader failure as a user error
        raise UserError(f"cannot load tokenizer: {e}", path=path) from e
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id"):
        if getattr(tok, name) is None:
            raise UserError(f"tokenizer has no {name.replace('_id', '')}", path=path)
    return tok


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one utterance, without special tokens.

    Text that looks like a special token (a user typing "[SEP]") is split into ordinary characters:
    only the sequence format itself may place [CLS]/[SEP].
    """
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids: special tokens dropped, characters joined without the spaces BERT puts between."""
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=True)
    out: list[str] = []
    for tok in tokens:
        if tok.startswith("##"):
            tok = tok[2:]
        elif out and tok.isascii() and tok.isalnum() and out[-1][-1:].isascii() and out[-1][-1:].isalnum() \
                and len(tok) > 1:
            out.append(" ")  # whole Latin words from a BERT vocab: keep them apart
        out.append(tok)
    return "".join(out)
