"""The served runtime against the colocated reference, failures, and its small parts.

Multi-process tests spawn a local gloo world with `launch_local` (teacher ranks first,
then student ranks) on tiny models built here; the colocated reference is the same
config run in this process with the same global batch (grad_accum x dp).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from dist import run_distributed
from supervised import alive, children, wait_gone
from tiny import STUDENT
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from cot2align.config import Config
from cot2align.configbase import ConfigError
from cot2align.distributed.failures import DesyncError
from cot2align.distributed.transport import DATA, DataHeader, Request, checksum, pack, unpack
from cot2align.train import TrainResult

STEPS = 5


def _cfg(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, *, mode: str, loss: str = "cot2align",
         dp: int = 2, replicas: int = 1, steps: int = STEPS, overrides: list[str] | None = None) -> Config:
    """Served: dp student ranks with grad_accum 1; colocated: one process with grad_accum = dp."""
    cfg = Config().merged({
        "run": {"output_dir": str(out), "name": f"{mode}-{loss}", "seed": 3, "work_dir": str(out / "work"),
                "resume": False},
        "data": {"train_file": str(tiny_task["train"]), "dev_file": str(tiny_task["dev"]),
                 "test_file": str(tiny_task["test"]), "max_length": 128, "max_prompt_length": 40},
        "cot": {"enabled": False},
        "teacher": {"path": str(teacher_dir), "tokenizer": str(tiny_task["tok_teacher"]),
                    "parallel": {"replicas": replicas}},
        "student": {"tokenizer": str(tiny_task["tok_student"]), "parallel": {"dp": dp}},
        "embedded": {"student_model": STUDENT.to_dict()},
        "loss": {"name": loss},
        "train": {"lr": 1e-2, "min_lr": 1e-4, "max_steps": steps, "micro_batch_size": 4,
                  "grad_accum": dp if mode == "colocated" else 1},
        "eval": {"dev_limit": 2, "max_new_tokens": 4, "seeds": [1]},
        "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
        "runtime": {"mode": mode, "timeout_s": 60},
    }).with_overrides(overrides or [])
    cfg.validate()
    return cfg


_REFERENCES: dict[tuple[Any, ...], TrainResult] = {}


def _colocated(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, loss: str, dp: int,
               steps: int = STEPS, base: str = "dskd") -> TrainResult:
    """The colocated run with the same global batches (cached: several served cases share it)."""
    from cot2align.recipes.pipeline import distill

    key = (loss, dp, steps, base)
    if key not in _REFERENCES:
        _REFERENCES[key] = distill(_cfg(tiny_task, teacher_dir, out, mode="colocated", loss=loss, dp=dp,
                                        steps=steps, overrides=[f"loss.base={base}"]))
    return _REFERENCES[key]


def _assert_same_losses(served: TrainResult, colocated: TrainResult, steps: int) -> None:
    a = [h["loss"] for h in served.history]
    b = [h["loss"] for h in colocated.history]
    assert len(a) == len(b) == steps
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor([h["grad_norm"] for h in served.history]),
                               torch.tensor([h["grad_norm"] for h in colocated.history]), rtol=1e-3, atol=0)
    assert [h["lr"] for h in served.history] == pytest.approx([h["lr"] for h in colocated.history])


# --------------------------------------------------------------------------- single process
def test_header_request_and_packing_round_trip() -> None:
    h = DataHeader(kind=DATA, step=3, micro=1, fmt=1, layers=(4, 0), rows=7, width=5, lengths_sum=checksum([3, 4]),
                   indices_sum=checksum([10, 2]))
    assert DataHeader.from_tensor(h.to_tensor(torch.device("cpu"))) == h
    r = Request(first_step=2, total_steps=9, layers=(4, 0), fmts=("main", "aux"), num_samples=96, micro_batch=4,
                accum=2, dp=3, seed=7)
    assert Request.from_tensor(r.to_tensor(torch.device("cpu"))) == r
    with pytest.raises(DesyncError, match="not a message header"):
        DataHeader.from_tensor(torch.zeros(32, dtype=torch.int64))
    assert checksum([3, 4]) != checksum([4, 3])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # lengths 2, 3
    hidden = {0: torch.randn(2, 3, 5), 4: torch.randn(2, 3, 5)}
    packed = pack(hidden, mask, [4, 0], torch.float32)
    assert packed.shape == (2, 5, 5)
    back = unpack(packed, mask, [4, 0], torch.float32)
    for layer in (0, 4):
        assert torch.equal(back[layer][mask], hidden[layer][mask])
        assert not back[layer][~mask].any()


def test_teacher_io_reads_only_head_and_embedding(teacher_dir: Path, tmp_path: Path) -> None:
    from cot2align.models import load_model
    from cot2align.student.teacher_io import load_teacher_io

    model = load_model(teacher_dir)
    io = load_teacher_io(teacher_dir)
    x = torch.randn(2, 3, 32)
    assert torch.equal(io.head(x), model.get_output_embeddings()(x))
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(io.embed(ids), model.get_input_embeddings()(ids))
    assert (io.num_layers, io.hidden_size) == (2, 32)
    assert not any(p.requires_grad for p in [*io.head.parameters(), *io.embed.parameters()])
    # a tied model (GPT-2): the checkpoint has no separate output weight
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    gpt2.save_pretrained(tmp_path, safe_serialization=True)
    io2 = load_teacher_io(tmp_path)
    y = torch.randn(4, 16)
    assert torch.equal(io2.head(y), gpt2.lm_head(y))


def test_served_config_is_checked(tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path) -> None:
    from cot2align.recipes.served import check_served, local_world_size

    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", overrides=["teacher.parallel.tp=2"])
    with pytest.raises(ConfigError, match="teacher_backend=hf runs the teacher on one rank"):
        check_served(cfg)
    with pytest.raises(ConfigError, match=r"runtime\.zero_stage"):
        _cfg(tiny_task, teacher_dir, tmp_path, mode="served", overrides=["runtime.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"runtime\.zero_stage: 3 does not support the dskd KD term"):
        _cfg(tiny_task, teacher_dir, tmp_path, mode="served", overrides=["runtime.zero_stage=3", "loss.base=dskd"])
    with pytest.raises(ConfigError, match=r"runtime\.zero3_persist_below"):
        _cfg(tiny_task, teacher_dir, tmp_path, mode="served", overrides=["runtime.zero3_persist_below=-1"])
    with pytest.raises(ConfigError, match=r"student\.parallel\.dp: is 0 \(no student rank\)"):
        check_served(cfg.with_overrides(["teacher.parallel.tp=1", "student.parallel.dp=0"]))
    megatron = cfg.with_overrides(["runtime.teacher_backend=megatron", "teacher.parallel.replicas=2"])
    check_served(megatron)
    assert local_world_size(megatron) == 2 * 2 + 2


# --------------------------------------------------------------------------- ZeRO-3 stepper
class _HeadLoss(nn.Module):
    """A loss that, like DSKD, multiplies by the student's output-head weight outside the head's forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, student: nn.Module, ids: Tensor, count: float) -> Any:
        from cot2align.losses.base import LossOutput
        from cot2align.models import output_head

        hidden = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (B, T, d)
        w = output_head(student).weight  # (V, d), read outside the head's forward
        logits = self.proj(hidden) @ w.T  # (B, T, V)
        total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                  reduction="sum") / count
        return LossOutput(total, {"ce": total.detach()})


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(4)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def _zero3_data() -> Tensor:
    return torch.randint(0, 40, (3, 4, 10), generator=torch.Generator().manual_seed(6))  # (steps, B, T)


def _zero3_worker(rank: int, world: int, out: str) -> dict[str, Any]:
    """2 students, ZeRO-3 (only the 16-element norms stay whole): 3 steps on half batches each,
    then save, gather, reload into a fresh stepper and step again."""
    from cot2align.checkpoint import load_checkpoint, save_sharded
    from cot2align.distributed.parallel import DataParallel
    from cot2align.optim import TrainConfig
    from cot2align.student.engine import DeepSpeedStepper, StudentMPU

    cfg = TrainConfig(lr=1e-2, min_lr=1e-4, max_steps=4, micro_batch_size=2, clip_grad=1.0)
    dp = DataParallel(size=world, rank=rank, group=dist.group.WORLD)
    single = dist.new_group([0]), dist.new_group([1])

    def make() -> tuple[DeepSpeedStepper, nn.Module, nn.Module]:
        student, loss = _tiny_gpt2(), _HeadLoss()
        mpu = StudentMPU(dp, [0, 1], single[rank])
        return DeepSpeedStepper(student, loss, cfg, 1e-2, 4, 3, mpu, zero3_persist_below=20), student, loss

    stepper, student, loss = make()
    data = _zero3_data()
    losses, norms = [], []
    for ids in data:
        stepper.zero_grad()
        mine = ids[rank * 2:(rank + 1) * 2]
        o = stepper.forward(partial(loss, student, mine, float(ids[:, 1:].numel())))
        stepper.backward(o.total)
        norms.append(stepper.step())
        parts = dp.sum({"loss": float(o.total.detach())})
        losses.append(parts["loss"])
    partitioned = {n: p.numel() == 0 for n, p in student.named_parameters()}  # between steps
    state = stepper.state_dict()
    shard = state.pop("shard")
    folder = save_sharded(out, 3, state if rank == 0 else None, shard, rank, world, dp.barrier)
    full = stepper.full_weights()
    weights = {k: v.clone() for k, v in full.student.state_dict().items()} if rank == 0 else {}
    again, student2, loss2 = make()
    again.load_state_dict(load_checkpoint(folder), folder)
    gathered = again.full_weights()
    reloaded = {k: v.clone() for k, v in gathered.student.state_dict().items()} if rank == 0 else {}
    extra = []
    for st, s, lf in ((stepper, student, loss), (again, student2, loss2)):
        st.zero_grad()
        o = st.forward(partial(lf, s, data[0][rank * 2:(rank + 1) * 2], 1.0))
        st.backward(o.total)
        st.step()
        extra.append(dp.sum({"loss": float(o.total.detach())})["loss"])
    return {"partitioned": partitioned, "losses": losses, "norms": norms, "weights": weights,
            "loss_state": dict(full.loss), "reloaded": reloaded, "extra": extra}


@pytest.mark.slow
def test_zero3_stepper_matches_one_process(tmp_path: Path) -> None:
    """ZeRO-3 over 2 students == one process (loss, norm, weights), with the output-head weight read
    outside its module; weights are really partitioned; save -> load reproduces the next step."""
    from cot2align.optim import PlainStepper, TrainConfig

    results = run_distributed(_zero3_worker, 2, str(tmp_path), timeout_s=300)
    first = results[0]
    assert first["partitioned"]["transformer.wte.weight"] and first["partitioned"]["transformer.h.0.mlp.c_fc.weight"]
    assert not first["partitioned"]["transformer.ln_f.weight"]  # 16 elements < 20: kept whole
    cfg = TrainConfig(lr=1e-2, min_lr=1e-4, max_steps=4, micro_batch_size=2, clip_grad=1.0)
    student, loss = _tiny_gpt2(), _HeadLoss()
    ref = PlainStepper(student, loss, cfg, 1e-2, 4)
    losses, norms = [], []
    for ids in _zero3_data():
        ref.zero_grad()
        o = ref.forward(partial(loss, student, ids, float(ids[:, 1:].numel())))
        ref.backward(o.total)
        norms.append(ref.step())
        losses.append(float(o.total))
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(first["norms"]), torch.tensor(norms), rtol=1e-4, atol=0)
    full = student.state_dict()
    assert set(first["weights"]) == set(full)
    for k, v in full.items():
        torch.testing.assert_close(first["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(first["reloaded"][k], first["weights"][k]), k
    for k, v in loss.state_dict().items():
        torch.testing.assert_close(first["loss_state"][k], v, rtol=1e-4, atol=1e-5)
    assert first["extra"][0] == first["extra"][1]  # the reloaded stepper continues identically
    assert results[1]["weights"] == {}  # whole weights only on the first student


# --------------------------------------------------------------------------- served worlds
@pytest.mark.slow
@pytest.mark.parametrize(("loss", "zero_stage"), [("cot2align", 1), ("dskd", 2)])
def test_served_hf_matches_colocated(tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path, loss: str,
                                     zero_stage: int) -> None:
    """1 hf teacher rank + 2 DeepSpeed students == one colocated process, step by step; for
    cot2align also: resuming from the step-4 checkpoint reproduces step 5 (teacher starts at 4)."""
    from cot2align.recipes.pipeline import distill

    ref = _colocated(tiny_task, teacher_dir, tmp_path / "ref", loss, dp=2)
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", loss=loss,
               overrides=[f"runtime.zero_stage={zero_stage}", "train.save_every=2"])
    res = distill(cfg)
    _assert_same_losses(res, ref, STEPS)
    assert (cfg.run_dir / "final" / "config.json").is_file()
    if loss != "cot2align":
        return
    assert {"ot/main_main", "ot/aux_main", "ot/main_aux"} <= set(res.history[0])
    (cfg.run_dir / "checkpoints" / "latest").write_text("step_00000004")  # kept: steps 4 and 5
    resumed = distill(cfg.with_overrides(["run.resume=true"]))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(resumed.history[-1]["loss"]), torch.tensor(res.history[-1]["loss"]),
                               rtol=1e-6, atol=0)


@pytest.mark.slow
def test_served_zero3_matches_colocated_resumes_and_exports(tiny_task: dict[str, Path], teacher_dir: Path,
                                                           tmp_path: Path) -> None:
    """ZeRO-3 over 2 students, every weight partitioned (zero3_persist_below=0), fp32 == one colocated
    process step by step; the exported model == the checkpoint's gathered weights == the colocated
    model's; resuming from the step-4 checkpoint reproduces step 5."""
    from safetensors.torch import load_file

    from cot2align.checkpoint import latest_checkpoint, load_checkpoint
    from cot2align.recipes.pipeline import distill

    ref = _colocated(tiny_task, teacher_dir, tmp_path / "ref", "cot2align", dp=2, base="none")
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", overrides=[
        "runtime.zero_stage=3", "runtime.zero3_persist_below=0", "train.save_every=2", "loss.base=none"])
    res = distill(cfg)
    _assert_same_losses(res, ref, STEPS)
    exported = load_file(cfg.run_dir / "final" / "model.safetensors")
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None
    state = load_checkpoint(ckpt)
    assert state["step"] == STEPS and state["zero"]["replicas"] == 2
    assert (ckpt / "shard_00000.pt").is_file() and (ckpt / "shard_00001.pt").is_file()
    colocated = load_file(ref.export_dir.parent / "final" / "model.safetensors")
    assert set(exported) == set(colocated) and exported
    for k, v in exported.items():
        assert torch.equal(v, state["student"][k]), k
        torch.testing.assert_close(v, colocated[k], rtol=1e-3, atol=1e-4, msg=k)
    loss_modules = torch.load(cfg.run_dir / "final" / "loss_modules.pt")
    assert loss_modules and all(torch.equal(v, state["loss"][k]) for k, v in loss_modules.items())
    (cfg.run_dir / "checkpoints" / "latest").write_text("step_00000004")  # kept: steps 4 and 5
    resumed = distill(cfg.with_overrides(["run.resume=true"]))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(resumed.history[-1]["loss"]), torch.tensor(res.history[-1]["loss"]),
                               rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 1, 2), (1, 2, 1)], ids=["tp2-dp2", "pp2-dp1"])
def test_served_megatron_matches_colocated(tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path, tp: int,
                                           pp: int, dp: int) -> None:
    """megatron-core teacher shards (TP2 or PP2, fp32) serving the students == colocated HF teacher."""
    from cot2align.recipes.served import launch_local

    ref = _colocated(tiny_task, teacher_dir, tmp_path / "ref", "cot2align", dp=dp)
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", dp=dp, overrides=[
        "runtime.teacher_backend=megatron", f"teacher.parallel.tp={tp}", f"teacher.parallel.pp={pp}"])
    res = launch_local(cfg, timeout_s=240)
    _assert_same_losses(res, ref, STEPS)


@pytest.mark.slow
def test_odd_layout_two_replicas_three_students(tiny_task: dict[str, Path], teacher_dir: Path,
                                                tmp_path: Path) -> None:
    """2 hf teacher replicas serving 3 students (replica 0 serves students 0 and 2)."""
    from cot2align.recipes.served import launch_local

    ref = _colocated(tiny_task, teacher_dir, tmp_path / "ref", "cot2align", dp=3, steps=2)
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", dp=3, replicas=2, steps=2,
               overrides=["runtime.prefetch=1"])
    res = launch_local(cfg, timeout_s=240)
    _assert_same_losses(res, ref, 2)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_students_fail_fast_when_a_teacher_dies(tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path,
                                                fault: str) -> None:
    """Teacher rank 0 exits (or stops sending) after 6 messages: the students fail within their
    deadline with an error naming that rank and its role; nothing hangs."""
    from cot2align.distributed.spawn import WorldError
    from cot2align.recipes.served import launch_local
    from cot2align.teacher.serve import FAULT_ENV

    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", steps=8, overrides=["runtime.timeout_s=4"])
    t0 = time.monotonic()
    with pytest.raises(WorldError) as info:
        launch_local(cfg, env={FAULT_ENV: f"{fault}:0:6"}, timeout_s=150)
    elapsed = time.monotonic() - t0
    assert elapsed < 120, f"took {elapsed:.0f} s"
    failures = info.value.failures
    assert set(failures) == {0, 1, 2}
    if fault == "exit":
        assert "exited with code 17" in failures[0]
    named = [r for r in (1, 2) if "teacher rank 0 (replica 0, pp 0, tp 0)" in failures[r]]
    assert named, failures  # at least one student names the teacher; the other may fail in its all-reduce
    if fault == "hang":
        assert any("sent nothing for 4 s" in failures[r] for r in named)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_training_world_dies_with_its_killed_supervisor(tiny_task: dict[str, Path], teacher_dir: Path,
                                                        tmp_path: Path) -> None:
    """`launch_local` in a supervisor process that is SIGKILLed mid-training (it runs no cleanup):
    every rank is gone within seconds, not training on as an orphan."""

    cfg = _cfg(tiny_task, teacher_dir, tmp_path, mode="served", steps=100_000)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from cot2align.config import load_config; from cot2align.recipes.served import launch_local; "
            "launch_local(load_config(sys.argv[1]))")
    sup = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "config.yaml")], env=env,
                           start_new_session=True)
    ranks: list[int] = []
    try:
        metrics, deadline = cfg.run_dir / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # training
            assert sup.poll() is None and time.monotonic() < deadline, "the world did not start training"
            time.sleep(0.5)
        ranks = [p for p in children(sup.pid) if alive(p)]
        assert len(ranks) >= 3  # 1 teacher + 2 students (+ multiprocessing's resource tracker)
        sup.kill()
        sup.wait(timeout=10)
        assert wait_gone(ranks, 10.0) == [], "ranks outlived their killed supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()
        for p in ranks:
            if alive(p):
                os.kill(p, signal.SIGKILL)

