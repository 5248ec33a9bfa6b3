"""The training captions as token ids in flat arrays: no Python object per caption or per image.

A manifest of 10 M captions kept as ``(image id, [token ids])`` pairs costs gigabytes of Python objects (a
tuple, a string and a list of ints each); as :class:`CaptionTable` it costs its numbers: two bytes a token
(four when the vocabulary outgrows 65,536), eight bytes of offset and four of image index a caption, and the
image ids' UTF-8 bytes plus eight bytes of offset an image. :class:`CaptionTableBuilder` appends to typed
arrays (``array.array``), so building one from a manifest read line by line never holds more than that.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """Sequences of numbers in one flat array: sequence ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray  # int64, one more than there are sequences

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes


class _RaggedBuilder:
    def __init__(self, typecode: str) -> None:
        self.values, self.offsets = array(typecode), array("q", [0])

    def add(self, sequence: Iterable[int]) -> None:
        self.values.extend(sequence)
        self.offsets.append(len(self.values))

    def build(self, dtype) -> Ragged:
        return Ragged(np.frombuffer(self.values, dtype=dtype), np.frombuffer(self.offsets, dtype=np.int64))


@dataclass(frozen=True)
class CaptionTable:
    """Caption ``i`` is ``tokens[i]`` (bos ... eos), of image ``image_of[i]``, whose id is :meth:`image_id`;
    ``mirrored[i]`` (when built with it) is the caption with left and right swapped, for mirrored views."""

    image_ids: Ragged  # UTF-8 bytes of each image id
    image_of: np.ndarray  # int32, the image of each caption
    tokens: Ragged
    mirrored: Optional[Ragged] = None

    def __len__(self) -> int:
        return len(self.image_of)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def nbytes(self) -> int:
        return (self.image_ids.nbytes + self.image_of.nbytes + self.tokens.nbytes
                + (self.mirrored.nbytes if self.mirrored is not None else 0))

    def image_id(self, image: int) -> str:
        return self.image_ids[image].tobytes().decode("utf-8")

    def caption_image_ids(self, captions: Sequence[int]) -> list[str]:
        """The image id of each of ``captions``."""
        return [self.image_id(int(self.image_of[i])) for i in captions]

    def token_rows(self, captions: Sequence[int], mirrored: Optional[Sequence[bool]] = None) -> list[np.ndarray]:
        """The token ids of each of ``captions`` (the mirrored caption where ``mirrored`` says so)."""
        if mirrored is None:
            return [self.tokens[i] for i in captions]
        if self.mirrored is None:
            raise ValueError("this table was built without the mirrored captions")
        return [(self.mirrored if m else self.tokens)[i] for i, m in zip(captions, mirrored)]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Sequence[int]]], vocab_size: int = 1 << 16) -> "CaptionTable":
        """A table of ``(image id, token ids)`` pairs (consecutive pairs of one id share its image)."""
        builder = CaptionTableBuilder(vocab_size)
        for image_id, tokens in pairs:
            builder.add(image_id, [tokens], same_image=True)
        return builder.build()


class CaptionTableBuilder:
    """Appends images and their tokenised captions; :meth:`build` gives the :class:`CaptionTable`."""

    def __init__(self, vocab_size: int, *, mirrored: bool = False) -> None:
        self.small = vocab_size <= 1 << 16
        typecode = "H" if self.small else "i"
        self.ids, self.image_of, self.tokens = _RaggedBuilder("B"), array("i"), _RaggedBuilder(typecode)
        self.mirrored = _RaggedBuilder(typecode) if mirrored else None
        self._last_id: Optional[str] = None

    def add(self, image_id: str, captions: Sequence[Sequence[int]],
            mirrored: Optional[Sequence[Sequence[int]]] = None, *, same_image: bool = False) -> None:
        """One image's captions (``mirrored``: the same captions with left and right swapped; required when the
        builder keeps them). ``same_image``: the captions join the previous image when it has this id."""
        if (self.mirrored is None) != (mirrored is None):
            raise ValueError("give mirrored captions exactly when the builder keeps them")
        if not (same_image and image_id == self._last_id):
            self.ids.add(image_id.encode("utf-8"))
            self._last_id = image_id
        image = len(self.ids.offsets) - 2
        for k, caption in enumerate(captions):
            self.image_of.append(image)
            self.tokens.add(caption)
            if self.mirrored is not None:
                self.mirrored.add(mirrored[k])

    def build(self) -> CaptionTable:
        dtype = np.uint16 if self.small else np.int32
        return CaptionTable(self.ids.build(np.uint8), np.frombuffer(self.image_of, dtype=np.int32),
                            self.tokens.build(dtype), self.mirrored.build(dtype) if self.mirrored is not None else None)
