"""The teacher-state cache in the recipes: served-written == cached losses in a student-only world,
a colocated run and a served world that run the teacher for their first epoch only (auto), cache-teacher
then students only, and a key mismatch refused before training."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny import STUDENT
from torch import nn

from cot2align.config import Config
from cot2align.configbase import changed_keys
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.distributed.spawn import WorldError, spawn_world
from cot2align.models import load_tokenizer
from cot2align.recipes import colocated
from cot2align.recipes.cache import cache_teacher, served_then_cached, teacher_dtype
from cot2align.recipes.pipeline import distill
from cot2align.recipes.prepare import read_samples
from cot2align.recipes.served import launch_local, run_rank, without_teacher_ranks
from cot2align.student.teacher_io import TeacherIO
from cot2align.teacher.cache import MANIFEST, CacheError, CacheKey, CacheReader, required_entries, stored_key
from cot2align.teacher.colocated import ColocatedTeacher
from cot2align.teacher.serve import MegatronHiddenStates, ServeStats


def _cfg(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, name: str, *, mode: str = "colocated",
         cache: str = "off", dtype: str = "float32", dp: int = 1, micro: int = 4, train: dict[str, Any] | None = None
         ) -> Config:
    cfg = Config().merged({
        "run": {"output_dir": str(out), "name": name, "seed": 3, "work_dir": str(out / "work"), "resume": False},
        "data": {"train_file": str(tiny_task["train"]), "dev_file": str(tiny_task["dev"]),
                 "test_file": str(tiny_task["test"]), "max_length": 128, "max_prompt_length": 40},
        "cot": {"enabled": False},
        "teacher": {"path": str(teacher_dir), "tokenizer": str(tiny_task["tok_teacher"]),
                    "cache": {"mode": cache, "dtype": dtype, "dir": str(out / "teacher-cache"), "shard_mb": 1}},
        "student": {"tokenizer": str(tiny_task["tok_student"]), "parallel": {"dp": dp}},
        "embedded": {"student_model": STUDENT.to_dict()},
        "loss": {"name": "cot2align"},
        "train": {"lr": 1e-2, "min_lr": 1e-4, "max_steps": 5, "micro_batch_size": micro, "grad_accum": 1,
                  **(train or {})},
        "eval": {"dev_limit": 2, "max_new_tokens": 4, "seeds": [1]},
        "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
        "runtime": {"mode": mode, "timeout_s": 60},
    })
    cfg.validate()
    return cfg


def _losses(res: Any, key: str = "loss") -> torch.Tensor:
    return torch.tensor([h[key] for h in res.history], dtype=torch.float64)


def _student_3_dies_after_the_teacher_is_done(cfg: Config) -> Any:
    """`run_rank`, where rank 3 (student dp 2) dies a second after the teacher rank sealed the cache
    (teacher.cache.mode=auto: it then returns while the students train on)."""
    if os.environ["RANK"] == "3":
        def die() -> None:
            while not (Path(cfg.teacher.cache.dir) / MANIFEST).is_file():
                time.sleep(0.05)
            time.sleep(1.0)
            os._exit(9)

        threading.Thread(target=die, daemon=True).start()
    return run_rank(cfg)


@pytest.mark.slow
def test_a_student_dying_after_the_teacher_is_done_is_named_alone(tiny_task: dict[str, Path], teacher_dir: Path,
                                                                   tmp_path: Path) -> None:
    """1 teacher rank + 3 students under teacher.cache.mode=auto: the teacher serves the first epoch and
    is done; a student dies in a later epoch. Its peers name it, and only it: the rendezvous store their
    blame reads lives in global rank 0, the teacher, which keeps it up while the students train (had
    it exited, each survivor would find the store gone and call both of its peers dead)."""
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, "dies", mode="served", cache="auto", dp=3,
               train={"max_steps": 0, "epochs": 8})
    with pytest.raises(WorldError) as info:
        spawn_world(_student_3_dies_after_the_teacher_is_done, cfg, 4, essential=[1, 2, 3], grace_s=60,
                    timeout_s=300)
    failures = info.value.failures
    assert (tmp_path / "teacher-cache" / MANIFEST).is_file()
    assert "exited with code 9" in failures[3], failures
    for survivor in (1, 2):  # without the store: "student rank 2 (dp 1), student rank 3 (dp 2) died or hangs"
        assert failures[survivor].startswith("PeerDied: student rank 3 (dp 2) died or hangs"), failures


@pytest.mark.slow
def test_served_write_then_student_only_world_gives_the_same_losses(tiny_task: dict[str, Path], teacher_dir: Path,
                                                                    tmp_path: Path) -> None:
    """1 teacher rank + 2 students writing an fp32 cache while serving (5 of 12 steps of an epoch: the
    teacher computes the rest after the last step), then a world of 2 students and NO teacher rank
    reading it: every step's loss parts and gradient norm are equal. The read run records its config
    as `without_teacher_ranks` gives it (the quality sweep resumes a run whose config is unchanged)."""

    live_cfg = _cfg(tiny_task, teacher_dir, tmp_path, "live", mode="served", cache="write", dp=2)
    live = launch_local(live_cfg, timeout_s=300)
    assert (tmp_path / "teacher-cache" / MANIFEST).is_file()
    cached_cfg = _cfg(tiny_task, teacher_dir, tmp_path, "cached", mode="served", cache="read", dp=2)
    ranks = launch_local(cached_cfg, timeout_s=300, return_all=True)
    assert len(ranks) == 2  # students only
    saved = yaml.safe_load((cached_cfg.run_dir / "config.yaml").read_text())
    assert changed_keys(saved, without_teacher_ranks(cached_cfg).to_dict()) == []  # what resumes compare
    cached = ranks[0]
    assert len(live.history) == len(cached.history) == 5
    for key in live.history[0]:
        assert torch.equal(_losses(live, key), _losses(cached, key)), key


@pytest.mark.slow
def test_colocated_auto_runs_the_teacher_for_the_first_epoch_only(tiny_task: dict[str, Path], teacher_dir: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two epochs with teacher.cache.mode=auto (fp32): the teacher forwards the first epoch's
    micro-batches plus one batch of the samples that epoch dropped, then never again; the losses
    equal a run without cache (fp32 up to batch-composition rounding); a second auto run reads only."""

    calls = {"n": 0}
    live_views = ColocatedTeacher.views

    def counted(self: ColocatedTeacher, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return live_views(self, *args, **kwargs)

    monkeypatch.setattr(ColocatedTeacher, "views", counted)
    two_epochs = {"max_steps": 0, "epochs": 2}
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, "ref", micro=10, train=two_epochs)
    records = len(read_samples(Path(cfg.data.train_file), cfg.data, load_tokenizer(tiny_task["tok_student"]),
                               load_tokenizer(tiny_task["tok_teacher"])))
    per_epoch = records // 10  # the last records % 10 (> 0 here) are dropped from each epoch
    assert records % 10 and per_epoch >= 2
    ref = distill(cfg)
    assert calls["n"] == 2 * per_epoch
    calls["n"] = 0
    first = distill(_cfg(tiny_task, teacher_dir, tmp_path, "auto1", cache="auto", micro=10, train=two_epochs))
    assert calls["n"] == per_epoch + 1
    torch.testing.assert_close(_losses(first), _losses(ref), rtol=1e-5, atol=0)
    calls["n"] = 0
    second = distill(_cfg(tiny_task, teacher_dir, tmp_path, "auto2", cache="auto", micro=10, train=two_epochs))
    assert calls["n"] == 0
    assert torch.equal(_losses(second)[per_epoch:], _losses(first)[per_epoch:])


@pytest.mark.slow
def test_served_auto_serves_the_first_epoch_then_reads_the_cache(tiny_task: dict[str, Path], teacher_dir: Path,
                                                                 tmp_path: Path) -> None:
    """1 teacher rank + 2 students, two epochs, teacher.cache.mode=auto (fp32) over no cache: the
    teacher rank forwards the first epoch's micro-batches only (then computes the samples that epoch
    dropped, seals the cache and returns while the students train on); every step's loss parts and
    gradient norm equal a served-live run without cache: exactly in the first epoch (the same states,
    once off the wire), in the second up to the rounding of the teacher's other batch composition
    (cached states were computed in the first epoch's batches; measured: one part of one step differs,
    by 6.7e-8 relative, the rest is equal); a second auto run is a world of students only reading
    the cache and gives the first auto run's losses exactly, and so is a world that has the teacher
    rank anyway (its students ask it for nothing)."""

    two_epochs = {"max_steps": 0, "epochs": 2}

    def cfg(name: str, cache: str) -> Config:
        return _cfg(tiny_task, teacher_dir, tmp_path, name, mode="served", cache=cache, dp=2, micro=10,
                    train=two_epochs)

    samples = read_samples(Path(tiny_task["train"]), cfg("x", "off").data, load_tokenizer(tiny_task["tok_student"]),
                           load_tokenizer(tiny_task["tok_teacher"]))
    sampler = GlobalBatchSampler(len(samples), 10, 1, 2, 3)
    per_epoch = sampler.steps_per_epoch
    assert sampler.dropped_per_epoch and per_epoch >= 2  # the samples each epoch drops: computed after serving

    def forwards(steps: range) -> int:  # one per micro-batch and format (aux: when it holds a paired sample)
        return sum(1 + any(samples[i].paired for i in m) for s in steps for d in (0, 1)
                   for m in sampler.micro_batches(s, d))

    auto = launch_local(cfg("auto", "auto"), timeout_s=600, return_all=True)
    assert len(auto) == 3
    assert (tmp_path / "teacher-cache" / MANIFEST).is_file()
    live = launch_local(cfg("live", "off"), timeout_s=600, return_all=True)
    served_auto, served_live = auto[0], live[0]
    assert isinstance(served_auto, ServeStats) and isinstance(served_live, ServeStats)
    assert served_live.forwards == forwards(range(2 * per_epoch))
    assert served_auto.forwards == forwards(range(per_epoch))  # the first epoch only
    assert served_auto.stopped_at is None
    assert len(auto[1].history) == len(live[1].history) == 2 * per_epoch
    for key in live[1].history[0]:
        for student in (1, 2):
            cached, served = _losses(auto[student], key), _losses(live[student], key)
            assert torch.equal(cached[:per_epoch], served[:per_epoch]), (key, student)  # the same wire states
            torch.testing.assert_close(cached, served, rtol=1e-6, atol=0, msg=f"{key} of rank {student}")
    again = launch_local(cfg("again", "auto"), timeout_s=600, return_all=True)
    assert len(again) == 2  # students only: no teacher rank
    assert torch.equal(_losses(again[0]), _losses(auto[1]))
    # a launcher that starts the teacher rank anyway: the students ask it for nothing and read
    kept = spawn_world(run_rank, cfg("kept", "auto"), 3, essential=[1, 2], grace_s=120, timeout_s=600)
    assert isinstance(kept[0], ServeStats) and kept[0].forwards == 0
    assert torch.equal(_losses(kept[1]), _losses(auto[1]))


class _Live:
    """A live teacher source that records what it was asked for and hands out no views."""

    final_layer = 2
    head: nn.Module = nn.Linear(2, 3)
    embed: nn.Module = nn.Embedding(3, 2)

    def __init__(self) -> None:
        self.asked: tuple[int, int] | None = None
        self.calls = 0

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        self.asked = (first_step, total_steps)

    def views(self, batch: Any, fmts: list[str], layers: list[int]) -> dict[str, Any]:
        self.calls += 1
        return {}

    def stop(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def test_served_student_names_the_cache_folder_when_the_seal_never_comes(tmp_path: Path) -> None:
    """auto in a served world: the replica is asked for the rest of the epoch the run starts in only
    (from step 0, or from a resume inside it); at the switch a student whose teacher ranks never seal
    the cache fails after runtime.timeout_s, naming the folder, instead of reading an unfinished cache."""
    root = tmp_path / "teacher-cache"
    root.mkdir()
    cfg = Config().merged({"teacher": {"cache": {"mode": "auto", "dir": str(root)}}, "runtime": {"timeout_s": 1},
                           "train": {"micro_batch_size": 2, "grad_accum": 1}, "run": {"seed": 3}})
    key = CacheKey(teacher="t", data="d", tokenizer="k", tokenization="", layers=(2,), formats=("main",),
                   dtype="float32", teacher_dtype="float32", width=2)
    io = TeacherIO(head=_Live.head, embed=_Live.embed, num_layers=2, hidden_size=2)
    samples: Any = [None] * 21  # 10 steps per epoch of 2 samples (one dropped)

    def opened() -> Any:
        raise AssertionError("the cache was opened before it was sealed")

    resumed = _Live()
    source = served_then_cached(cfg, key, resumed, io, samples, 1, 0)
    source.open_cached = opened
    source.start(4, 25, [2], ["main"])
    assert resumed.asked == (4, 10)  # a resume inside the first epoch: to the end of that epoch
    live = _Live()
    source = served_then_cached(cfg, key, live, io, samples, 1, 0)
    source.open_cached = opened
    source.start(0, 25, [2], ["main"])
    assert live.asked == (0, 10)
    for _ in range(9):
        source.views(None, ["main"], [2])
    with pytest.raises(CacheError, match=re.escape(f"teacher cache {root} is still not sealed")):
        source.views(None, ["main"], [2])  # the epoch's last micro-batch: the switch
    assert live.calls == 10


@pytest.mark.slow
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-6), ("bfloat16", 1e-4), ("int8", 1e-4)])
def test_cache_teacher_then_students_only(tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, dtype: str, rtol: float) -> None:
    """cache-teacher writes every sample (both formats, the sweep's layers); a read run never loads
    the teacher and matches the live run per step (fp32: up to the rounding of other batch shapes,
    measured 0; bf16 / int8: relative 1e-4, measured 1.5e-7 / 2.9e-7 for this loss, whose OT at
    epsilon 10 is insensitive to small state errors, but not equal); a run with other tokenization
    settings is refused naming the key."""

    ref = distill(_cfg(tiny_task, teacher_dir, tmp_path, "ref"))
    root = cache_teacher(_cfg(tiny_task, teacher_dir, tmp_path, "cache", cache="write", dtype=dtype))
    assert (root / MANIFEST).is_file()

    def no_teacher(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached run loaded a model")

    monkeypatch.setattr(colocated, "load_model", no_teacher)
    res = distill(_cfg(tiny_task, teacher_dir, tmp_path, "read", cache="read", dtype=dtype))
    torch.testing.assert_close(_losses(res), _losses(ref), rtol=rtol, atol=0)
    if dtype != "float32":
        assert not torch.equal(_losses(res), _losses(ref))
    other = _cfg(tiny_task, teacher_dir, tmp_path, "other", cache="read", dtype=dtype).merged(
        {"data": {"max_length": 100}})
    with pytest.raises(CacheError, match="key tokenization"):
        distill(other)


def _sharded_writer_cfg(cfg: Config, tp: int, pp: int, world: int) -> Config:
    return cfg.merged({"runtime": {"teacher_backend": "megatron"}, "student": {"parallel": {"dp": 0}},
                       "teacher": {"parallel": {"tp": tp, "pp": pp, "replicas": max(world // (tp * pp), 1)}}})


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, world", [(2, 1, 3), (1, 2, 4)], ids=["tp2-and-an-idle-rank", "pp2-x2-replicas"])
def test_sharded_cache_teacher_writes_what_the_hf_one_writes(tiny_task: dict[str, Path], teacher_dir: Path,
                                                            tmp_path: Path, tp: int, pp: int, world: int) -> None:
    """cache-teacher with megatron-core shards (a torch.distributed world: tp 2 on 3 ranks, the third
    idle; or pp 2 x 2 replicas splitting the batches) writes the same key and, for every (sample,
    format) and layer, the same fp32 states as one HF teacher (up to the rounding of other
    kernels); a rerun finds it complete."""
    hf_root = cache_teacher(_cfg(tiny_task, teacher_dir, tmp_path, "hf", cache="write", dtype="float32"))
    cfg = _sharded_writer_cfg(_cfg(tiny_task, teacher_dir, tmp_path, "mg", cache="write", dtype="float32"),
                              tp, pp, world).merged({"teacher": {"cache": {"dir": str(tmp_path / "mg-cache")}}})
    roots = spawn_world(cache_teacher, cfg, world, essential=list(range(world)), grace_s=30, timeout_s=300)
    mg_root = Path(roots[0])
    assert roots == [mg_root] * world and (mg_root / MANIFEST).is_file()
    key = stored_key(hf_root)
    assert key is not None and stored_key(mg_root) == key
    writers = {f.name for f in mg_root.glob("part-*.jsonl")}
    senders = {f"part-r{r}.jsonl" for r in range(world // (tp * pp) * tp * pp) if r % tp == 0}  # tp rank 0s
    assert writers == senders
    hf, mg = CacheReader(hf_root, key), CacheReader(mg_root, key)
    entries = sorted(required_entries([s.paired for s in read_samples(
        Path(cfg.data.train_file), cfg.data, load_tokenizer(tiny_task["tok_student"]),
        load_tokenizer(tiny_task["tok_teacher"]))], list(key.formats)))
    assert len(entries) > 20
    for sample, fmt in entries:
        torch.testing.assert_close(mg.read(sample, fmt, key.layers), hf.read(sample, fmt, key.layers),
                                   rtol=1e-4, atol=1e-5, msg=f"{fmt} states of sample {sample}")
    assert spawn_world(cache_teacher, cfg, world, essential=list(range(world)), grace_s=30, timeout_s=120) == roots


def _rank_1_dies_in_its_second_forward(cfg: Config) -> Path:
    """cache_teacher, where rank 1 exits (code 17) in its second teacher forward."""
    if os.environ["RANK"] == "1":
        live, calls = MegatronHiddenStates.hidden, [0]

        def dying(self: MegatronHiddenStates, seq: Any, layers: list[int]) -> dict[int, torch.Tensor]:
            calls[0] += 1
            if calls[0] == 2:
                os._exit(17)
            return live(self, seq, layers)

        MegatronHiddenStates.hidden = dying  # type: ignore[method-assign]
    return cache_teacher(cfg)


@pytest.mark.slow
def test_sharded_cache_teacher_names_a_rank_that_dies(tiny_task: dict[str, Path], teacher_dir: Path,
                                                      tmp_path: Path) -> None:
    """tp rank 1 of the replica dies mid-write: rank 0 fails fast (its tensor-parallel collective
    breaks) with an error naming the dead rank; no seal."""
    cfg = _sharded_writer_cfg(_cfg(tiny_task, teacher_dir, tmp_path, "dies", cache="write", dtype="float32"), 2, 1, 2)
    t0 = time.monotonic()
    with pytest.raises(WorldError) as info:
        spawn_world(_rank_1_dies_in_its_second_forward, cfg, 2, essential=[0, 1], grace_s=60, timeout_s=240)
    assert time.monotonic() - t0 < 150
    failures = info.value.failures
    assert "exited with code 17" in failures[1]
    assert "teacher rank 1 (replica 0, pp 0, tp 1) died" in failures[0], failures[0]
    assert not (tmp_path / "teacher-cache" / MANIFEST).exists()


@pytest.mark.slow
def test_writers_that_start_at_different_times_split_the_same_samples(
        tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two cache-teacher writers (RANK 0 and 1 of WORLD_SIZE 2), the second starting after the first
    finished its share: together they cover every sample and the last one seals the cache. (A share
    taken from what is still missing when a writer starts left a quarter of the samples unwritten.)"""
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, "split", cache="write", dtype="float32")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    root = cache_teacher(cfg)
    assert not (root / MANIFEST).is_file()  # half written
    monkeypatch.setenv("RANK", "1")
    cache_teacher(cfg)
    assert (root / MANIFEST).is_file()


@pytest.mark.parametrize("weights, train, same", [("bfloat16", "bfloat16", True), ("float32", "bfloat16", False),
                                                  ("float32", "float32", True)])
def test_teacher_precision_in_the_key_does_not_depend_on_the_backend(weights: str, train: str, same: bool) -> None:
    """bf16 weights compute in bf16 on both backends (HF under autocast, megatron natively): one key,
    so a cache written by either is read by the other and by `cache-teacher`'s (always HF) key. fp32
    weights under train.dtype=bfloat16 differ: HF computes in bf16 autocast, megatron in fp32."""

    def key(backend: str) -> str:
        return teacher_dtype(Config().merged({"teacher": {"dtype": weights}, "train": {"dtype": train},
                                              "runtime": {"teacher_backend": backend}}))

    assert (key("hf") == key("megatron")) is same
    assert key("megatron") == weights


@pytest.mark.slow
def test_megatron_bf16_cache_is_read_with_the_same_settings(tiny_task: dict[str, Path], teacher_dir: Path,
                                                            tmp_path: Path) -> None:
    """A megatron teacher (bf16 weights, bf16 compute) serving 1 student writes the cache; a world of
    that student alone with the same settings reads it (same losses, step by step), and
    `cache-teacher` with the same config finds it complete instead of refusing its key."""

    bf16 = {"teacher": {"dtype": "bfloat16"}, "train": {"dtype": "bfloat16"},
            "runtime": {"teacher_backend": "megatron"}}
    live_cfg = _cfg(tiny_task, teacher_dir, tmp_path, "live", mode="served", cache="write", dtype="float32",
                    train={"max_steps": 3}).merged(bf16)
    live = launch_local(live_cfg, timeout_s=300)
    assert (tmp_path / "teacher-cache" / MANIFEST).is_file()
    read_cfg = _cfg(tiny_task, teacher_dir, tmp_path, "read", mode="served", cache="read", dtype="float32",
                    train={"max_steps": 3}).merged(bf16)
    ranks = launch_local(read_cfg, timeout_s=300, return_all=True)
    assert len(ranks) == 1  # the student alone: no teacher rank
    assert torch.equal(_losses(ranks[0]), _losses(live))
    assert cache_teacher(read_cfg) == tmp_path / "teacher-cache"
