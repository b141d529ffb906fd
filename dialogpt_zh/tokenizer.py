"""Tokenizers: a character-level BERT-style vocabulary built from a corpus, or an existing BERT vocab.

Both are saved as Hugging Face tokenizer directories that `AutoTokenizer.from_pretrained(dir)` loads.
(In transformers 5, `BertTokenizer(vocab_file=...)` silently yields an all-[UNK] tokenizer, so we never
construct tokenizers from a vocab file directly; we go through `from_pretrained`.)
"""
from __future__ import annotations

import functools
import json
import logging
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dialogpt_zh.errors import UserError

log = logging.getLogger(__name__)

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


# A vocab.txt must hold these; [MASK] is optional (CDial-GPT's vocabulary has none).
REQUIRED_SPECIAL_TOKENS = [PAD, UNK, CLS, SEP]
# Tokens a foreign vocabulary may carry that only the sequence layout places (dialogpt_zh.sequence.SPEAKER_TOKENS):
# marked special, so they are never produced from user text nor shown in a reply.
LAYOUT_TOKENS = ["[speaker1]", "[speaker2]"]


def load_vocab_tokenizer(vocab_path: str | Path, options: dict | None = None):
    """A BERT-Chinese tokenizer from a `vocab.txt` (GPT2-chitchat's, CDial-GPT's, uer's), so their models stay
    compatible. `options`: do_lower_case / tokenize_chinese_chars / strip_accents from the model's own
    tokenizer_config.json (default: lowercase, Chinese characters split, as BERT-Chinese)."""
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise UserError("vocab file not found", path=vocab_path)
    data = vocab_path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):   # a UTF-8 BOM (Windows editors write one): no part of the first token
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start}); a vocab.txt has one token per line",
                        path=vocab_path, line=data.count(b"\n", 0, e.start) + 1) from e
    # lines as transformers reads them (newlines only: a BERT vocab holds characters such as U+2028 that
    # str.splitlines would also split at); the line number is the token id
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    present = set(lines)
    if len(present) < len(lines):   # transformers keeps a token's last line: the earlier ids get no token
        first: dict[str, int] = {}
        repeats = [i for i, t in enumerate(lines) if first.setdefault(t, i) != i]
        line = repeats[0]
        log.warning("%s:%d: %d lines repeat an earlier token (first: %r, already on line %d); the earlier lines' ids "
                    "have no token", vocab_path, line + 1, len(repeats), lines[line], first[lines[line]] + 1)
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in present]
    if missing:
        raise UserError(f"vocab lacks the special tokens {missing}", path=vocab_path)
    config: dict = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True}
    for key in ("do_lower_case", "tokenize_chinese_chars", "strip_accents"):
        if options and isinstance(options.get(key), bool):
            config[key] = options[key]
    if MASK not in present:   # else transformers would add a [MASK] beyond the model's embeddings
        config["mask_token"] = None
    speakers = [t for t in LAYOUT_TOKENS if t in present]
    if speakers:
        config["additional_special_tokens"] = speakers
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_bytes(data)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        tok = _from_pretrained(Path(tmp), vocab_path)
    if len(tok) > len(lines):
        raise UserError(f"the tokenizer has {len(tok)} tokens but the file only {len(lines)} lines: tokens were "
                        "added beyond the model's embeddings", path=vocab_path)
    return tok


# files that hold a vocabulary (tokenizer_config.json alone does not)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                     "sentencepiece.bpe.model")


def _tokenizer_options(path: Path) -> dict:
    """The model's tokenizer_config.json as a dict ({} when absent; when unreadable too, with a warning naming
    it: BERT-Chinese defaults, which is what these models were trained with when they ship none)."""
    file = path / "tokenizer_config.json"
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); using BERT-Chinese defaults (lowercase, Chinese characters split)",
                    file, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        return {}
    if not isinstance(data, dict):
        log.warning("%s: a JSON %s, not an object; using BERT-Chinese defaults", file, type(data).__name__)
        return {}
    return data


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory: one saved by `save_pretrained` (ours, with tokenizer.json), or a model
    directory that has only a BERT-style `vocab.txt` (GPT2-chitchat, CDial-GPT, uer/gpt2-chinese: their
    config.json says GPT-2, so AutoTokenizer alone would look for a GPT-2 BPE vocabulary)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError("tokenizer directory not found", path=path)
    if not (path / "tokenizer.json").is_file() and (path / "vocab.txt").is_file():
        return load_vocab_tokenizer(path / "vocab.txt", _tokenizer_options(path))
    if not any((path / name).is_file() for name in _VOCABULARY_FILES):
        # else AutoTokenizer may build a tokenizer of special tokens only, and every character is [UNK]
        raise UserError("no vocabulary here: a model directory needs tokenizer.json or a BERT-style vocab.txt beside "
                        "config.json (GPT2-chitchat keeps its vocab.txt in vocab/: copy it next to the model)",
                        path=path)
    return _from_pretrained(path, path)


def _from_pretrained(path: Path, shown: Path):
    """AutoTokenizer over a directory (never over a vocab file: see the module docstring); errors name `shown`."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - report any loader failure as a user error
        raise UserError(f"cannot load tokenizer: {e}; a model directory needs tokenizer.json or a BERT-style "
                        "vocab.txt beside config.json", path=shown) from e
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id"):
        if getattr(tok, name) is None:
            raise UserError(f"tokenizer has no {name.replace('_id', '')}", path=shown)
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
        if tok is None:  # an id without a token (a row beyond the vocabulary): nothing to show
            continue
        if tok.startswith("##"):
            tok = tok[2:]
        elif out and tok.isascii() and tok.isalnum() and out[-1][-1:].isascii() and out[-1][-1:].isalnum() \
                and len(tok) > 1:
            out.append(" ")  # whole Latin words from a BERT vocab: keep them apart
        out.append(tok)
    return "".join(out)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes two tokenizers interchangeable for stored token ids: the vocabulary (tokens in id
    order) and the special token ids. Equal for a store's tokenizer/ and a model trained on that store, whatever
    bytes their tokenizer.json files hold (transformers versions write them differently)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "special": {n: getattr(tokenizer, f"{n}_token_id")
                                                  for n in ("pad", "unk", "cls", "sep")}},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def fast_decoder(tokenizer):
    """`decode` for many id sequences: a table join when every ordinary token is one character (a char
    tokenizer: the same text as `decode`), else `decode` itself."""
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_ids)
    if not all(len(t) == 1 for t, i in vocab.items() if i not in specials):
        return lambda ids: decode(tokenizer, ids)
    table = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        if i not in specials:
            table[i] = t
    return lambda ids: "".join([table[i] for i in ids])


@functools.lru_cache(maxsize=1)
def _unassigned_code_points() -> np.ndarray:
    """Boolean mask over all code points: unassigned (category Cn) in this Python's Unicode database."""
    import unicodedata

    return np.array([unicodedata.category(chr(cp)) == "Cn" for cp in range(0x110000)], dtype=bool)


class UtteranceEncoder:
    """Token ids of many utterances at once: (flat ids, offsets), utterance k = flat[off[k]:off[k+1]].

    For a char tokenizer built by `build_char_tokenizer` the ids are looked up with one numpy table over
    code points (its pipeline is NFKC + lowercase + one token per non-space character, and our text is
    already NFKC); this is checked against the real tokenizer on the first batch and on `verify_every`-th
    batch after, falling back to `encode_batch` if they ever differ. Other tokenizers (a BERT vocab) always
    go through the fast tokenizer's `encode_batch`.
    """

    VERIFY_UTTERANCES = 20_000

    def __init__(self, tokenizer, dtype: np.dtype, char_level: bool, verify_every: int = 50) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.table = None
        self.verify_every = verify_every
        self.batches = 0
        self.fallback_reason: str | None = None
        if char_level:
            unk = tokenizer.unk_token_id
            table = np.full(0x110000, unk, dtype=np.int64)
            for tok, i in tokenizer.get_vocab().items():
                if len(tok) == 1:
                    table[ord(tok)] = i
            for cp in range(0x3000 + 1):  # whitespace (all of it lies below U+3001) is not a token
                if chr(cp).isspace():
                    table[cp] = -1
            self.table = table
            # Code points this Python's Unicode tables call unassigned may have case mappings in the newer
            # tables of the Rust tokenizer, so str.lower() cannot stand in for its lowercasing there.
            self.uncertain = _unassigned_code_points()

    def _has_uncertain(self, texts: list[str]) -> bool:
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        return bool(self.uncertain[cps].any())

    def _table_encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        joined = "\n".join(texts).lower()
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        ids = self.table[cps]
        keep = ids >= 0
        # utterance boundaries: the "\n" separators (utterances hold no newline after normalize_text)
        bounds = np.concatenate([[0], np.flatnonzero(cps == 10) + 1, [len(cps) + 1]])
        csum = np.concatenate([[0], np.cumsum(keep)])
        offsets = csum[np.minimum(bounds, len(cps))]
        return ids[keep].astype(self.dtype), offsets

    def _generic_encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            seqs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            seqs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in seqs], out=offsets[1:])
        flat = np.fromiter((i for x in seqs for i in x), dtype=self.dtype, count=int(offsets[-1]))
        return flat, offsets

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.table is None or self._has_uncertain(texts):
            return self._generic_encode(texts)
        flat, offsets = self._table_encode(texts)
        if self.batches % self.verify_every == 0:
            # on at most VERIFY_UTTERANCES of the batch: encode_batch's objects take ~1 KB an utterance, so one
            # session of millions of turns would otherwise cost GBs just to check
            k = min(len(texts), self.VERIFY_UTTERANCES)
            ref_flat, ref_off = self._generic_encode(texts[:k])
            if not (np.array_equal(ref_off, offsets[:k + 1]) and np.array_equal(ref_flat, flat[:offsets[k]])):
                self.fallback_reason = "fast char lookup differed from the tokenizer; using encode_batch"
                log.warning(self.fallback_reason)
                self.table = None
                flat, offsets = self._generic_encode(texts)
        self.batches += 1
        return flat, offsets
