"""Checkpoints: safe loading, the manifest committed last, and per-student ZeRO shards that
resume exactly (same number of students) and reshard (a different number).

The multi-process tests train a tiny GPT-2 with DeepSpeed over 1 or 2 student ranks on a
fixed global batch per step (each student takes its slice), save at step 2 and compare the
losses of steps 3-4 after a resume against the uninterrupted run.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from cot2align.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    safe_load,
    save_checkpoint,
    set_rng_state,
)

STAGES = (2, 3)
SAVE_AT, STEPS, BATCH = 2, 4, 4


class _Payload:
    """An object whose unpickling would create a file: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """RNG states (python, numpy, torch) load with weights_only and continue the same streams."""
    import random

    import numpy as np

    save_checkpoint(tmp_path, 1, {"rng": rng_state(), "step": 1})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_a_pickled_object_is_refused_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    folder = save_checkpoint(tmp_path, 3, {"step": 3})
    torch.save({"step": 3, "evil": _Payload(str(marker))}, folder / "state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = (folder / "state.pt").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step_00000003/state\.pt: refused to load"):
        load_checkpoint(folder)
    assert not marker.exists()
    plan = tmp_path / "plan.pt"
    torch.save({"plans": _Payload(str(marker))}, plan)
    with pytest.raises(CheckpointError, match=r"plan\.pt: refused"):
        safe_load(plan)
    assert not marker.exists()


def test_report_plots_refuse_a_pickled_object(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from cot2align.report import plot_plans

    marker = tmp_path / "code_ran"
    plan = tmp_path / "step_000001.pt"
    torch.save({"step": 1, "plans": {}, "x": _Payload(str(marker))}, plan)
    with pytest.raises(CheckpointError, match=r"step_000001\.pt: refused"):
        plot_plans(plan, tmp_path / "out")
    assert not marker.exists()


def test_only_a_committed_manifest_makes_a_checkpoint(tmp_path: Path) -> None:
    """A crash mid-save (no manifest, or a part that does not match its size) is never loaded."""
    save_checkpoint(tmp_path, 1, {"step": 1})
    second = save_checkpoint(tmp_path, 2, {"step": 2})
    assert latest_checkpoint(tmp_path) == second
    (second / "state.pt").write_bytes((second / "state.pt").read_bytes()[:-10])  # truncated
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"
    (second / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"
    half = tmp_path / "checkpoints" / ".tmp_step_00000003"
    half.mkdir()
    torch.save({"step": 3}, half / "state.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(second)


# --------------------------------------------------------------------------- ZeRO shards
class _Loss(nn.Module):
    """Next-token cross-entropy through a projector (a trainable loss module, like the OT projectors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.proj = nn.Linear(16, 16)

    def forward(self, student: nn.Module, ids: Tensor, count: float) -> Any:
        from cot2align.losses.base import LossOutput

        hidden = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (B, T, d)
        logits = student.lm_head(self.proj(hidden))  # type: ignore[operator]  # (B, T, V)
        total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                  reduction="sum") / count
        return LossOutput(total, {"ce": total.detach()})


def _data() -> Tensor:
    return torch.randint(0, 40, (STEPS, BATCH, 10), generator=torch.Generator().manual_seed(6))  # (steps, B, T)


def _shard_worker(rank: int, world: int, root: str, stage: int, resume_from: str | None) -> dict[str, Any]:
    """`world` students at ZeRO `stage`: from scratch (save at SAVE_AT into root/<stage>-dp<world>),
    or resumed from root/<resume_from>; returns the per-step global losses it ran."""
    from cot2align.checkpoint import save_sharded
    from cot2align.distributed.parallel import DataParallel
    from cot2align.optim import TrainConfig
    from cot2align.student.engine import DeepSpeedStepper, StudentMPU

    cfg = TrainConfig(lr=1e-2, min_lr=1e-4, max_steps=STEPS, micro_batch_size=BATCH // world, clip_grad=1.0,
                      weight_decay=0.1)
    dp = DataParallel(size=world, rank=rank, group=dist.group.WORLD)
    singles = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(4)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    loss = _Loss()
    stepper = DeepSpeedStepper(student, loss, cfg, 3e-2, STEPS, stage, StudentMPU(dp, list(range(world)), singles[rank]),
                               zero3_persist_below=0)
    start = 0
    if resume_from is not None:
        folder = latest_checkpoint(Path(root) / resume_from)
        assert folder is not None
        state = load_checkpoint(folder)
        stepper.load_state_dict(state, folder)
        start = state["step"]
    data, losses, sizes = _data(), [], {}
    per = BATCH // world
    for step in range(start, STEPS):
        stepper.zero_grad()
        ids = data[step][rank * per:(rank + 1) * per]
        o = stepper.forward(partial(loss, student, ids, float(data[step][:, 1:].numel())))
        stepper.backward(o.total)
        stepper.step()
        losses.append(dp.sum({"loss": float(o.total.detach())})["loss"])
        if resume_from is None and step + 1 == SAVE_AT:
            trained = stepper.state_dict()
            shard = trained.pop("shard")
            folder = save_sharded(Path(root) / f"{stage}-dp{world}", SAVE_AT, {**trained, "step": SAVE_AT} if rank == 0
                                  else None, shard, rank, world, dp.barrier)
            sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    return {"losses": losses, "files": sizes}


def _run(world: int, root: Path, stage: int, resume_from: str | None = None) -> dict[str, Any]:
    return run_distributed(_shard_worker, world, str(root), stage, resume_from, timeout_s=300)[0]  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_shards_resume_exactly_and_reshard(tmp_path: Path, stage: int) -> None:
    """Each student writes only its own shard; resuming with the same students reproduces the
    next losses exactly, with 1 <-> 2 students (resharding) within fp32 tolerance."""
    one, two = _run(1, tmp_path, stage), _run(2, tmp_path, stage)
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(two["losses"]), rtol=1e-5, atol=0)
    assert {"state.pt", "manifest.json", "shard_00000.pt", "shard_00001.pt"} == set(two["files"])
    after = slice(SAVE_AT, STEPS)
    same = _run(2, tmp_path, stage, f"{stage}-dp2")["losses"]
    assert same == two["losses"][after]
    down = _run(1, tmp_path, stage, f"{stage}-dp2")["losses"]
    up = _run(2, tmp_path, stage, f"{stage}-dp1")["losses"]
    for resharded in (down, up):
        torch.testing.assert_close(torch.tensor(resharded), torch.tensor(one["losses"][after]), rtol=1e-5, atol=0)
    shard = safe_load(tmp_path / f"{stage}-dp2" / "checkpoints" / "step_00000002" / "shard_00001.pt")
    total = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                                                                n_positions=16)).parameters()) + 16 * 16 + 16
    held = sum(e["fp32"].numel() for e in shard["params"].values())
    assert 0 < held < total * 0.75  # a part, not the whole optimizer


def test_zero_checkpoint_refuses_a_plain_resume(tmp_path: Path) -> None:
    """Stage mismatches name the folder and what to do."""
    from cot2align.student.engine import DeepSpeedStepper

    fake = object.__new__(DeepSpeedStepper)
    fake.zero_stage = 0
    fake.modules = nn.ModuleDict({"student": nn.Linear(2, 2), "loss": nn.Linear(2, 2)})  # type: ignore[assignment]
    state = {"student": fake.modules["student"].state_dict(), "loss": fake.modules["loss"].state_dict(),
             "zero": {"stage": 2, "replicas": 2, "lr": [1.0]}}
    with pytest.raises(CheckpointError, match=r"step_9.*runtime\.zero_stage > 0"):
        fake.load_state_dict(state, tmp_path / "step_9")
