"""Config: merge order, strict keys, typed values, validation messages naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cot2align.config import Config, load_config
from cot2align.configbase import ConfigError


def test_default_config_loads_and_overrides_apply() -> None:
    cfg = load_config(None, ["loss.ot.sinkhorn.epsilon=0.1", "train.lr=3e-4", "loss.ot.student_layers=[0,1,-1]",
                             "loss.ot.teacher_layers=[0,2,-1]"])
    assert cfg.loss.ot.sinkhorn.epsilon == 0.1
    assert cfg.train.lr == 3e-4
    assert cfg.loss.ot.student_layers == [0, 1, -1]
    # untouched values keep the YAML's, not the dataclass default
    assert cfg.loss.name == "cot2align"
    assert cfg.train.micro_batch_size == load_config().train.micro_batch_size


def test_yaml_then_overrides_order(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train: {lr: 0.1, epochs: 3}\nloss: {name: sft}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {lr: 0.2}\n")
    cfg = load_config(child, ["train.epochs=5"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.loss.name) == (0.2, 5, "sft")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.name=foo", "loss.name: got 'foo', expected one of 'sft'"),
        ("loss.ot.costt=cosine", "unknown config key 'loss.ot.costt'"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.micro_batch_size=abc", "train.micro_batch_size: got 'abc', expected an integer"),
        ("loss.ot.sinkhorn.epsilon=0", "loss.ot.sinkhorn.epsilon: must be > 0"),
        ("loss.ot.teacher_layers=[0]", "loss.ot.teacher_layers: must have as many entries"),
        ("loss.kd_rate=1.5", "loss.kd_rate: must be in [0, 1]"),
        ("data.max_prompt_length=999", "data.max_prompt_length: must be in [1, max_length="),
        ("loss.ot.student_layers=[0,-3]", "loss.ot.student_layers: layer -3"),
        ("nokey", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'trian'"):
        load_config(typo)


def test_round_trip_to_dict() -> None:
    cfg = load_config(None, ["loss.ot.cost=cosine"])
    again = Config().merged(cfg.to_dict())
    assert again == cfg


def test_resuming_a_run_made_with_another_config_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cot2align.checkpoint import save_checkpoint
    from cot2align.logging import log
    from cot2align.recipes.prepare import write_run_files

    monkeypatch.setattr(log, "propagate", True)
    first = load_config(None, [f"run.output_dir={tmp_path}"])
    write_run_files(first, first.run_dir, "distill")
    save_checkpoint(first.run_dir, 1, {"step": 1})
    write_run_files(first, first.run_dir, "distill")
    assert "different config" not in caplog.text
    second = load_config(None, [f"run.output_dir={tmp_path}", "train.lr=0.1", "runtime.mode=colocated"])
    write_run_files(second, second.run_dir, "distill")
    assert "different config (runtime.mode, train.lr)" in caplog.text
