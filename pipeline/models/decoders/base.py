"""The interface every caption decoder implements, shared by training and decoding.

Shapes: ``B`` batch, ``N`` visual tokens, ``C`` feature channels, ``T`` caption
positions, ``V`` vocabulary size.

* Visual input is the cached spatial features ``(B, N, C)`` (any float dtype);
  each decoder projects them with a learned layer of its own. Several token sets
  (feature maps of several backbone stages) arrive concatenated along ``N``, each
  zero-padded to the widest set's ``C``; ``token_sets`` (a :data:`~.layers.TokenLayout`
  of ``(tokens, channels)`` per set) tells the decoder the layout, and
  :class:`~.layers.VisualProjection` gives each set a projection of its own.
* Caption input is ``tokens (B, T)`` int64 starting with ``bos_id``, plus
  ``lengths (B,)``: the number of real tokens of each row. Padding is found from
  ``lengths`` only, never by comparing with a pad id (GPT-2's id 0 is "!").
* :meth:`CaptionDecoder.forward` is teacher forcing: logits at position ``t``
  predict token ``t + 1``.
* Incremental decoding: ``state = init_state(features)``, then repeatedly
  ``out = step(prev_tokens, state)``; ``out.state`` carries whatever makes the
  next step cheap (hidden states, key/value caches), so the prefix is never
  recomputed. ``reorder_state(state, index)`` selects/duplicates batch rows
  (beam search expands B -> B*K and reorders beams with it). Running ``step``
  over a caption's tokens reproduces ``forward``'s logits.
* Visual attention (families with ``has_attention``): ``step(..., return_attention=True)`` returns the
  attention ``(B, N)`` of that step over the N visual tokens (each row sums to 1) and
  ``forward(..., return_attention=True)`` the ``(B, T, N)`` of every position, the same numbers. It is
  opt-in so that training (which never asks) does not compute or keep the weights; asking never
  changes the logits. What the weights are is the family's ``attention_source``; a family without
  them says why in ``no_attention_reason`` (shown where the heatmaps would be).
* What is constant over a caption (visual tokens, cross-attention keys/values) is kept once per
  image, not once per row: beam search decodes ``K`` rows per image and reorders them at every
  step, and copying those tensors for every row at every step cost more than the rest of a step.
  Such a state holds a :class:`RowImages` (which image each row decodes), which ``reorder_state``
  reorders instead of the per-image tensors; only per-row tensors (hidden states, self-attention
  caches) are index-selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError

from .layers import TokenLayout, visual_layout

State = Any  # each family's own: a dict of tensors, a transformers Cache, ...


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V)
    attention: Optional[torch.Tensor] = None  # (B, T, N) visual attention per position, if the family has one
    aux_loss: Optional[torch.Tensor] = None  # scalar regulariser to add to the loss (e.g. doubly stochastic attention)


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, V) for the next token
    state: State
    attention: Optional[torch.Tensor] = None  # (B, N)


class WordEmbeddings(NamedTuple):
    """Where a family keeps the token-embedding table that pretrained word vectors (GloVe) initialise."""

    table: str  # attribute holding the nn.Embedding (vocab_size, width)
    width_option: str  # the family's option that sets its width


def reorder_tensors(state: Any, index: torch.Tensor) -> Any:
    """Index every tensor of a nested dict/list/tuple state along dim 0."""
    if torch.is_tensor(state):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {k: reorder_tensors(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reorder_tensors(v, index) for v in state)
    return state


class RowImages:
    """Which image each row of a decoding state decodes, for state kept once per image.

    ``RowImages()`` (what ``init_state`` starts with) is one row per image, row ``i`` decoding image ``i``;
    :meth:`reorder` follows ``reorder_state``'s row index, so the per-image tensors themselves are never
    copied. A decoder reads them for its rows either per row (:meth:`gather`, a copy) or, on the CPU, per
    block of consecutive rows of one image (:meth:`blocks`: beam search's ``K`` beams of an image, sampling's
    copies of it), with the image's tensor broadcast over the block instead of copied. Both give each row the
    same arithmetic as a copy of its image's tensors would.
    """

    __slots__ = ("index", "_runs")

    def __init__(self, index: Optional[torch.Tensor] = None) -> None:
        self.index = index  # (R,) int64 image of each row; None: row i is image i
        self._runs: Any = None

    def reorder(self, index: torch.Tensor) -> "RowImages":
        """The rows after ``reorder_state(state, index)``: row ``r`` decodes the image of old row ``index[r]``."""
        return RowImages(index if self.index is None else self.index.index_select(0, index))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (per image, batch first) for every row: ``x`` itself for one row per image, else a copy."""
        return x if self.index is None else x.index_select(0, self.index)

    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """``(image, first row, end row)`` of each block of consecutive rows decoding one image, in row order."""
        if self._runs is None:
            if self.index is None:
                raise ValueError("runs() of the one-row-per-image layout: there the per-image tensors are the rows")
            idx = self.index
            starts = [0] + (torch.nonzero(idx[1:] != idx[:-1]).flatten() + 1).tolist() if idx.numel() else []
            images = idx[starts].tolist() if starts else []
            self._runs = tuple(zip(images, starts, starts[1:] + [idx.numel()]))
        return self._runs

    def blocks(self, device: torch.device) -> Optional[tuple[tuple[int, int, int], ...]]:
        """:meth:`runs` where broadcasting per block beats copying per row: on the CPU, with blocks of at least two
        rows on average; None elsewhere (one batched kernel over copied rows is faster on an accelerator)."""
        if self.index is None or device.type != "cpu":
            return None
        runs = self.runs()
        return runs if 2 * len(runs) <= self.index.numel() else None

    def one_per_image(self) -> bool:
        """Every row decodes an image of its own (greedy decoding; beam search with one beam)."""
        if self.index is None:
            return True
        runs = self.runs()
        return len(runs) == self.index.numel() and len({image for image, _, _ in runs}) == len(runs)


def reorder_per_image(rows: RowImages, per_image: Any, index: torch.Tensor) -> tuple[RowImages, Any]:
    """``rows`` reordered by ``index``, and the per-image tensors of the state (any nesting of dicts, lists and
    tuples of batch-first tensors) to go with them: unchanged, except that images no row decodes any more
    (finished) are dropped from them, one copy when that happens, and that rows which are again one per image
    (greedy decoding) get the per-image tensors in their own order, as one row per image."""
    new = rows.reorder(index)
    images = sorted({image for image, _, _ in new.runs()})
    if len(images) < _batch(per_image):
        keep = torch.tensor(images, dtype=torch.long, device=index.device)
        per_image = reorder_tensors(per_image, keep)
        new = RowImages(torch.searchsorted(keep, new.index))  # each row's image among those kept
    if not new.one_per_image():
        return new, per_image
    if not torch.equal(new.index, torch.arange(new.index.numel(), device=index.device)):
        per_image = reorder_tensors(per_image, new.index)
    return RowImages(), per_image


def cached_attention_state(per_image_key: str, per_image_kv: list, like: torch.Tensor) -> dict[str, Any]:
    """The start of an attention decoder's incremental state: each layer's cross-attention keys/values once per
    image under ``per_image_key`` (``(I, heads, N, head_dim)`` pairs), ``rows`` (:class:`RowImages`), an empty
    time-major self-attention cache per layer (``self_kv``, see :func:`.layers.append_kv`) and ``self_rows``
    (None: no reordering pending). The empty cache has ``like``'s dtype (the attended tokens'), which the first
    step's :func:`.layers.append_kv` promotes with its own."""
    k = per_image_kv[0][0]
    empty = like.new_empty((0, *k.shape[:2], k.shape[3]))  # (0, B, heads, hd)
    return {per_image_key: per_image_kv, "rows": RowImages(), "self_kv": [(empty, empty) for _ in per_image_kv],
            "self_rows": None}


def reorder_cached_attention_state(state: dict[str, Any], index: torch.Tensor, per_image_key: str) -> dict[str, Any]:
    """``reorder_state`` of a :func:`cached_attention_state`: copies nothing per row; the per-image tensors follow
    :func:`reorder_per_image`, and the row index is composed into ``self_rows``, which the next step applies as it
    extends ``self_kv``."""
    rows, per_image = reorder_per_image(state["rows"], state[per_image_key], index)
    pending = state["self_rows"]
    return {per_image_key: per_image, "rows": rows, "self_kv": state["self_kv"],
            "self_rows": index if pending is None else pending.index_select(0, index)}


def _batch(state: Any) -> int:
    """The batch size of the first tensor in a nested state (-1 without one)."""
    if torch.is_tensor(state):
        return state.shape[0]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    for v in values:
        n = _batch(v)
        if n >= 0:
            return n
    return -1


class CaptionDecoder(nn.Module):
    """Base class. Subclasses implement the four methods below; :func:`~pipeline.models.decoders.register_decoder`
    sets ``family`` and ``description``.

    Capabilities are class attributes, read from the class (or an instance) instead of a list of family
    names kept elsewhere; a family overrides the ones it has:

    * ``has_attention``: :meth:`step` (and :meth:`forward`) return visual attention over the N tokens when
      asked (``return_attention=True``): heatmaps in galleries, ``pipeline caption --attention`` and the server;
      ``attention_source`` says what those weights are, ``no_attention_reason`` (families without) why there
      are none;
    * ``supports_scheduled_sampling``: training may feed the model's own previous token back
      step by step (:class:`pipeline.training.loop.TrainingForward`); meant for recurrent decoders, whose
      teacher forcing is a loop over :meth:`step` anyway;
    * ``word_embeddings``: a :class:`WordEmbeddings` for families that read the word tokenizer's ids
      through an embedding table of their own, which :meth:`load_word_embeddings` can initialise from
      word vectors (GloVe); ``None`` for the GPT-2 families (GPT-2's BPE and its own table).
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    has_attention: ClassVar[bool] = False
    attention_source: ClassVar[str] = ""
    no_attention_reason: ClassVar[str] = "this decoder has no per-word visual attention"
    supports_scheduled_sampling: ClassVar[bool] = False
    word_embeddings: ClassVar[Optional[WordEmbeddings]] = None

    def __init__(self, feature_dim: Optional[int], vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 token_sets: Optional[Sequence[tuple[Optional[int], int]]] = None) -> None:
        super().__init__()
        self.token_sets: TokenLayout = visual_layout(feature_dim, token_sets)
        self.feature_dim = max(c for _, c in self.token_sets)  # the width C of the features tensor
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.eos_id = eos_id

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                return_attention: bool = False) -> DecoderOutput:
        raise NotImplementedError

    def init_state(self, features: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, *, return_attention: bool = False) -> StepOutput:
        """``tokens (B,)``: the previous token of each row (``bos_id`` at the first step). ``return_attention``:
        families with ``has_attention`` fill ``StepOutput.attention``; the others ignore it."""
        raise NotImplementedError

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        return reorder_tensors(state, index)

    @classmethod
    def attention_note(cls) -> str:
        """One line for where heatmaps are shown: what the maps are, or why this family has none."""
        if cls.has_attention:
            return f"{cls.family} attention maps: {cls.attention_source or 'its visual attention'}"
        return f"no attention maps for the {cls.family} decoder: {cls.no_attention_reason}"

    # ----------------------------------------------------------------- pretrained word vectors
    def word_embedding_table(self) -> nn.Embedding:
        """The token-embedding table that ``word_embeddings`` names."""
        if self.word_embeddings is None:
            raise ConfigError(f"decoder {self.family!r} has no word-embedding table to initialise from word vectors")
        return getattr(self, self.word_embeddings.table)

    def load_word_embeddings(
        self, vectors: torch.Tensor, rows: Optional[torch.Tensor] = None, *, freeze: bool = False
    ) -> None:
        """Copy word vectors into the word-embedding table, optionally freezing it.

        ``vectors (R, width)`` are the rows of token ids ``rows (R,)``; every other row keeps its
        initialisation. ``rows`` None: ``vectors`` is the whole ``(vocab_size, width)`` table. ``freeze``: the
        table is not trained (``requires_grad`` off), so it stays equal to this initialisation; refused when
        another layer shares its weights (tied output layer), which would be frozen with it.
        """
        table = self.word_embedding_table()
        width = table.embedding_dim
        if rows is None:
            rows = torch.arange(self.vocab_size)
        rows = torch.as_tensor(rows, dtype=torch.long)
        if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] != rows.numel():
            raise ValueError(
                f"{self.family}: word vectors of shape {tuple(vectors.shape)} for {rows.numel()} rows, expected "
                f"({rows.numel()}, {width}): the table is {width} wide ({self.word_embeddings.width_option}); "
                f"project the vectors or set {self.word_embeddings.width_option} to their size"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.vocab_size):
            raise ValueError(f"{self.family}: word-vector rows outside the vocabulary (0..{self.vocab_size - 1})")
        if freeze:
            shared = [name for name, p in self.named_parameters(remove_duplicate=False)
                      if p is table.weight and not name.startswith(self.word_embeddings.table + ".")]
            if shared:
                raise ConfigError(
                    f"decoder {self.family!r}: freezing the word embeddings would freeze {', '.join(shared)} too "
                    f"(the output layer is tied to them); untie them (decoder option tie_embeddings: false) or "
                    f"leave freeze_embeddings off"
                )
        with torch.no_grad():
            table.weight[rows.to(table.weight.device)] = vectors.to(table.weight.device, table.weight.dtype)
        table.weight.requires_grad_(not freeze)
