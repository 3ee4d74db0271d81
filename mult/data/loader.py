"""The shard reader for training and evaluation: a webdataset pipeline driven by the manifest.

Shards are split across *slots*, one per (rank, loader worker): ``slot = rank * W + worker``
with ``W = max(num_workers, 1)``. With at least as many shards as slots each slot reads its own
shards; with fewer, every slot reads every shard and keeps the samples whose position in the
dataset is congruent to its slot (disjoint again, at more I/O). So within an epoch no sample is
seen by two slots.

* ``mode="train"``: each slot cycles over its shards for ever, in a fresh order each pass,
  through a shuffle buffer; the epoch is cut at exactly ``steps_per_epoch`` batches per rank
  (batch ``i`` comes from worker ``i % W``), so every DDP rank runs the same number of steps.
  Every random choice (shard order, shuffle, flips) is seeded by ``(seed, epoch, slot)``.
* ``mode="eval"``: one pass, no shuffle, no flip; every sample exactly once across all ranks
  and workers (ranks may get unequal counts; the last batch of a worker may be short).

**Data position.** A training run is at ``(epoch, step)``. ``make_loader(..., epoch=e,
skip=s)`` yields batches ``s .. steps_per_epoch - 1`` of epoch ``e``, the same batches an
uninterrupted epoch would have yielded there, provided ``seed``, ``world_size``,
``num_workers``, ``batch_size`` and the shards are the same. Skipped samples are dropped before
decoding (cheap); if the skipped range held bad samples, later batches shift by that many.

**Bad samples** are data errors: a member that does not decode, a sample without ``rgb``, a
pickle member (``.pyd``/``.pth``/...: refused, never unpickled), a truncated or missing shard.
With ``bad_sample_policy="skip"`` they are counted (each batch's ``"bad_samples"`` holds the
number skipped since that worker's previous batch; a truncated shard counts the samples the
manifest promised and the tar did not hold); with ``"fail"`` a :class:`BadSampleError` names the
shard and the key.

**Storage errors are never bad samples.** Throttling, 5xx, expired or missing credentials,
timeouts and resets are retried and resumed at the byte (:mod:`mult.data.retry`,
:class:`mult.data.s3.ResumableS3Stream`) for up to ``data.storage_retry_s`` per shard; past
that a :class:`~mult.data.storage.StorageUnavailableError` names the shard's URL, the sample key
it was reading after and the error, and stops the run (Ray's ``train.max_failures`` restarts
it). An epoch never silently shortens.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from mult.config import Config
from mult.data.samples import collate, decode_members, read_manifest, split_members
from mult.data.retry import RetryPolicy
from mult.data.storage import Storage, StorageError, StorageUnavailableError, open_storage
from mult.tasks import get_task

log = logging.getLogger(__name__)

MODES = ("train", "eval")
POLICIES = ("skip", "fail")


class BadSampleError(RuntimeError):
    """A sample or shard could not be read under ``bad_sample_policy="fail"``; names both."""


# ---------------------------------------------------------------------------------------------
# The stream.
# ---------------------------------------------------------------------------------------------
def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class _Plan:
    """Everything a loader worker needs (picklable)."""

    base_url: str
    shard_urls: list[str]
    shard_names: list[str]
    shard_samples: list[int]
    manifest: dict[str, Any]
    tasks: list[str]
    image_size: int
    batch_size: int
    mode: str
    steps: int | None
    rank: int
    world_size: int
    workers: int
    seed: int
    epoch: int
    skip: int
    shuffle_buffer: int
    hflip: bool
    policy: str
    retry: RetryPolicy

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def assignment(self, slot: int) -> tuple[list[int], int | None]:
        """Shard indices for ``slot`` (in an epoch-seeded order) and, for sample-level
        splitting, the modulus to keep samples by (``None``: whole shards)."""
        n = len(self.shard_urls)
        order = list(range(n))
        if self.mode == "train":
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        if n >= self.slots:
            return order[slot::self.slots], None
        return order, self.slots


class _Counter:
    def __init__(self) -> None:
        self.bad = 0

    def take(self) -> int:
        n, self.bad = self.bad, 0
        return n


class ShardStream(torch.utils.data.IterableDataset):
    """Batches for one rank; in each DataLoader worker it plays one logical worker."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan
        self._store: Storage | None = None  # opened in the worker process that reads

    def _storage(self) -> Storage:
        if self._store is None:
            self._store = open_storage(self.plan.base_url, retry=self.plan.retry)
        return self._store

    # -- which logical worker am I -------------------------------------------------------------
    def _logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        # DataLoader asks worker 0 first; rotating by `skip` makes batch `skip` come first.
        return (wid + self.plan.skip) % self.plan.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        worker = self._logical_worker()
        slot = p.rank * p.workers + worker
        counter = _Counter()
        shards, modulus = p.assignment(slot)
        if p.mode == "train":
            return self._train(slot, worker, shards, modulus, counter)
        return self._eval(slot, shards, modulus, counter)

    # -- reading shards ------------------------------------------------------------------------
    def _offsets(self) -> list[int]:
        return list(itertools.accumulate([0, *self.plan.shard_samples[:-1]]))

    def _read_shard(self, index: int, slot: int, modulus: int | None, counter: _Counter) -> Iterator[dict]:
        """Samples of one shard that belong to ``slot``; truncation and absence are bad samples,
        storage that stays unavailable raises :class:`StorageUnavailableError`."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        p = self.plan
        url, name, expected = p.shard_urls[index], p.shard_names[index], p.shard_samples[index]
        offset = self._offsets()[index] if modulus else 0

        def mine(j: int) -> bool:
            return modulus is None or (offset + j) % modulus == slot

        seen, last_key = 0, None
        try:
            stream = self._storage().open_read(name)
        except StorageError as exc:
            raise _shard_error(exc, url, last_key) from None
        except Exception as exc:  # absent (FileNotFoundError) or unreadable locally: data
            self._shard_broken(name, last_key, exc, expected, seen, mine, counter)
            return
        try:
            with stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    if mine(seen):
                        sample["__shard__"] = name
                        yield sample
                    last_key = sample.get("__key__")
                    seen += 1
        except StorageError as exc:
            raise _shard_error(exc, url, last_key) from None  # never a silently shorter epoch
        except Exception as exc:
            self._shard_broken(name, last_key, exc, expected, seen, mine, counter)
            return
        if seen < expected:
            self._shard_broken(name, last_key, EOFError(f"holds {seen} of {expected} samples"),
                               expected, seen, mine, counter)

    def _shard_broken(self, name: str, last_key: str | None, exc: BaseException, expected: int,
                      seen: int, mine: Any, counter: _Counter) -> None:
        where = f"after key {last_key!r}" if last_key else "before its first sample"
        message = f"shard {name}: unreadable {where}: {type(exc).__name__}: {exc}"
        if self.plan.policy == "fail":
            raise BadSampleError(message) from exc
        lost = sum(1 for j in range(seen, max(expected, seen + 1)) if mine(j))
        counter.bad += lost
        log.warning("%s (%d sample(s) lost)", message, lost)

    def _samples(self, shards: list[int], slot: int, modulus: int | None, counter: _Counter) -> Iterator[dict]:
        for index in shards:
            yield from self._read_shard(index, slot, modulus, counter)

    # -- decoding ------------------------------------------------------------------------------
    def _decode(self, samples: Iterable[dict], counter: _Counter) -> Iterator[dict]:
        p = self.plan
        for sample in samples:
            key, shard = sample.get("__key__"), sample.get("__shard__")
            flip = bool(sample.get("__flip__", False))
            try:
                members = split_members(sample)
                yield decode_members(members, key, p.manifest, p.tasks, p.image_size, flip)
            except StorageError:
                raise
            except Exception as exc:  # a format's decoder raises its own error types
                message = f"shard {shard}: sample {key!r}: {type(exc).__name__}: {exc}"
                if p.policy == "fail":
                    raise BadSampleError(message) from exc
                counter.bad += 1
                log.warning("skipping bad sample: %s", message)

    def _batches(self, decoded: Iterator[dict], counter: _Counter, count: int | None) -> Iterator[dict]:
        p = self.plan
        batch: list[dict] = []
        produced = 0
        for sample in decoded:
            batch.append(sample)
            if len(batch) == p.batch_size:
                yield collate(batch, counter.take())
                batch, produced = [], produced + 1
                if count is not None and produced >= count:
                    return
        if batch and count is None:
            yield collate(batch, counter.take())

    # -- the two modes -------------------------------------------------------------------------
    def _train(self, slot: int, worker: int, shards: list[int], modulus: int | None,
               counter: _Counter) -> Iterator[dict]:
        p = self.plan
        mine = range(worker, p.steps, p.workers)
        count = len(mine) - len(range(worker, p.skip, p.workers))
        skip_samples = len(range(worker, p.skip, p.workers)) * p.batch_size
        if count <= 0:
            return iter(())
        import webdataset as wds

        def forever() -> Iterator[dict]:
            for n_pass in itertools.count():
                order = list(shards)
                random.Random(_seed(p.seed, p.epoch, slot, n_pass)).shuffle(order)
                got = 0
                for sample in self._samples(order, slot, modulus, counter):
                    got += 1
                    yield sample
                if got == 0:
                    names = [p.shard_names[i] for i in shards]
                    raise BadSampleError(f"rank {p.rank} worker {worker}: no readable sample in its "
                                         f"shard(s) {names[:5]}{'...' if len(names) > 5 else ''}")

        rng = random.Random(_seed(p.seed, p.epoch, slot, "shuffle"))
        shuffled = wds.shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=rng)(forever())
        if p.hflip:
            # Drawn per sample before the skip, so a resumed epoch flips the same samples.
            flips = random.Random(_seed(p.seed, p.epoch, slot, "flip"))
            shuffled = ({**s, "__flip__": flips.random() < 0.5} for s in shuffled)
        shuffled = itertools.islice(shuffled, skip_samples, None)
        return self._batches(self._decode(shuffled, counter), counter, count)

    def _eval(self, slot: int, shards: list[int], modulus: int | None, counter: _Counter) -> Iterator[dict]:
        return self._batches(self._decode(self._samples(shards, slot, modulus, counter), counter), counter, None)


def _shard_error(exc: StorageError, url: str, last_key: str | None) -> StorageError:
    """The storage error, restated with the shard and the sample it was reading after."""
    where = f"after sample key {last_key!r}" if last_key else "before its first sample"
    kind = StorageUnavailableError if isinstance(exc, StorageUnavailableError) else StorageError
    return kind(f"shard {url}: reading {where}: {exc.message}", url=url, cause=exc.cause)


def _worker_init(_: int) -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class ShardLoader:
    """What :func:`make_loader` returns: iterate it for batches (once per epoch).

    ``len()`` is the number of batches in train mode; ``num_samples`` is this rank's share of
    the samples in eval mode (exact when no sample is bad).
    """

    def __init__(self, plan: _Plan, num_workers: int, multiprocessing_context: str | None = None):
        self.plan, self.num_workers = plan, num_workers
        self.dataset = ShardStream(plan)
        self.multiprocessing_context = multiprocessing_context

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
            persistent_workers=False, multiprocessing_context=self.multiprocessing_context,
        )
        return iter(loader)

    def __len__(self) -> int:
        if self.plan.mode != "train":
            raise TypeError("an eval loader has no fixed length; see num_samples")
        return self.plan.steps - self.plan.skip

    @property
    def steps_per_epoch(self) -> int | None:
        return self.plan.steps

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in one eval pass (train: batches x batch size)."""
        p = self.plan
        if p.mode == "train":
            return len(self) * p.batch_size
        offsets = list(itertools.accumulate([0, *p.shard_samples[:-1]]))
        total = 0
        for w in range(p.workers):
            slot = p.rank * p.workers + w
            shards, modulus = p.assignment(slot)
            for i in shards:
                if modulus is None:
                    total += p.shard_samples[i]
                else:
                    total += sum(1 for j in range(p.shard_samples[i]) if (offsets[i] + j) % modulus == slot)
        return total


def make_loader(url: str, *, tasks: Sequence[str], image_size: int, batch_size: int, mode: str,
                steps_per_epoch: int | None = None, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 256,
                hflip: bool = False, bad_sample_policy: str = "skip", skip: int = 0,
                multiprocessing_context: str | None = None, retry: RetryPolicy | None = None) -> ShardLoader:
    """Batches from the shards at ``url`` for one rank (see the module docstring).

    Each batch: ``"key"`` ``list[str]``, ``"rgb"`` ``float32 [B, 3, S, S]``, ``"targets"``
    ``{task: float32 [B, C, S, S] | int64 [B, S, S]}``, ``"valid"`` ``{task: bool [B, S, S]}``
    for the requested tasks the shards have, and ``"bad_samples"`` ``int``.
    ``steps_per_epoch`` (train: required) is the epoch's length in batches per rank;
    :func:`build_loader` derives it from a config. ``retry``: how long a shard may keep failing
    for infrastructure reasons before the loader raises (default ``RetryPolicy()``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown loader mode {mode!r}; valid modes: {', '.join(MODES)}")
    if bad_sample_policy not in POLICIES:
        raise ValueError(f"unknown bad_sample_policy {bad_sample_policy!r}; valid: {', '.join(POLICIES)}")
    for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                             ("world_size", world_size, 1), ("num_workers", num_workers, 0),
                             ("shuffle_buffer", shuffle_buffer, 1), ("skip", skip, 0), ("epoch", epoch, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    for task in tasks:
        get_task(task)  # raises with the valid names
    manifest = read_manifest(url)
    storage = open_storage(url)
    shards = manifest["shards"]
    if not shards:
        raise ValueError(f"the manifest at {storage.url()} lists no shards")
    workers = max(num_workers, 1)
    steps = None
    if mode == "train":
        total = manifest["num_samples"]
        if total < world_size * workers:
            raise ValueError(f"{total} sample(s) cannot feed {world_size} rank(s) x {workers} worker(s)")
        if steps_per_epoch is None or steps_per_epoch < 1:
            raise ValueError(f"train mode needs steps_per_epoch >= 1, got {steps_per_epoch}")
        steps = steps_per_epoch
        if skip > steps:
            raise ValueError(f"skip ({skip}) is past the end of the epoch ({steps} steps)")
    elif skip:
        raise ValueError("skip applies to train mode only")
    present = [t for t in tasks if t in manifest["tasks"]]
    absent = [t for t in tasks if t not in manifest["tasks"]]
    if absent:
        log.info("shards at %s have no %s; batches will lack them", storage.url(), ", ".join(absent))
    if len(shards) < world_size * workers:
        log.warning("%d shard(s) for %d rank(s) x %d worker(s): every worker reads every shard and keeps "
                    "its share of the samples", len(shards), world_size, workers)
    plan = _Plan(
        base_url=storage.url(), shard_urls=[storage.url(s["name"]) for s in shards],
        shard_names=[s["name"] for s in shards], shard_samples=[int(s["samples"]) for s in shards],
        manifest={k: manifest[k] for k in ("format", "encoding", "tasks")}, tasks=present,
        image_size=image_size, batch_size=batch_size, mode=mode, steps=steps, rank=rank,
        world_size=world_size, workers=workers, seed=seed, epoch=epoch,
        skip=skip, shuffle_buffer=shuffle_buffer, hflip=hflip and mode == "train", policy=bad_sample_policy,
        retry=retry or RetryPolicy(),
    )
    return ShardLoader(plan, num_workers, multiprocessing_context)


def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip: int = 0) -> ShardLoader:
    """The loader a config describes for ``split`` (``"train"``: shuffled, flipped, a fixed
    number of micro-batches per rank; ``"val"``: one pass over ``data.val``).

    A train epoch is ``data.steps_per_epoch`` optimizer steps (default: the samples in the
    manifest over ``train.global_batch_size``), each of ``accumulation`` micro-batches of
    ``train.micro_batch_size`` per rank; ``skip`` micro-batches of it are already done.
    """
    t, d = cfg.train, cfg.data
    common = dict(tasks=cfg.tasks, image_size=cfg.model.img_size, batch_size=t.micro_batch_size, rank=rank,
                  world_size=world_size, num_workers=d.num_workers, seed=t.seed,
                  bad_sample_policy=d.bad_sample_policy, retry=RetryPolicy.from_config(d))
    if split == "val":
        if d.val is None:
            raise ValueError("data.val: no validation shards configured")
        return make_loader(d.val, mode="eval", **common)
    if split != "train":
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
    if d.train is None:
        raise ValueError("data.train: no training shards configured")
    steps = d.steps_per_epoch or max(1, read_manifest(d.train)["num_samples"] // t.global_batch_size)
    micro = steps * t.accumulation(world_size)
    return make_loader(d.train, mode="train", steps_per_epoch=micro, epoch=epoch, skip=skip,
                       shuffle_buffer=d.shuffle_buffer, hflip=d.hflip, **common)
