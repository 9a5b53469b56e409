"""Teacher sources backed by the teacher-state cache (`cot2align.teacher.cache`).

`CachedTeacher` reads the cached response states of each micro-batch instead of running or
receiving the teacher: a background thread walks the same deterministic schedule as the
training loop (`GlobalBatchSampler`) and reads `prefetch` micro-batches ahead, so the step
waits on disk only when the disk is slower than the student. Like `ServedTeacher` it holds the
teacher's frozen output layer and embedding (`TeacherIO`), so losses that need teacher logits
rebuild them from the cached final state.

`SwitchingTeacher` is `teacher.cache.mode=auto` over an incomplete cache: it wraps a live source
(the colocated teacher, or a `ServedTeacher` fed by teacher ranks) for the first epoch of the run
(from its first step to the end of the epoch it starts in), then reads the cache for the rest, so
the teacher runs one epoch only. What makes the cache complete at the switch is its `Sealer`:
colocated (`LocalSealer`), this process stores the live views and runs the teacher on the samples
that epoch dropped, then seals; served (`RemoteSealer`), the teacher ranks were asked for that
epoch only, so they store what they serve, compute the dropped samples, seal and exit, while the
student waits for the seal (bounded by `runtime.timeout_s`) and opens the cache with its own key.
A run that ends inside its first epoch never switches (served: the teacher ranks seal after it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from cot2align.data.dataset import Batch, Sample, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.data.views import ResponseView
from cot2align.distributed.transport import pack, unpack
from cot2align.teacher.cache import (
    CacheError,
    CacheReader,
    CacheWriter,
    finalize,
    required_entries,
    wait_complete,
)
from cot2align.train import TeacherSource


def split_rows(packed: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """[n_layers, S, d] packed rows (row-major over the batch) -> per-sample [n_layers, len_i, d]."""
    return list(torch.split(packed, [int(n) for n in lengths], dim=1))


def write_states(writer: CacheWriter, indices: Sequence[int], fmt: str, layers: list[int],
                 hidden: dict[int, Tensor], mask: Tensor) -> None:
    """Store one format's teacher states of a micro-batch, one record per sample: hidden[layer]
    [B, N, d] at response positions (left-aligned), mask [B, N] bool; samples `indices` [B]."""
    packed = pack(hidden, mask, layers, torch.float32)  # [n_layers, S, d]
    lengths = mask.sum(dim=1).tolist()
    for sample, part, n in zip(indices, split_rows(packed, lengths), lengths, strict=True):
        if n:
            writer.add(int(sample), fmt, layers, part)


def write_views(writer: CacheWriter, batch: Batch, views: dict[str, ResponseView], layers: list[int]) -> None:
    """Store the teacher views of a micro-batch, one record per (sample, format)."""
    for fmt, view in views.items():
        write_states(writer, batch.indices, fmt, layers, view.hidden, view.mask)


class CachedTeacher:
    """A `train.TeacherSource` reading a complete cache (see the module docstring).

    head / embed / final_layer: the teacher's frozen output layer, input embedding and final
    layer index (from `student.teacher_io.load_teacher_io`). samples: the training samples (for
    the paired flags and response lengths, checked against each record).
    """

    def __init__(self, reader: CacheReader, head: nn.Module, embed: nn.Module, final_layer: int,
                 sampler: GlobalBatchSampler, dp_rank: int, samples: Sequence[Sample], prefetch: int = 4) -> None:
        self.reader = reader
        self.head, self.embed, self.final_layer = head, embed, final_layer
        self.sampler = sampler
        self.dp_rank = dp_rank
        self.paired = [s.paired for s in samples]
        self.lengths = {f: [len(s.seqs["teacher"][f].ids) - s.seqs["teacher"][f].prompt_len
                            if f in s.seqs["teacher"] else 0 for s in samples] for f in ("main", "aux")}
        self.prefetch = prefetch
        self.view_dtype = next(head.parameters()).dtype
        self._queue: queue.Queue[tuple[list[int], dict[str, Tensor]] | BaseException | None] = queue.Queue(prefetch)
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._layers: list[int] = []
        self.wait_s = 0.0
        """Time the loop waited for a micro-batch the reader had not prepared yet."""
        self.read_s = 0.0
        """Time the reader thread spent reading and decoding."""
        self.bytes_read = 0

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        """Start the reader thread on micro-batches [first_step * accum, total_steps * accum)."""
        self.stop(first_step)
        self._layers = list(layers)
        if not layers:
            return
        self._halt = threading.Event()
        self._queue = queue.Queue(self.prefetch)
        self._thread = threading.Thread(target=self._run, args=(first_step, total_steps, list(fmts), self._halt),
                                        name="teacher-cache-reader", daemon=True)
        self._thread.start()

    def _schedule(self, first_step: int, total_steps: int) -> Iterator[list[int]]:
        for step in range(first_step, total_steps):
            yield from self.sampler.micro_batches(step, self.dp_rank)

    def _run(self, first_step: int, total_steps: int, fmts: list[str], halt: threading.Event) -> None:
        try:
            for idx in self._schedule(first_step, total_steps):
                t0 = time.perf_counter()
                out = {}
                for fmt in fmts:
                    if fmt == "aux" and not any(self.paired[i] for i in idx):
                        continue
                    parts = []
                    for i in idx:
                        if fmt == "aux" and not self.paired[i]:
                            continue
                        rec = self.reader.read(i, fmt, self._layers)
                        if rec.shape[1] != self.lengths[fmt][i]:
                            raise CacheError(f"teacher cache {self.reader.root}: sample {i} ({fmt}) holds "
                                             f"{rec.shape[1]} response positions, this run's teacher tokenization "
                                             f"gives {self.lengths[fmt][i]} (other data or tokenizer?)")
                        parts.append(rec)
                    out[fmt] = torch.cat(parts, dim=1)
                    self.bytes_read += sum(p.numel() for p in parts) * 4
                self.read_s += time.perf_counter() - t0
                while not halt.is_set():
                    try:
                        self._queue.put((idx, out), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if halt.is_set():
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self._queue.put(e)

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        """The cached views of `batch` (the next micro-batch of this replica's schedule): hidden[layer]
        [B, N_t, d] (teacher dtype, zeros off the response mask) on the batch's device."""
        if sorted(layers) != sorted(self._layers):
            raise ValueError(f"views() asked for teacher layers {layers}, start() requested {self._layers}")
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise CacheError("the cache reader has stopped")
        idx, packed = item
        if list(batch.indices) != idx:
            raise CacheError(f"cached teacher: expected the micro-batch of samples {idx[:8]}..., the loop asked "
                             f"for {list(batch.indices)[:8]}... (same seed, batch sizes and dp?)")
        out = {}
        for fmt in fmts:
            seq = batch.seqs["teacher"][fmt]
            rows = packed[fmt] if fmt in packed else torch.zeros(len(layers), 0, self.reader.stored.width)
            hidden = unpack(rows.to(seq.resp_mask.device), seq.resp_mask, layers, self.view_dtype)
            out[fmt] = ResponseView(hidden=hidden, mask=seq.resp_mask, inputs=seq.inputs, targets=seq.targets)
        return out

    def stop(self, step: int) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def metrics(self) -> dict[str, float]:
        return {"cache_wait_s": self.wait_s, "cache_read_s": self.read_s}


class Sealer(Protocol):
    """How the cache of a `SwitchingTeacher` becomes complete: written here, or by other processes."""

    def record(self, batch: Batch, views: dict[str, ResponseView], layers: list[int]) -> None:
        """The live views of one micro-batch (stored here, or not: the teacher ranks store theirs)."""
        ...

    def seal(self, layers: list[int], fmts: list[str], switching: bool) -> None:
        """Make the cache complete. switching: the source reads it next (it must be complete on
        return); else the run ends inside its first epoch (a remote writer may seal after it)."""
        ...

    def close(self) -> None:
        """The run stops early (preemption): keep what is written, seal nothing."""
        ...


class LocalSealer:
    """The colocated case: this process writes the live views and, at the switch, runs the live
    teacher on every sample the cache still lacks (the first epoch's dropped remainder), then seals."""

    def __init__(self, writer: CacheWriter, live: TeacherSource, samples: list[Sample], pad_ids: dict[str, int],
                 batch_size: int) -> None:
        self.writer = writer
        self.live = live
        self.samples = samples
        self.pad_ids = pad_ids
        self.batch_size = batch_size

    def record(self, batch: Batch, views: dict[str, ResponseView], layers: list[int]) -> None:
        write_views(self.writer, batch, views, layers)

    def seal(self, layers: list[int], fmts: list[str], switching: bool) -> None:
        required = required_entries([s.paired for s in self.samples], fmts)
        todo = sorted({i for i, _ in required if not self.writer.has(i, "main", layers)
                       or (self.samples[i].paired and "aux" in fmts and not self.writer.has(i, "aux", layers))})
        for start in range(0, len(todo), self.batch_size):
            batch = collate([self.samples[i] for i in todo[start : start + self.batch_size]], self.pad_ids)
            present = [f for f in fmts if f in batch.seqs["teacher"]]
            write_views(self.writer, batch, self.live.views(batch, present, layers), layers)
        self.writer.close()
        if not finalize(self.writer.root, self.writer.key, required):
            raise CacheError(f"teacher cache {self.writer.root} is still incomplete after writing every sample")

    def close(self) -> None:
        self.writer.close()


class RemoteSealer:
    """The served case: the teacher ranks write what they serve and, after their last served step,
    the samples it did not visit, then seal (`teacher.serve._cache_rest`). At the switch a student
    waits for that seal, at most `timeout_s` (a `CacheError` naming the folder when it never comes)."""

    def __init__(self, root: Path, timeout_s: float) -> None:
        self.root = root
        self.timeout_s = timeout_s

    def record(self, batch: Batch, views: dict[str, ResponseView], layers: list[int]) -> None:
        pass

    def seal(self, layers: list[int], fmts: list[str], switching: bool) -> None:
        if switching:
            wait_complete(self.root, self.timeout_s, "the teacher ranks served the first epoch (they seal it "
                          "after computing the samples that epoch dropped; see their logs)")

    def close(self) -> None:
        pass


class SwitchingTeacher:
    """A live teacher source for the first epoch, the cache for the rest (see the module docstring).

    live: the colocated teacher or a `ServedTeacher`; it is asked for [first_step, switch step) only,
    the switch step being the end of the epoch the run starts in (or the run's end, if sooner).
    sealer: makes the cache complete at the switch (`LocalSealer`, `RemoteSealer`).
    open_cached() -> the `CachedTeacher` (background prefetch) that serves the rest of the run.
    """

    def __init__(self, live: TeacherSource, sealer: Sealer, sampler: GlobalBatchSampler,
                 open_cached: Callable[[], CachedTeacher]) -> None:
        self.live = live
        self.head, self.embed, self.final_layer = live.head, live.embed, live.final_layer
        self.sealer = sealer
        self.sampler = sampler
        self.open_cached = open_cached
        self.cached: CachedTeacher | None = None
        self._cursor = self._switch_at = self._end = 0
        self._total_steps = 0
        self._layers: list[int] = []
        self._fmts: list[str] = []
        self.live_s = 0.0
        """Time in the live source's views (the first epoch)."""

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        """Ask the live source for the steps up to the switch; switch at once when there are none."""
        accum, per_epoch = self.sampler.accum, self.sampler.steps_per_epoch
        switch_step = min(total_steps, (first_step // per_epoch + 1) * per_epoch)
        self.live.start(first_step, max(first_step, switch_step), layers, fmts)
        self._layers, self._fmts = list(layers), list(fmts)
        self._cursor, self._switch_at, self._end = first_step * accum, switch_step * accum, total_steps * accum
        self._total_steps = total_steps
        if layers and self._switch_at <= self._cursor < self._end:
            self._switch()

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        """The views of `batch` (hidden[layer] [B, N_t, d], teacher dtype): live, then cached."""
        if self.cached is not None:
            return self.cached.views(batch, fmts, layers)
        t0 = time.perf_counter()
        out = self.live.views(batch, fmts, layers)
        self.sealer.record(batch, out, layers)
        self.live_s += time.perf_counter() - t0
        self._cursor += 1
        if self._switch_at <= self._cursor < self._end:
            self._switch()
        elif self._cursor >= self._end:  # the run ends inside its first epoch
            self.sealer.seal(self._layers, self._fmts, switching=False)
        return out

    def _switch(self) -> None:
        self.sealer.seal(self._layers, self._fmts, switching=True)
        self.cached = self.open_cached()
        self.cached.start(self._cursor // self.sampler.accum, self._total_steps, self._layers, self._fmts)

    def stop(self, step: int) -> None:
        """The run ends or stops early after `step`: stop whichever source is active."""
        if self.cached is not None:
            self.cached.stop(step)
            return
        self.live.stop(step)
        self.sealer.close()

    def metrics(self) -> dict[str, float]:
        cached = self.cached.metrics() if self.cached else {"cache_wait_s": 0.0, "cache_read_s": 0.0}
        return {"teacher_live_s": self.live_s, **self.live.metrics(), **cached}
