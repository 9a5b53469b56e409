"""The root config: one dataclass per component, composed; YAML + dotted overrides.

    cfg = load_config("configs/embedded.yaml", ["loss.ot.epsilon=0.1"])

Merge order: defaults <- YAML (possibly `base:`-chained) <- overrides; then `validate()`
runs before anything heavy starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cot2align.configbase import REPO_ROOT, ConfigBase, ConfigError, load_yaml, require
from cot2align.cot.generate import CotGenConfig
from cot2align.data.dataset import DataConfig
from cot2align.data.embedded import EmbeddedTaskConfig
from cot2align.distributed.config import RuntimeConfig
from cot2align.distributed.topology import StudentParallelConfig, TeacherParallelConfig
from cot2align.evaluate import EvalConfig
from cot2align.launch.slurm import LaunchConfig
from cot2align.logging import LoggingConfig
from cot2align.lora import LoraConfig
from cot2align.losses.config import LossConfig
from cot2align.models import DTYPES, TinyModelConfig
from cot2align.optim import TrainConfig
from cot2align.plan import ClusterSpec
from cot2align.teacher.cache import TeacherCacheConfig

DEFAULT_CONFIG = REPO_ROOT / "configs" / "embedded.yaml"


@dataclass
class RunConfig(ConfigBase):
    """Names and places (`run.*`)."""

    name: str = "embedded"
    """The run directory's name under output_dir, the Slurm job name and the W&B run name: no path
    separators, not `.` or `..` (spaces and other characters are quoted where needed)."""
    output_dir: str = "runs"
    """Run directories are created under here: <output_dir>/<name>."""
    work_dir: str = ".cache/embedded"
    """Shared artefacts reused across runs: generated data, tokenizers, the trained embedded teacher."""
    seed: int = 10
    resume: bool = True
    """Resume from the run directory's latest checkpoint when one exists."""

    def check(self, prefix: str) -> None:
        name = self.name
        require(bool(name.strip()), f"{prefix}.name", "must not be empty")
        require(not any(sep in name for sep in ("/", "\\")), f"{prefix}.name",
                f"{name!r} contains a path separator; the name becomes a folder under run.output_dir, so "
                "use a plain name (put the run elsewhere with run.output_dir)")
        require(name not in (".", "..") and not name.startswith(".."), f"{prefix}.name",
                f"{name!r} would point outside run.output_dir; use a plain name")
        require(not any(ord(c) < 32 for c in name), f"{prefix}.name",
                f"{name!r} contains a control character (newline, tab, ...)")


@dataclass
class TokenizerSpec(ConfigBase):
    """A tokenizer trained on the embedded corpus."""

    kind: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    vocab_size: int = 400

    def check(self, prefix: str) -> None:
        require(self.vocab_size >= 64, f"{prefix}.vocab_size", f"must be >= 64, got {self.vocab_size}")


@dataclass
class EmbeddedConfig(ConfigBase):
    """The embedded default: generated task, trained tokenizers, tiny models (`embedded.*`)."""

    task: EmbeddedTaskConfig = field(default_factory=EmbeddedTaskConfig)
    teacher_tokenizer: TokenizerSpec = field(default_factory=lambda: TokenizerSpec("bpe", 400))
    student_tokenizer: TokenizerSpec = field(default_factory=lambda: TokenizerSpec("unigram", 300))
    teacher_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    student_model: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(arch="gpt2", layers=2, hidden=64, heads=4, kv_heads=4,
                                                intermediate=256))


@dataclass
class ModelConfig(ConfigBase):
    """A teacher or student model (`teacher.*`, `student.*`)."""

    path: str = ""
    """HF checkpoint folder ('' = the embedded model: the trained tiny teacher, a fresh tiny student)."""
    tokenizer: str = ""
    """Tokenizer folder ('' = the checkpoint folder, or the embedded tokenizer)."""
    dtype: Literal["float32", "bfloat16"] = "float32"

    def check(self, prefix: str) -> None:
        require(self.dtype in DTYPES, f"{prefix}.dtype", f"expected one of {list(DTYPES)}")


@dataclass
class TeacherModelConfig(ModelConfig):
    """The teacher (`teacher.*`): model + how the served runtime splits it over ranks."""

    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)
    cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    """The teacher-state cache: write the served states once, read them every later epoch and run."""
    init: str = ""
    """HF checkpoint that train-teacher fine-tunes when `path` is '' ('' = a fresh embedded tiny teacher);
    the result is cached under run.work_dir like the embedded teacher."""

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(not (self.path and self.init), f"{prefix}.init",
                f"set either {prefix}.path (a trained teacher to use as is) or {prefix}.init (a checkpoint "
                f"train-teacher fine-tunes), not both")


@dataclass
class StudentModelConfig(ModelConfig):
    """The student (`student.*`): model + its data-parallel replicas in the served runtime."""

    parallel: StudentParallelConfig = field(default_factory=StudentParallelConfig)


@dataclass
class Config(ConfigBase):
    """Everything a run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    student: StudentModelConfig = field(default_factory=StudentModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=4))
    """Teacher SFT (train-teacher) settings."""
    teacher_train_lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters for teacher SFT (off: full fine-tuning); the export has them merged."""
    student_lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters for the distilled student (off: every weight trains); exports have them merged."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    cot: CotGenConfig = field(default_factory=CotGenConfig)
    """Teacher rationale generation (generate-cot)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Colocated (one process) or served (teacher ranks serve hidden states to student ranks)."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    """The machines a cluster run gets (nodes x GPUs, memory, links); read by the planner and the launcher."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How launcher/submit.py starts the run: Slurm job settings and the planner's choices."""

    def check(self, prefix: str) -> None:
        dskd = self.loss.name == "dskd" or (self.loss.name == "cot2align" and self.loss.base == "dskd")
        require(not (dskd and self.runtime.mode == "served" and self.runtime.zero_stage == 3), "runtime.zero_stage",
                "3 does not support the dskd KD term yet (it reads the student's output-layer weight outside its "
                "module, which ZeRO-3 keeps partitioned there): use runtime.zero_stage <= 2, or loss.base "
                "uld / mined / none")
        ot = self.loss.ot
        for key, layers in (("student_layers", ot.student_layers), ("teacher_layers", ot.teacher_layers)):
            for layer in layers:
                require(layer >= -1, f"loss.ot.{key}", f"layer {layer}: use 0..L or -1 for the final layer")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def digest(self, *sections: str) -> str:
        """Short hash of the given top-level sections (cache keys for reusable artefacts)."""
        blob = json.dumps({s: getattr(self, s).to_dict() for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file; a top-level `base: other.yaml` is read first and deep-merged under it."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops ({' -> '.join(str(p) for p in seen)})")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_chain((path.parent / base), (*seen, path.resolve()))
    return _deep_merge(parent, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path | None = None) -> dict[str, Any]:
    """The raw mapping a YAML config file sets (its `base` chain merged under it; default:
    configs/embedded.yaml), before defaults and validation: which keys a user gave."""
    return _read_chain(Path(path) if path else DEFAULT_CONFIG)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults <- YAML (default: configs/embedded.yaml) <- overrides, validated."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = read_config_file(path)
    try:
        cfg = Config().merged(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = cfg.with_overrides(list(overrides or []))
    cfg.validate()
    return cfg
