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
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ccalign.io import (
    OUTPUT_KINDS,
    atomic_save_npz,
    atomic_write,
    changed_keys,
    check_output_kind,
    read_json_record,
)
from ccalign.models.family import Sampler
from ccalign.sample.images import UINT8_ROUNDING, check_tokenizer, decode_tokens, to_pil
from ccalign.tokenizers.base import ImageTokenizer

MANIFEST = OUTPUT_KINDS["sampling run"][0]
TOKENS_FILE = "tokens.npz"
SAMPLES_FILE = "samples.npz"


LABEL_MODES = ("balanced", "random")
#: the most images one sampling run plans (50k is the usual FID protocol): a label list of this
#: size is ~80 MB; larger runs are split over seeds
MAX_SAMPLES = 10_000_000


def plan_labels(
    num_classes: int,
    *,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    num_samples: int | None = None,
    mode: str = "balanced",
    seed: int = 0,
) -> list[int]:
    """The label of every image to sample.

    "balanced" (class-major): ``per_class`` K gives K images of each class (of ``classes``,
    default all), ``num_samples`` N gives N images cycling through the classes, neither one image
    per given class. "random": N labels drawn uniformly from the classes, as LlamaGen's
    sample_c2i_ddp draws them, but from ``seed`` alone (a stream of its own, apart from the
    shards'), so the list does not depend on the ranks, the batch size or resumes.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"--labels {mode!r}: choose one of {', '.join(LABEL_MODES)}")
    if per_class is not None and num_samples is not None:
        raise ValueError("give either --per-class or --num-samples, not both")
    chosen = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"classes must be in [0, {num_classes - 1}]; got {shown or 'none'}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    total = num_samples if num_samples is not None else (per_class or 1) * len(chosen)
    if total > MAX_SAMPLES:
        raise ValueError(
            f"{total:,} images is more than one sampling run plans ({MAX_SAMPLES:,}); split the "
            "work into runs with different --seed"
        )
    if mode == "random":
        return _random_labels(chosen, per_class, num_samples, seed)
    if per_class is not None:
        return [c for c in chosen for _ in range(per_class)]
    if num_samples is not None:
        return [chosen[i % len(chosen)] for i in range(num_samples)]
    if classes is None:
        raise ValueError("say what to sample: --classes, --per-class K or --num-samples N")
    return chosen


def _random_labels(
    chosen: list[int], per_class: int | None, num_samples: int | None, seed: int
) -> list[int]:
    """``num_samples`` labels uniform over ``chosen``, from the first child stream of ``seed``."""
    if per_class is not None or num_samples is None:
        raise ValueError(
            "--labels random draws every label at random: give the total as --num-samples N "
            "(e.g. 50000), not --per-class"
        )
    if seed < 0:
        raise ValueError(f"the seed must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    return [chosen[i] for i in rng.integers(0, len(chosen), size=num_samples)]


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


class ConditionSource(Protocol):
    """Where a run's conditions come from: each image has an int (``RunConfig.labels``) that
    ``batch`` turns into the sampler's conditions; ``key`` names those ints in the npz files."""

    key: str

    def batch(self, indices: Sequence[int]) -> Any:
        """The conditions of these images, as the sampler takes them."""

    def fingerprint(self) -> str | None:
        """What identifies the source's contents (None: the ints are the conditions)."""


class ClassLabelSource:
    """Class labels: each image's int is its class."""

    key = "labels"

    def batch(self, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def fingerprint(self) -> None:
        return None


@dataclass
class RunConfig:
    """The settings that determine a run's output; stored in ``run.json`` (with fingerprints of
    the model and tokenizer, see ``run_sampling``) to guard resumes. ``labels`` holds each
    image's condition as an int: its class, or its row in ``conditions`` (captions)."""

    labels: list[int]
    batch_size: int
    seed: int
    sampling: dict = field(default_factory=dict)
    resize: int | None = None
    decode: bool = False
    uint8: str = "round"  # decoded images to 8 bits: "round" or "floor" (see to_uint8)
    numerics: dict = field(default_factory=dict)  # autocast, TF32: recorded, applied by the caller
    protocol: dict | None = None  # the --protocol applied and its overrides
    conditions: ConditionSource = field(default_factory=ClassLabelSource)

    def fingerprint(self) -> dict:
        """What run.json records; settings at their defaults are left out, so folders of runs
        made before a setting existed still resume."""
        digest = hashlib.sha256(json.dumps(self.labels).encode()).hexdigest()
        extra = {
            "uint8": self.uint8 if self.uint8 != "round" else None,
            "numerics": {k: v for k, v in self.numerics.items()
                         if v is not None and (k, v) != ("autocast", "off")} or None,
            "protocol": self.protocol,
            "conditions": self.conditions.fingerprint(),
        }
        return {
            "num_samples": len(self.labels),
            "labels_sha256": digest,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "sampling": json.loads(json.dumps(self.sampling, default=repr)),
            "resize": self.resize,
            "decode": self.decode,
            **{key: value for key, value in extra.items() if value is not None},
        }

    def check(self) -> None:
        """Raise on settings no run can use (before any model work)."""
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.uint8 not in UINT8_ROUNDING:
            raise ValueError(f"uint8 {self.uint8!r}: choose one of {', '.join(UINT8_ROUNDING)}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(
                f"resize must be >= 1 pixel (or None for the decoded size), got {self.resize}"
            )

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
    (``torch.distributed.barrier`` under torchrun). The folder records fingerprints of the
    model's and the tokenizer's contents (not their paths), so a checkpoint replaced at the same
    path is noticed instead of mixing its samples with the old ones.
    """
    config.check()
    if tokenizer is not None:
        check_tokenizer(tokenizer, sampler.seq_len, sampler.model.vocab_size)
    out = Path(out_dir)
    _claim_directory(out, _manifest(config, sampler, tokenizer), rank, barrier)
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


def _manifest(config: RunConfig, sampler: Sampler, tokenizer: ImageTokenizer | None) -> dict:
    """What run.json records: the settings, the model's and tokenizer's fingerprints, and the
    device type (CPU and CUDA generators draw different streams)."""
    model = sampler.model
    return {
        **config.fingerprint(),
        "model": weights_fingerprint(model, config=model.config.to_dict()),
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "device": sampler.device.type,
    }


def weights_fingerprint(module: torch.nn.Module, **extra) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes) and of ``extra``: identifies
    weights by their contents, wherever and whenever they were loaded from."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=repr).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: ImageTokenizer) -> str:
    """The tokenizer's sizes and, for a torch module, its weights (others: class and sizes)."""
    sizes = {k: getattr(tokenizer, k) for k in ("vocab_size", "grid", "image_size", "channels")}
    sizes["type"] = type(tokenizer).__qualname__
    if isinstance(tokenizer, torch.nn.Module):
        return weights_fingerprint(tokenizer, **sizes)
    return hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()


#: Manifest keys whose change means the folder holds samples of other weights.
_WEIGHTS = {
    "model": "a different model (weights, architecture or precision)",
    "tokenizer": "images of a different tokenizer",
}


def _claim_directory(out: Path, wanted: dict, rank: int, barrier: Callable[[], None]) -> None:
    """Write run.json on a fresh folder; refuse to resume a run made with another model,
    tokenizer or other settings."""
    manifest = out / MANIFEST
    check_output_kind(out, "sampling run")
    if rank == 0 and not manifest.exists():
        text = json.dumps(wanted, indent=2, sort_keys=True)
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))
    barrier()
    found = read_json_record(manifest)
    if found == wanted:
        return
    changed = changed_keys(found, wanted)
    other = [_WEIGHTS[k] for k in changed if k in _WEIGHTS and found.get(k) is not None]
    if other:
        raise ValueError(
            f"{out} holds samples of {' and '.join(other)} (its contents differ, even if the "
            "file path is the same); use a new output folder (--out) or remove it to start over"
        )
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
    conditions = config.conditions.batch(labels)
    tokens = sampler.generate(conditions, generator=generator, **config.sampling)
    arrays = {"tokens": tokens.cpu().numpy(), "labels": np.asarray(labels, dtype=np.int64)}
    if tokenizer is not None:
        images = decode_tokens(tokenizer, tokens, size=config.resize, rounding=config.uint8)
        arrays["images"] = images
        if write_png:
            first = shard * config.batch_size
            for i, image in enumerate(images):
                png = out / "images" / f"{first + i:06d}.png"
                atomic_write(png, lambda tmp, im=image: to_pil(im).save(tmp, format="PNG"))
    atomic_save_npz(shard_path(out, shard), arrays)


def _read_shard(path: Path, key: str) -> np.ndarray:
    """One array of a finished shard; a damaged shard is named with the fix."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[key]
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path} is damaged ({type(exc).__name__}); delete it and run the same command "
            "again: the run samples that shard again"
        ) from None


def _assemble(out: Path, config: RunConfig, with_images: bool) -> RunOutputs:
    missing = [s for s in range(config.num_shards) if not shard_path(out, s).exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shard(s) missing in {out / 'shards'} (first: {missing[0]}); "
            "a rank probably failed: run the same command again to finish them"
        )

    def shards(key: str) -> Iterator[np.ndarray]:
        for s in range(config.num_shards):
            yield _read_shard(shard_path(out, s), key)

    labels = np.asarray(config.labels, dtype=np.int64)
    key = config.conditions.key
    tokens = np.concatenate(list(shards("tokens")))
    token_members = {"tokens": _whole(tokens), key: _whole(labels)}
    tokens_path = atomic_write(out / TOKENS_FILE, lambda tmp: _write_npz(tmp, token_members))
    outputs = RunOutputs(tokens=tokens_path)
    if with_images:
        first = next(shards("images"))
        images = ((len(labels), *first.shape[1:3], 3), np.uint8, map(_as_rgb, shards("images")))
        outputs.samples = atomic_write(
            out / SAMPLES_FILE,
            lambda tmp: _write_npz(tmp, {"arr_0": images, key: _whole(labels)}),
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
