"""The typed run configuration: one source for the CLI flags, config files, presets and checkpoints.

A run is a :class:`RunConfig` of five sections, each a dataclass whose fields are the flags:

* :class:`ModelConfig`  the network (variant, backbone, input size, stages with attention, the RGA
  options) plus how to start and run it (ImageNet weights, the fused relation path);
* :class:`DataConfig`   dataset, PK sampling, augmentation, loader;
* :class:`OptimConfig`  losses, Adam, the learning-rate schedule, epochs;
* :class:`EvalConfig`   the evaluation during training;
* :class:`RuntimeConfig` run folder, checkpoints, logging, device and speed.

Field names are unique across sections, so a flag (``--batch-ids``), a key of a flat config
file (``"batch_ids"``) and a field (``cfg.data.batch_ids``) are the same name. Values come from,
lowest priority first: the field defaults (the paper's recipe, on the synthetic dataset) < a run
preset (``--preset``) < a config file (``--config``: JSON, or YAML with PyYAML; flat, or nested by
section as checkpoints store it) < the command line. ``model`` (``--model NAME``) is a shortcut
that sets the variant and every RGA option to one row of the paper's tables (rga.registry.MODEL_ROWS); the
other keys of the same source then override single fields. Unknown keys and bad values are
errors that name the key, the source and what was expected.

The value parsers behind the fields are ``rga.value_parsers``; the presets are ``rga.presets``.

A checkpoint stores ``RunConfig.to_dict()`` (and rga.checkpoint.FORMAT_VERSION); ``RunConfig.from_dict``
reads it back, and :func:`from_legacy` reads the flat argparse dicts of checkpoints written before this.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
# the presets (--preset NAME) are rga.presets; their names stay importable here
from .presets import PRESETS, PRETRAIN_COMMANDS, SHOWCASE_SCENES  # noqa: F401
from .registry import BACKBONES, RGA_OPTIONS, ROW_OPTIONS, VARIANTS, model_rows
from .value_parsers import (any_int, boolean, choice, fused_arg, int_list, kv_dict, nonneg_int,  # noqa: F401
                            optional_path, positive_int, probability, real, stage_list, string)


# ---------------------------------------------------------------------------------- field declarations

def opt(default, help: str, parse, *, flag: str | None = None, metavar: str | None = None, arch: bool = False):
    """A config field: its default, help text, value parser, CLI flag (default --field-name) and
    whether it is part of the network's architecture (checked when a checkpoint is loaded)."""
    meta = dict(help=help, parse=parse, flag=flag, metavar=metavar, arch=arch)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _model_names():
    return tuple(VARIANTS)  # read at call time: a variant added to the table is valid at once


def _backbones():
    return tuple(BACKBONES)


def _variant(text):
    names = _model_names()
    if text not in names:
        raise ValueError(f"expected one of {', '.join(names)}; got {text!r}")
    return text


def _backbone(text):
    names = _backbones()
    if text not in names:
        raise ValueError(f"expected one of {', '.join(names)}; got {text!r}")
    return text


DEFAULT_MILESTONES = [80, 120, 160, 200, 240, 280, 320, 360]


@dataclass
class ModelConfig:
    variant: str = opt("rga_sc", "attention design, a row of rga.models.VARIANTS (usually set with --model)",
                       _variant, arch=True)
    backbone: str = opt("resnet50", "backbone", _backbone, arch=True)
    height: int = opt(256, "input height (the RGA modules are built for it)", positive_int, arch=True)
    width: int = opt(128, "input width", positive_int, arch=True)
    stages: tuple = opt((1, 2, 3, 4), "ResNet stages followed by an attention module, e.g. 2,3 (paper: 1,2,3,4)",
                        stage_list, metavar="1,2,3,4", arch=True)
    use_relation: bool = opt(RGA_OPTIONS["use_relation"], "RGA: relation features in the attention input (off: Table 1 'w/o Rel.')",
                             boolean, arch=True)
    use_original: bool = opt(RGA_OPTIONS["use_original"], "RGA: the pooled feature itself in the attention input (off: 'w/o Ori.')",
                             boolean, arch=True)
    embedding: str = opt(RGA_OPTIONS["embedding"], "RGA: theta/phi embedding of the relations (Table 4)",
                         choice("asymmetric", "symmetric", "none"), arch=True)
    cha_ratio: int = opt(RGA_OPTIONS["cha_ratio"], "RGA: channel reduction s1 (lower it for small inputs)", positive_int, arch=True)
    spa_ratio: int = opt(RGA_OPTIONS["spa_ratio"], "RGA: spatial reduction s1 (lower it for small inputs)", positive_int, arch=True)
    down_ratio: int = opt(RGA_OPTIONS["down_ratio"], "RGA: reduction s2 of the attention MLP", positive_int, arch=True)
    gate_init: str = opt(RGA_OPTIONS["gate_init"], "RGA: initial gamma of each attention branch's last BN: public "
                         "(1, the public code's) or zero (every gate starts at 0.5; beyond the paper, for training "
                         "from random weights)", choice("public", "zero"))
    pretrained: object = opt("auto", "backbone weights: a local torchvision ImageNet file, a run folder or "
                             "checkpoint of rga.train (its trunk; attention modules start new), 'auto' (the "
                             "torchvision file in ./pretrained or the torch hub cache if there is one, else random "
                             "init with a warning) or 'none' (random init)", optional_path, metavar="PATH|auto|none")
    fused: object = opt(False, "run the RGA modules through the fused relation path (optionally name a backend)",
                        fused_arg, flag="--fused-rga", metavar="BACKEND")

    def arch_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["arch"]}

    def rga_options(self) -> dict:
        """The RGA options that differ from rga.registry.RGA_OPTIONS (what build_model needs)."""
        return {k: getattr(self, k) for k, v in RGA_OPTIONS.items() if getattr(self, k) != v}

    def label(self) -> str:
        """The row name of this architecture (a key of rga.registry.model_rows()), or VARIANT+custom; with
        '-sNN' when not every stage has a module. Used in run-folder names and logs."""
        options = {k: getattr(self, k) for k in _RGA_FIELDS}
        name = next((n for n, row in model_rows().items()
                     if row["variant"] == self.variant and all(row[k] == options[k] for k in _RGA_FIELDS)),
                    f"{self.variant}+custom")
        if tuple(self.stages) != (1, 2, 3, 4) and self.variant != "baseline":
            name += "-s" + "".join(map(str, self.stages))
        return name


_RGA_FIELDS = ROW_OPTIONS  # the ModelConfig fields that a row of the paper's tables sets


@dataclass
class DataConfig:
    dataset: str = opt("synthetic", "dataset: synthetic (generated under --data-root on first use), synthetic_scenes "
                       "(generated too: people in cluttered scenes), market1501, "
                       "cuhk03, msmt17", string)
    data_root: str = opt("data", "folder holding the datasets", string)
    dataset_opt: dict = opt({}, "extra keyword for rga.data.build_dataset, repeatable (e.g. variant=detected)",
                            kv_dict, metavar="KEY=VALUE")
    sampler: str = opt("one_group", "PK epoch: one_group (one group of K per identity per epoch, the public code's "
                       "and the paper's) or all_groups (every image once, torchreid's: 2-4x more batches)",
                       choice("one_group", "all_groups"))
    batch_ids: int = opt(16, "P: identities per batch (per process)", positive_int)
    batch_instances: int = opt(4, "K: images per identity in a batch", positive_int)
    crop: str = opt("random2d", "random crop: random2d (enlarge 1.125x and crop back with probability --crop-prob, "
                    "the public code's), pad (zero-pad --pad px, crop back), none", choice("random2d", "pad", "none"))
    crop_prob: float = opt(0.5, "probability of the random2d crop", probability)
    pad: int = opt(10, "padding of the 'pad' crop, in pixels", nonneg_int)
    flip_prob: float = opt(0.5, "horizontal flip probability", probability)
    erasing_prob: float = opt(0.5, "random erasing probability", probability)
    workers: int = opt(min(4, os.cpu_count() or 1), "DataLoader worker processes per process", nonneg_int)
    test_batch_size: int = opt(128, "batch size for feature extraction", positive_int)
    val_ids: int = opt(0, "hold out this many training identities as a validation query / gallery and "
                       "evaluate on them instead of the test split, which is then never read (for choosing "
                       "a recipe; rga.data.split); 0: train on every training identity, evaluate on test",
                       nonneg_int)


@dataclass
class OptimConfig:
    label_smooth: float = opt(0.1, "label smoothing epsilon of the ID loss", real)
    margin: float = opt(0.3, "batch-hard triplet margin", real)
    id_weight: float = opt(1.0, "weight of the ID (cross-entropy) loss", real)
    triplet_weight: float = opt(1.0, "weight of the triplet loss", real)
    lr: float = opt(8e-4, "Adam learning rate after warm-up", real)
    weight_decay: float = opt(5e-4, "Adam weight decay", real)
    warmup_epochs: int = opt(20, "linear warm-up length in epochs", nonneg_int)
    warmup_lr: float = opt(8e-6, "learning rate at epoch 0 of the warm-up", real)
    milestones: list = opt(DEFAULT_MILESTONES, "epochs at which the learning rate is multiplied by --gamma",
                           int_list)
    gamma: float = opt(0.5, "learning-rate decay factor at each milestone", real)
    schedule: str = opt("step", "after the warm-up: step (x gamma at each milestone, the paper's) or cosine "
                        "(half a cosine from the learning rate down to 0 at the last epoch; milestones unused)",
                        choice("step", "cosine"))
    new_lr_mult: float = opt(1.0, "learning-rate multiplier of the parameters a --pretrained trunk does not "
                             "provide (attention modules, BN neck, classifier); 1: one learning rate for all",
                             real)
    epochs: int = opt(600, "total training epochs", positive_int)


@dataclass
class EvalConfig:
    eval_every: int = opt(40, "evaluate every N epochs (0: only after the last epoch, which is always evaluated)",
                          nonneg_int)
    eval_feat: str = opt("bn", "feature used for retrieval: after the BN neck (bn) or before it (pool)",
                         choice("bn", "pool"))
    metric: str = opt("cosine", "retrieval distance", choice("cosine", "euclidean"))
    rerank: bool = opt(False, "k-reciprocal re-ranking (off in the paper)", boolean)
    flip_test: bool = opt(False, "average the features of each test image and its mirror", boolean)


@dataclass
class RuntimeConfig:
    output_dir: object = opt(None, "run folder (default runs/DATASET-MODEL-BACKBONE)", optional_path)
    seed: int = opt(0, "random seed (sampler, augmentation, initialisation)", any_int)
    resume: object = opt(None, "continue from a checkpoint file, or 'auto': the latest in --output-dir "
                         "(starts fresh if none)", optional_path, metavar="PATH|auto")
    ckpt_every: int = opt(1, "write a checkpoint every N epochs (and at the end)", positive_int)
    keep_checkpoints: int = opt(2, "keep only the newest N checkpoints (0: keep all)", nonneg_int)
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)", boolean)
    progress: bool = opt(True, "progress bars (only on a terminal, rank 0)", boolean)
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:N", string)
    amp: str = opt("auto", "mixed precision: auto = bf16 (or fp16) on a GPU, off on CPU",
                   choice("auto", "bf16", "fp16", "off"))
    channels_last: str = opt("auto", "channels-last memory format (auto: on for GPU, off on CPU)",
                             choice("auto", "on", "off"))
    threads: int = opt(0, "CPU threads for torch ops per process (0: torch's default); on a busy CPU 1 is "
                       "often much faster", nonneg_int)
    compile: bool = opt(False, "torch.compile the training model", boolean)
    cuda_graphs: bool = opt(False, "GPU only: torch.compile(mode='reduce-overhead'), CUDA graphs for the step",
                            boolean)
    sync_bn: bool = opt(False, "SyncBatchNorm across processes (GPU, with torchrun)", boolean)
    dist_backend: str = opt("auto", "process-group backend under torchrun (auto: nccl on GPU, gloo on CPU)",
                            choice("auto", "nccl", "gloo"))
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms(True)", boolean)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "eval": EvalConfig,
            "run": RuntimeConfig}
#: field name -> (section, dataclasses.Field)
FIELDS = {f.name: (sec, f) for sec, cls in SECTIONS.items() for f in fields(cls)}
#: options that only set the initial weights: a resumed run keeps the values its checkpoint records
INIT_ONLY = ("gate_init",)
ARCH_FIELDS = tuple(n for n, (_, f) in FIELDS.items() if f.metadata["arch"])
#: old names still read in config files and legacy checkpoints
ALIASES = {"arch": "model", "fused_rga": "fused"}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        """Nested plain values (tuples as lists), as stored in checkpoints and config.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict:
        return {name: getattr(getattr(self, sec), name) for name, (sec, _) in FIELDS.items()}

    @classmethod
    def from_flat(cls, values: dict) -> "RunConfig":
        parts = {sec: {} for sec in SECTIONS}
        for name, value in values.items():
            parts[FIELDS[name][0]][name] = value
        cfg = cls(**{sec: SECTIONS[sec](**kw) for sec, kw in parts.items()})
        cfg.model.stages = tuple(cfg.model.stages)
        return cfg

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        """From to_dict()'s layout (or a flat one). Every key must be known."""
        return resolve([(source, data)])

    def validate(self) -> "RunConfig":
        """Cross-field checks that do not need a device; ConfigError saying what was expected."""
        m, o = self.model, self.optim
        if not 0.0 <= o.label_smooth < 1.0:
            raise ConfigError(f"label_smooth must be in [0, 1), got {o.label_smooth}")
        if o.lr <= 0 or o.warmup_lr <= 0:
            raise ConfigError(f"lr and warmup_lr must be > 0, got {o.lr} and {o.warmup_lr}")
        if o.new_lr_mult <= 0:
            raise ConfigError(f"new_lr_mult must be > 0, got {o.new_lr_mult}")
        if o.milestones != sorted(o.milestones):
            raise ConfigError(f"milestones must be increasing, got {o.milestones}")
        if m.variant == "baseline":
            changed = {k: getattr(m, k) for k in _RGA_FIELDS if getattr(m, k) != getattr(ModelConfig, k)}
            if changed or tuple(m.stages) != (1, 2, 3, 4):
                raise ConfigError(f"the baseline has no attention modules, so "
                                  f"{dict(changed, **({'stages': m.stages} if tuple(m.stages) != (1, 2, 3, 4) else {}))}"
                                  " would have no effect; choose an RGA model (--model)")
        if not (m.use_relation or m.use_original):
            raise ConfigError("an RGA module needs use_relation or use_original (both are off)")
        if o.id_weight < 0 or o.triplet_weight < 0 or o.id_weight + o.triplet_weight == 0:
            raise ConfigError(f"id_weight and triplet_weight must be >= 0 and not both 0, got {o.id_weight} and "
                              f"{o.triplet_weight}")
        if o.triplet_weight > 0 and self.data.batch_instances < 2:
            raise ConfigError(f"batch_instances must be >= 2 for the triplet loss (a positive pair per identity), "
                              f"got {self.data.batch_instances}; or set --triplet-weight 0")
        return self


# ------------------------------------------------------------------------------ resolution

def _flatten(data: dict, source: str) -> list:
    """[(key, value)] from a flat or section-nested dict, in order, 'model' presets first."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object of option names to values, got {type(data).__name__}")
    items = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in SECTIONS and isinstance(value, dict):
            items += [(f"{name}.{k}", str(k).lstrip("-").replace("-", "_"), v) for k, v in value.items()]
        else:
            items.append((key, name, value))
    items.sort(key=lambda it: ALIASES.get(it[1], it[1]) != "model")  # the model row first
    return items


def parse_values(data: dict, source: str) -> dict:
    """A flat {field: typed value} from one source (flag dict, preset, file, checkpoint config)."""
    presets = model_rows()
    out = {}
    for key, name, value in _flatten(data, source):
        name = ALIASES.get(name, name)
        if name in ("config", "preset"):
            raise ConfigError(f"{source}: '{key}' cannot be set inside a config")
        if name == "model":
            if value not in presets:
                raise ConfigError(f"{source}: unknown model {value!r}; choose one of {', '.join(presets)}")
            out.update(presets[value])
            continue
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown option '{key}'")
        try:
            out[name] = FIELDS[name][1].metadata["parse"](value)
        except ValueError as e:
            raise ConfigError(f"{source}: bad value for '{key}': {e}") from None
    return out


def resolve(layers) -> RunConfig:
    """[(source name, dict)] lowest priority first -> a validated RunConfig."""
    values = {}
    for source, data in layers:
        values.update(parse_values(data or {}, source))
    return RunConfig.from_flat(values).validate()


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed (pip install pyyaml), "
                              "or write the config as JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"could not parse {path}: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"could not parse {path} as JSON: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object of option names to values")
    return data


# ------------------------------------------------------------------------------ legacy checkpoints

#: keys of the flat argparse config that checkpoints held before checkpoint format 2 and that have
#: no field now (they were flags of the command, not of the run)
_LEGACY_DROPPED = ("config", "preset")


def from_legacy(flat: dict) -> RunConfig:
    """The RunConfig of a checkpoint written before checkpoint format 2 (``vars(args)`` of rga.train)."""
    values = {}
    for key, value in flat.items():
        if key in _LEGACY_DROPPED:
            continue
        if key == "no_progress":
            key, value = "progress", not value
        values[key] = value
    pad = values.get("pad", 10)
    values["crop"] = "pad" if pad else "none"  # the crop of those versions: zero-pad and crop back
    values["sampler"] = "all_groups"  # the only sampler of those versions
    values.setdefault("pretrained", None)
    unknown = [k for k in values if ALIASES.get(k, k) not in FIELDS and k != "arch"]
    for k in unknown:
        values.pop(k)
    return resolve([("legacy checkpoint config", values)])
