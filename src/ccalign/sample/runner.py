"""Sharded, resumable sampling runs: what ``ccalign sample`` drives, on one process or many.

The label list is cut into shards of ``batch_size``; shard i is sampled with its own seed (derived
from the run seed and i), so the result does not depend on how many ranks share the work. Rank r
takes shards r, r + world, ...; each finished shard is one atomically written file, so a killed
run restarts where it stopped. Rank 0 then joins the shards into the final files, also atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ccalign.io import atomic_write
from ccalign.sample.engine import Sampler
from ccalign.sample.images import check_tokenizer, decode_tokens, to_pil
from ccalign.tokenizers.base import ImageTokenizer

MANIFEST = "run.json"
TOKENS_FILE = "tokens.npz"
SAMPLES_FILE = "samples.npz"


def plan_labels(
    num_classes: int,
    *,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    num_samples: int | None = None,
) -> list[int]:
    """The label of every image to sample, class-major.

    ``per_class`` K: K images of each class (of ``classes``, default all). ``num_samples`` N: N
    images cycling through the classes. Neither: one image per given class.
    """
    if per_class is not None and num_samples is not None:
        raise ValueError("give either --per-class or --num-samples, not both")
    chosen = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        raise ValueError(f"classes must be in [0, {num_classes - 1}]; got {bad or 'none'}")
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {per_class}")
        return [c for c in chosen for _ in range(per_class)]
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
        return [chosen[i % len(chosen)] for i in range(num_samples)]
    if classes is None:
        raise ValueError("say what to sample: --classes, --per-class K or --num-samples N")
    return chosen


def shard_seed(seed: int, shard: int) -> int:
    """A 63-bit seed for one shard, distinct across shards and runs (NumPy SeedSequence)."""
    state = np.random.SeedSequence([seed, shard]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


@dataclass
class RunOutputs:
    """Where a finished run put its files (``samples``/``images`` only with a tokenizer)."""

    tokens: Path
    samples: Path | None = None
    images: Path | None = None
    shards_sampled: int = 0
    seconds: float = 0.0


@dataclass
class RunConfig:
    """Everything that determines a run's output; stored in ``run.json`` to guard resumes."""

    labels: list[int]
    batch_size: int
    seed: int
    sampling: dict = field(default_factory=dict)
    resize: int | None = None
    decode: bool = False
    source: str = ""

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.labels).encode()).hexdigest()
        return {
            "num_samples": len(self.labels),
            "labels_sha256": digest,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "sampling": json.loads(json.dumps(self.sampling, default=repr)),
            "resize": self.resize,
            "decode": self.decode,
            "source": self.source,
        }

    @property
    def num_shards(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def shard_labels(self, shard: int) -> list[int]:
        return self.labels[shard * self.batch_size : (shard + 1) * self.batch_size]


def run_sampling(
    sampler: Sampler,
    config: RunConfig,
    out_dir: str | Path,
    *,
    tokenizer: ImageTokenizer | None = None,
    write_png: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> RunOutputs | None:
    """Sample this rank's missing shards, then (rank 0) assemble the final files.

    Returns the outputs on rank 0, None elsewhere. ``barrier`` synchronises the ranks
    (``torch.distributed.barrier`` under torchrun).
    """
    if config.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {config.batch_size}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, sampler.seq_len, sampler.model.vocab_size)
    out = Path(out_dir)
    _claim_directory(out, config, rank, barrier)
    start = time.perf_counter()
    done = _sample_missing_shards(
        sampler, config, out, tokenizer, write_png, rank, world_size, progress, on_shard_done
    )
    barrier()
    if rank != 0:
        return None
    outputs = _assemble(out, config, with_images=tokenizer is not None)
    outputs.shards_sampled, outputs.seconds = done, time.perf_counter() - start
    if tokenizer is not None and write_png:
        outputs.images = out / "images"
    return outputs


def _claim_directory(out: Path, config: RunConfig, rank: int, barrier: Callable[[], None]) -> None:
    """Write run.json on a fresh folder; refuse to resume a run made with other settings."""
    manifest = out / MANIFEST
    wanted = config.fingerprint()
    if rank == 0 and not manifest.exists():
        text = json.dumps(wanted, indent=2, sort_keys=True)
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))
    barrier()
    found = json.loads(manifest.read_text())
    if found != wanted:
        changed = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
        raise ValueError(
            f"{out} holds a run made with different settings ({', '.join(changed)}); "
            "give a new output folder, or delete it to start over"
        )


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:06d}.npz"


def _sample_missing_shards(
    sampler, config, out, tokenizer, write_png, rank, world_size, progress, on_shard_done
) -> int:
    mine = range(rank, config.num_shards, world_size)
    todo = [s for s in mine if not shard_path(out, s).exists()]
    bar = tqdm(
        total=sum(len(config.shard_labels(s)) for s in mine),
        initial=sum(len(config.shard_labels(s)) for s in mine if s not in todo),
        unit="img",
        desc=f"sampling (rank {rank})" if world_size > 1 else "sampling",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    with bar:
        for shard in todo:
            _sample_shard(sampler, config, out, shard, tokenizer, write_png)
            bar.update(len(config.shard_labels(shard)))
            if on_shard_done is not None:
                on_shard_done(shard)
    return len(todo)


def _sample_shard(sampler, config, out, shard, tokenizer, write_png) -> None:
    labels = config.shard_labels(shard)
    generator = torch.Generator(sampler.device).manual_seed(shard_seed(config.seed, shard))
    tokens = sampler.generate(labels, generator=generator, **config.sampling)
    arrays = {"tokens": tokens.cpu().numpy(), "labels": np.asarray(labels, dtype=np.int64)}
    if tokenizer is not None:
        images = decode_tokens(tokenizer, tokens, size=config.resize)
        arrays["images"] = images
        if write_png:
            first = shard * config.batch_size
            for i, image in enumerate(images):
                png = out / "images" / f"{first + i:06d}.png"
                atomic_write(png, lambda tmp, im=image: to_pil(im).save(tmp, format="PNG"))
    atomic_write(shard_path(out, shard), lambda tmp: _savez(tmp, arrays))


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _assemble(out: Path, config: RunConfig, with_images: bool) -> RunOutputs:
    missing = [s for s in range(config.num_shards) if not shard_path(out, s).exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard(s) missing in {out / 'shards'} (first: {missing[0]}); "
            "a rank probably failed: run the same command again to finish them"
        )

    def shards(key: str) -> Iterator[np.ndarray]:
        for s in range(config.num_shards):
            with np.load(shard_path(out, s)) as data:
                yield data[key]

    labels = np.asarray(config.labels, dtype=np.int64)
    tokens = np.concatenate(list(shards("tokens")))
    token_members = {"tokens": _whole(tokens), "labels": _whole(labels)}
    tokens_path = atomic_write(out / TOKENS_FILE, lambda tmp: _write_npz(tmp, token_members))
    outputs = RunOutputs(tokens=tokens_path)
    if with_images:
        first = next(shards("images"))
        images = ((len(labels), *first.shape[1:3], 3), np.uint8, map(_as_rgb, shards("images")))
        outputs.samples = atomic_write(
            out / SAMPLES_FILE,
            lambda tmp: _write_npz(tmp, {"arr_0": images, "labels": _whole(labels)}),
        )
    return outputs


def _as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


Member = tuple[tuple[int, ...], type, Iterable[np.ndarray]]


def _whole(array: np.ndarray) -> Member:
    return array.shape, array.dtype, [array]


def _write_npz(path: str, members: dict[str, Member]) -> None:
    """An uncompressed .npz written chunk by chunk (50k images never sit in memory at once),
    with fixed timestamps so the same content always gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (shape, dtype, chunks) in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False,
                "shape": tuple(shape),
            }
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                rows = 0
                for chunk in chunks:
                    f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                    rows += chunk.shape[0]
            if rows != shape[0]:
                raise RuntimeError(f"{name}: the shards hold {rows} rows, expected {shape[0]}")
