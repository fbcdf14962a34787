"""DDO rounds: negatives sampled from the frozen reference, and rounds of fine-tuning.

Direct Discriminative Optimization (Zheng et al., ICML 2025) contrasts each data row with a
sample of the reference model for the same label (``ccalign.align.ddo_loss``). Negatives are
drawn guidance-free from the reference with the KV-cache sampler, in one of two ways:

- ``file`` (the default): before the round trains, every negative it will use is sampled into
  ``<out>/negatives.safetensors``: the trainer's data order, batch plan and null-row draws are
  replayed to know each step's conditional rows and their labels. Sampling runs in inference
  mode in large batches, each process takes every world-th step, each finished
  step is one file under ``<out>/negatives/`` (a killed round resumes its sampling), and the
  training steps only look samples up. The result is a ccalign flat code file (``codes``,
  ``labels``) that ``open_codes`` reads, plus ``rows``: the global row each sample belongs to.
- ``online``: each micro-batch samples its own negatives inside the training step.

Both draw exact samples of the same reference (temperature 1, no top-k / top-p unless set), at
the precision the loss scores them with (the reference's weights dtype,
``train.reference_dtype``, and the trainer's autocast), so the loss has the same distribution;
the file is the default because it is far cheaper: sampling is latency-bound at a
micro-batch's few rows, and online it repeats for every micro-step, while the file samples
hundreds of rows per call once per round. The random key of a negative is
(train.seed, round, step, chunk of ``negatives_batch`` rows) for the file and (train.seed,
round, first global row of the micro-batch) online, so neither depends on the number of
processes and a resumed round is bit-exact on the CPU. Null-masked rows get no negative: their
fake term has weight 0 (see ``ddo_loss``).

Rounds: round r fine-tunes from, and against, round r - 1's final model (round ``method.round``
from ``model.init``). With ``method.rounds = 1`` the round writes into ``checkpoint.out`` like
any run; with more, round r writes ``<out>/round_<r>/`` (its data order from ``data.seed +
r - method.round``) and the last round's model is copied to ``<out>/final.safetensors``; a
resumed run skips finished rounds.

Families: negatives come from the reference's family sampler (LlamaGen's KV-cache sampler,
VAR's scale-by-scale one), eager. A sampler refuses settings it lacks (VAR's has no temperature:
``method.negatives_temperature`` must stay 1). ``method.negatives_retokenize`` needs the
family's ``retokenize`` capability (VAR): each sample is decoded to 8-bit pixels with the
model's tokenizer (VAR's VQVAE, ``model.vae``) and re-encoded, as NVlabs/DDO's VAR code trains on
images its sampler saved; the tokenizer's fingerprint goes into the file's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ccalign.conditions import ClassLabels
from ccalign.data.codes import FLAT_FORMAT
from ccalign.io import (
    atomic_save_npz,
    atomic_save_safetensors,
    atomic_write,
    open_safetensors,
    read_json_record,
)
from ccalign.models import families
from ccalign.train import distributed as D
from ccalign.train.build import model_from_config, spec_from_section
from ccalign.train.objectives import DDOObjective
from ccalign.train.precision import reference_dtype
from ccalign.train.rundir import check_output_folder
from ccalign.train.state import tensor_fingerprint

if TYPE_CHECKING:
    from ccalign.train.config import MethodSection, TrainConfig
    from ccalign.train.trainer import Trainer

NEGATIVES_FILE = "negatives.safetensors"
NEGATIVES_DIR = "negatives"
NEGATIVE_SOURCES = ("file", "online")
_KEY_TAG = 0x64646F  # "ddo": keeps these streams apart from the trainer's other keyed draws


def negative_seed(*key: int) -> int:
    """A 63-bit generator seed that is a pure function of the integers in ``key``."""
    state = np.random.SeedSequence([*key, _KEY_TAG]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def sampling_settings(method: MethodSection) -> dict:
    """The sampler's keyword arguments for negatives (guidance-free)."""
    return {
        "temperature": method.negatives_temperature,
        "top_k": method.negatives_top_k,
        "top_p": method.negatives_top_p,
    }


def negative_sampler(reference: nn.Module, precision: Precision, *, codec=None, **options):
    """The reference family's sampler for negatives, eager (each call's batch differs), at the
    ``precision`` the loss scores them with; ``codec``: decode and re-encode every sample with it
    (the ``retokenize`` capability)."""
    if codec is not None:
        options["retokenize"] = codec
    return families.of(reference).sampler(reference, eager=True, dtype=precision.weights,
                                           autocast=precision.autocast, **options)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the loss scores the reference: its weights' dtype and the trainer's autocast."""

    weights: torch.dtype
    autocast: torch.dtype | None
    device_type: str = "cpu"

    @classmethod
    def of(cls, trainer: Trainer) -> Precision:
        return cls(reference_dtype(trainer.config.train), trainer.autocast_dtype,
                   trainer.device.type)

    def record(self) -> str | None:
        """For the negatives' manifest; None for float32 without autocast on the CPU (where
        negatives were always sampled so), so those earlier files stay valid; on CUDA always
        (earlier CUDA files came from a bf16 copy and are sampled again)."""
        if self.weights == torch.float32 and self.autocast is None and self.device_type == "cpu":
            return None
        return f"{self.weights}" + (f" autocast {self.autocast}" if self.autocast else "")


def check_negative_settings(method: MethodSection, model: nn.Module) -> None:
    """Refuse negative settings that ``model``'s family cannot sample, naming the key."""
    family = families.of(model)
    if method.negatives_retokenize and "retokenize" not in family.capabilities:
        raise ValueError(f"method.negatives_retokenize: {family.missing('retokenize')}; remove it")
    try:
        family.check_sampling(None, sampling_settings(method))
    except ValueError as exc:  # its message starts with the setting's name
        raise ValueError(f"method.negatives_{exc}") from None


def retokenizer(config: TrainConfig, model: nn.Module):
    """The tokenizer that re-encodes the negatives (``method.negatives_retokenize``), else None.

    The reference was loaded with the same tokenizer, which checked that they agree."""
    if not config.method.negatives_retokenize:
        return None
    spec = spec_from_section(config.model)
    return families.of(model).codec_for(spec, "method.negatives_retokenize")


class OnlineNegatives:
    """Samples each micro-batch's negatives from the reference inside the training step."""

    def __init__(self, *, seed: int, round_index: int, sampling: dict, precision: Precision,
                 codec=None):
        self.seed, self.round_index, self.sampling = seed, round_index, sampling
        self.precision, self.codec = precision, codec
        self._sampler = None

    def draw(self, reference: nn.Module, labels: Tensor, row_ids: Tensor) -> Tensor:
        """(K, N) tokens keyed by (seed, round, the micro-batch's first conditional row)."""
        if self._sampler is None:  # kept for the round
            self._sampler = negative_sampler(reference, self.precision, codec=self.codec)
        sampler = self._sampler
        if labels.numel() == 0:
            return torch.empty(0, sampler.seq_len, dtype=torch.long, device=sampler.device)
        key = negative_seed(self.seed, self.round_index, int(row_ids[0]))
        generator = torch.Generator(sampler.device).manual_seed(key)
        try:
            return sampler.generate(labels, generator=generator, **self.sampling)
        finally:
            sampler.release()  # the cache leaves the reference as the loss needs it


class FileNegatives:
    """Negatives sampled before training, looked up by global row; labels are checked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_safetensors(self.path) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FLAT_FORMAT or "rows" not in set(f.keys()):
                raise ValueError(
                    f"{self.path} is not a DDO negatives file (a ccalign code file with rows); "
                    "delete it and the round samples it again"
                )
            self.tokens = f.get_tensor("codes")[:, 0].long()
            self.labels = f.get_tensor("labels").long()
            self.rows = f.get_tensor("rows").long()
        self.meta = meta

    def draw(self, reference: nn.Module, labels: Tensor, row_ids: Tensor) -> Tensor:
        """The stored samples of rows ``row_ids``, which must carry ``labels``."""
        where = torch.searchsorted(self.rows, row_ids)
        found = where < len(self.rows)
        found[found.clone()] = self.rows[where[found]] == row_ids[found]
        if not bool(found.all()):
            raise ValueError(
                f"{self.path} holds no negative for global row {int(row_ids[~found][0])}: it was "
                "sampled for another run; delete it and the round samples it again"
            )
        if not torch.equal(self.labels[where], labels.cpu()):
            raise ValueError(
                f"{self.path}: the stored negatives' labels differ from the data's at these rows; "
                "it was sampled for other data; delete it and the round samples it again"
            )
        return self.tokens[where].to(labels.device)


def step_rows(
    all_labels: np.ndarray, plan: D.BatchPlan, step: int, seed: int, uncond_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Global row ids and labels of step ``step``'s conditional rows, as the trainer sees them."""
    epoch, in_epoch = divmod(step - 1, plan.steps_per_epoch)
    first = in_epoch * plan.global_batch
    items = plan.epoch_order(epoch)[first : first + plan.global_batch]
    cond = ~D.keyed_row_mask(seed, step, plan.global_batch, uncond_ratio).numpy()
    rows = (step - 1) * plan.global_batch + np.flatnonzero(cond)
    return rows.astype(np.int64), all_labels[items][cond].astype(np.int64)


def write_negatives(reference: nn.Module, trainer: Trainer, codec=None) -> Path:
    """Sample every negative of ``trainer``'s round into ``<out>/negatives.safetensors``.

    ``reference`` must hold the round's reference weights; each process samples its steps, the
    main process joins them. An existing file for the same settings and steps is reused; a
    resume with more steps samples only the new steps' negatives. ``codec``: re-encode.
    """
    config, out, steps = trainer.config, trainer.out, trainer.total_steps
    manifest = _manifest(config, trainer, codec)
    final = out / NEGATIVES_FILE
    if final.exists():
        meta = FileNegatives(final).meta
        if meta.get("manifest") == json.dumps(manifest) and meta["steps"] == str(steps):
            return final
    folder = out / NEGATIVES_DIR
    _claim(folder, manifest, trainer.dist)
    labels = trainer.dataset.all_labels()
    started = time.perf_counter()
    sampler = negative_sampler(reference, Precision.of(trainer), codec=codec,
                               device=trainer.device, inplace=True)
    for step in range(1 + trainer.dist.rank, steps + 1, trainer.dist.world_size):
        path = folder / f"step_{step:08d}.npz"
        if not path.exists():
            arrays = _sample_step(sampler, config, labels, trainer.plan, step)
            atomic_save_npz(path, arrays)
    sampler.release()
    D.barrier(trainer.dist)
    seconds = time.perf_counter() - started  # this call's sampling (a resume: only its part)
    if trainer.dist.is_main:
        _join(folder, final, steps, manifest, reference, seconds)
    D.barrier(trainer.dist)
    return final


def _sample_step(
    sampler, config: TrainConfig, all_labels: np.ndarray, plan: D.BatchPlan, step: int
) -> dict[str, np.ndarray]:
    """One step's negatives, in chunks of ``negatives_batch`` rows, each chunk keyed apart."""
    method = config.method
    rows, labels = step_rows(all_labels, plan, step, config.train.seed, method.uncond_ratio)
    size, pieces = method.negatives_batch, []
    for chunk, start in enumerate(range(0, len(rows), size)):
        key = negative_seed(config.train.seed, method.round, step, chunk)
        generator = torch.Generator(sampler.device).manual_seed(key)
        part = torch.from_numpy(labels[start : start + size])
        tokens = sampler.generate(part, generator=generator, **sampling_settings(method))
        pieces.append(tokens.cpu().numpy())
    empty = np.zeros((0, sampler.seq_len), dtype=np.int64)
    tokens = np.concatenate(pieces) if pieces else empty
    return {"tokens": tokens, "labels": labels, "rows": rows}


def _manifest(config: TrainConfig, trainer: Trainer, codec) -> dict:
    """What the negatives depend on, besides the number of steps."""
    method = config.method
    manifest = {
        "seed": config.train.seed,
        "round": method.round,
        "uncond_ratio": method.uncond_ratio,
        "negatives_batch": method.negatives_batch,
        "sampling": sampling_settings(method),
        "global_batch": trainer.plan.global_batch,
        "data_seed": trainer.plan.seed,
        "dataset_size": trainer.plan.dataset_size,
        "reference": repr(trainer.reference_fingerprint),
        "device": trainer.device.type,  # CPU and CUDA generators draw different streams
    }
    if codec is not None:  # only then: manifests of earlier runs stay valid
        manifest["retokenize_vae"] = f"{tensor_fingerprint(codec):.10g}"
    precision = Precision.of(trainer).record()
    if precision is not None:
        manifest["precision"] = precision
    return manifest


def _claim(folder: Path, manifest: dict, dist: D.DistInfo) -> None:
    """Record the settings of the step files in ``folder``; refuse files of other settings."""
    path = folder / "run.json"
    if dist.is_main and not path.exists():
        text = json.dumps(manifest, indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    D.barrier(dist)
    if json.loads(path.read_text()) != json.loads(json.dumps(manifest)):
        raise ValueError(
            f"{folder} holds negatives sampled with other settings or another reference; "
            "delete it and the round samples them again"
        )


def _join(
    folder: Path, final: Path, steps: int, manifest: dict, reference: nn.Module, seconds: float
) -> None:
    """All steps' negatives as one flat code file, with their global rows and sampling time."""
    parts = {"tokens": [], "labels": [], "rows": []}
    for step in range(1, steps + 1):
        with np.load(folder / f"step_{step:08d}.npz") as data:
            for key, values in parts.items():
                values.append(data[key])
    joined = {key: np.concatenate(values) for key, values in parts.items()}
    vocab = reference.vocab_size
    dtype = torch.int16 if vocab <= 2**15 else torch.int32
    tensors = {
        "codes": torch.from_numpy(joined["tokens"]).to(dtype)[:, None],
        "labels": torch.from_numpy(joined["labels"]),
        "rows": torch.from_numpy(joined["rows"]),
    }
    grid, seq_len = families.of(reference).token_grid(reference), reference.seq_len
    meta = {
        "format": FLAT_FORMAT,
        "vocab_size": str(vocab),
        "grid": str(grid),
        "manifest": json.dumps(manifest),
        "steps": str(steps),
        "sampling_seconds": f"{seconds:.2f}",
    }
    if seq_len != grid * grid:  # multi-scale codes (VAR), as write_flat_codes records them
        meta["seq_len"] = str(seq_len)
    atomic_save_safetensors(tensors, final, meta)


def attach_negatives(trainer: Trainer) -> None:
    """Give the trainer's DDO objective its negative source (sampling the file if needed)."""
    objective, config = trainer.objective, trainer.config
    if not isinstance(objective, DDOObjective):
        raise TypeError(f"a DDO round needs a DDOObjective, got {type(objective).__name__}")
    method = config.method
    if not isinstance(trainer.condition, ClassLabels):
        raise ValueError(
            f"method ddo: its negatives are keyed by class labels; {trainer.condition.name} "
            "conditions are not supported yet: use cca, dpo or unlearning"
        )
    check_negative_settings(method, trainer.model)
    codec = retokenizer(config, trainer.model)
    if method.negatives == "online":
        objective.negatives = OnlineNegatives(
            seed=config.train.seed,
            round_index=method.round,
            sampling=sampling_settings(method),
            precision=Precision.of(trainer),
            codec=codec,
        )
        return
    cuda = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # building the model draws; dropout must not see it
        reference = model_from_config(config.model)  # the init weights, unsharded, for sampling
    objective.negatives = FileNegatives(write_negatives(reference, trainer, codec))


def round_config(config: TrainConfig, round_index: int, init: str, out: Path) -> TrainConfig:
    """The one-round config of round ``round_index``: its init, folder and data order."""
    offset = round_index - config.method.round
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, init=init),
        data=dataclasses.replace(config.data, seed=config.data.seed + offset),
        method=dataclasses.replace(config.method, round=round_index, rounds=1),
        checkpoint=dataclasses.replace(config.checkpoint, out=str(out)),
    )


def run_rounds(
    config: TrainConfig, *, resume: bool, callbacks: Sequence = (), train_once: Callable
) -> None:
    """Train ``method.rounds`` DDO rounds into ``checkpoint.out`` (see the module doc), each
    through ``train_once`` (``ccalign.train.run``'s, which attaches the negatives).

    The caller has claimed the output folder (``run_training`` does).
    """
    if config.method.rounds == 1:
        train_once(config, resume=resume, callbacks=callbacks)
        return
    out, init = Path(config.checkpoint.out), config.model.init
    claim_rounds(out, config)
    first = config.method.round
    # one process group for all rounds: re-creating it per round races the next rendezvous
    # against the teardown of the last one
    dist = D.init_from_env(_device_type(config.train.device))
    try:
        for index in range(first, first + config.method.rounds):
            folder = out / f"round_{index}"
            if not (folder / "final.safetensors").exists():
                if D.launched_as_main():  # the others could see what the main one writes
                    check_output_folder(folder, resume=resume, restart=False)
                one = round_config(config, index, init, folder)
                train_once(one, resume=resume, callbacks=callbacks)
            init = str(folder / "final.safetensors")
    finally:
        D.shutdown(dist)
    if D.launched_as_main():  # config.json was recorded at the start (run_training)
        atomic_write(out / "final.safetensors", lambda tmp: shutil.copyfile(init, tmp))


#: what a multi-round run records at its start: the fingerprint of its init weights
ROUNDS_RECORD = "rounds.json"


def claim_rounds(out: Path, config: TrainConfig) -> None:
    """Record the init weights' fingerprint of a multi-round run before its first round, or
    check a resumed run's init against it: finished rounds are reused as they are, so another
    init must not slip in. (The recipe is checked by ``run_training``, which records the run's
    config.json at its start.)"""
    if not D.launched_as_main():  # the main process checks (loading the init) and writes
        return
    rounds = out / ROUNDS_RECORD

    def fingerprint() -> str:  # loads the init: only where a check or the record needs it
        return f"{tensor_fingerprint(model_from_config(config.model)):.12g}"

    if rounds.exists():
        if read_json_record(rounds).get("init_fingerprint") != fingerprint():
            raise ValueError(
                f"cannot resume {out}: the init weights ({config.model.init}) differ from those "
                "its first round started from; pass the run's own --init, or start over with "
                "--restart or a new --out"
            )
    else:
        entry = json.dumps({"init_fingerprint": fingerprint()})
        atomic_write(rounds, lambda tmp: Path(tmp).write_text(entry))


def _device_type(name: str) -> str:
    """``train.device``'s type, ``auto`` resolved as the trainer resolves it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def validate(config: TrainConfig) -> None:
    """DDO's own choices (its numbers are checked by their declared ranges)."""
    method = config.method
    if method.negatives not in NEGATIVE_SOURCES:
        raise ValueError(
            f"method.negatives = {method.negatives!r} is not one of {list(NEGATIVE_SOURCES)}"
        )
    if method.negatives == "online" and config.train.parallel == "fsdp":
        raise ValueError(
            "method.negatives = 'online' samples from the reference inside each step, which a "
            "sharded (FSDP) reference cannot do; use method.negatives = 'file' with FSDP"
        )
