"""Teacher sources backed by the teacher-state cache (`cot2align.teacher.cache`).

`CachedTeacher` reads the cached response states of each micro-batch instead of running or
receiving the teacher: a background thread walks the same deterministic schedule as the
training loop (`GlobalBatchSampler`) and reads `prefetch` micro-batches ahead, so the step
waits on disk only when the disk is slower than the student. Like `ServedTeacher` it holds the
teacher's frozen output layer and embedding (`TeacherIO`), so losses that need teacher logits
rebuild them from the cached final state.

`WritingTeacher` wraps a live source (the colocated teacher): it hands out the live views and
stores them; at the end of the first epoch it runs the teacher on the samples that epoch did
not visit, seals the cache and from then on reads from it (the teacher runs one epoch only).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from cot2align.data.dataset import Batch, Sample, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.data.views import ResponseView
from cot2align.distributed.transport import pack, unpack
from cot2align.teacher.cache import CacheError, CacheReader, CacheWriter, finalize, required_entries
from cot2align.train import TeacherSource


def split_rows(packed: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """[n_layers, S, d] packed rows (row-major over the batch) -> per-sample [n_layers, len_i, d]."""
    return list(torch.split(packed, [int(n) for n in lengths], dim=1))


def write_views(writer: CacheWriter, batch: Batch, views: dict[str, ResponseView], layers: list[int]) -> None:
    """Store the teacher views of a micro-batch, one record per (sample, format)."""
    for fmt, view in views.items():
        mask = view.mask
        packed = pack(view.hidden, mask, layers, torch.float32)  # [n_layers, S, d]
        lengths = mask.sum(dim=1).tolist()
        for sample, part, n in zip(batch.indices, split_rows(packed, lengths), lengths, strict=True):
            if n:
                writer.add(int(sample), fmt, layers, part)


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


class WritingTeacher:
    """A live teacher source that also writes the cache; after the first epoch it reads instead
    (see the module docstring). open_reader() -> the reader of the sealed cache; make_cached(reader)
    -> the `CachedTeacher` that serves the rest of the run."""

    def __init__(self, live: TeacherSource, writer: CacheWriter, samples: list[Sample], pad_ids: dict[str, int],
                 sampler: GlobalBatchSampler, batch_size: int, open_reader: Callable[[], CacheReader],
                 make_cached: Callable[[CacheReader], CachedTeacher]) -> None:
        self.live = live
        self.head, self.embed, self.final_layer = live.head, live.embed, live.final_layer
        self.writer = writer
        self.samples = samples
        self.pad_ids = pad_ids
        self.sampler = sampler
        self.batch_size = batch_size
        self.open_reader = open_reader
        self.make_cached = make_cached
        self._cached: CachedTeacher | None = None
        self._cursor = self._switch_at = self._end = 0
        self._layers: list[int] = []
        self._fmts: list[str] = []
        self.live_s = 0.0

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        self.live.start(first_step, total_steps, layers, fmts)
        self._layers, self._fmts = list(layers), list(fmts)
        accum, per_epoch = self.sampler.accum, self.sampler.steps_per_epoch
        switch_step = min(total_steps, (first_step // per_epoch + 1) * per_epoch)
        self._cursor, self._switch_at, self._end = first_step * accum, switch_step * accum, total_steps * accum
        self._total_steps = total_steps
        if layers and self._cursor >= self._switch_at:
            self._seal()

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        if self._cached is not None:
            return self._cached.views(batch, fmts, layers)
        t0 = time.perf_counter()
        out = self.live.views(batch, fmts, layers)
        write_views(self.writer, batch, out, layers)
        self.live_s += time.perf_counter() - t0
        self._cursor += 1
        if self._cursor >= self._switch_at and self._cursor < self._end:
            self._seal()
        elif self._cursor >= self._end:
            self._fill()
        return out

    def _fill(self) -> None:
        """Run the live teacher on every sample the cache still lacks, and seal it."""
        required = required_entries([s.paired for s in self.samples], self._fmts)
        todo = sorted({i for i, _ in required if not self.writer.has(i, "main", self._layers)
                       or (self.samples[i].paired and "aux" in self._fmts
                           and not self.writer.has(i, "aux", self._layers))})
        for start in range(0, len(todo), self.batch_size):
            batch = collate([self.samples[i] for i in todo[start : start + self.batch_size]], self.pad_ids)
            fmts = [f for f in self._fmts if f in batch.seqs["teacher"]]
            write_views(self.writer, batch, self.live.views(batch, fmts, self._layers), self._layers)
        self.writer.close()
        if not finalize(self.writer.root, self.writer.key, required):
            raise CacheError(f"teacher cache {self.writer.root} is still incomplete after writing every sample")

    def _seal(self) -> None:
        self._fill()
        self._cached = self.make_cached(self.open_reader())
        self._cached.start(self._cursor // self.sampler.accum, self._total_steps, self._layers, self._fmts)

    def stop(self, step: int) -> None:
        self.writer.close()
        if self._cached is not None:
            self._cached.stop(step)

    def metrics(self) -> dict[str, float]:
        return {"teacher_live_s": self.live_s, **(self._cached.metrics() if self._cached else {})}
