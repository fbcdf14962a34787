"""DDO rounds: negatives sampled from the frozen reference, and rounds of fine-tuning.

Direct Discriminative Optimization (Zheng et al., ICML 2025) contrasts each data row with a
sample of the reference model for the same label (``ccalign.align.ddo_loss``). Negatives are
drawn guidance-free from the reference with the KV-cache sampler, in one of two ways:

- ``file`` (the default): before the round trains, every negative it will use is sampled into
  ``<out>/negatives.safetensors``: the trainer's data order, batch plan and null-row draws are
  replayed to know each step's conditional rows and their labels. Sampling runs in inference
  mode in large batches (bf16 on CUDA), each process takes every world-th step, each finished
  step is one file under ``<out>/negatives/`` (a killed round resumes its sampling), and the
  training steps only look samples up. The result is a ccalign flat code file (``codes``,
  ``labels``) that ``open_codes`` reads, plus ``rows``: the global row each sample belongs to.
- ``online``: each micro-batch samples its own negatives inside the training step.

Both draw exact samples of the same reference (temperature 1, no top-k / top-p unless set), so
the loss has the same distribution; the file is the default because it is far cheaper: sampling
is latency-bound at a micro-batch's few rows, and online it repeats for every micro-step, while
the file samples hundreds of rows per call once per round. The random key of a negative is
(train.seed, round, step, chunk of ``negatives_batch`` rows) for the file and (train.seed,
round, first global row of the micro-batch) online, so neither depends on the number of
processes and a resumed round is bit-exact on the CPU. Null-masked rows get no negative: their
fake term has weight 0 (see ``ddo_loss``).

Rounds: round r fine-tunes from, and against, round r - 1's final model (round ``method.round``
from ``model.init``). With ``method.rounds = 1`` the round writes into ``checkpoint.out`` like
any run; with more, round r writes ``<out>/round_<r>/`` (its data order from ``data.seed +
r - method.round``) and the last round's model is copied to ``<out>/final.safetensors``; a
resumed run skips finished rounds.

Families: :func:`negative_sampler` picks the reference's sampler (LlamaGen's KV-cache sampler,
or VAR's scale-by-scale one), the one place that knows them. VAR's sampler has no temperature
(``method.negatives_temperature`` must stay 1; top-k / top-p map to VAR's filter). With
``method.negatives_retokenize`` (VAR only), each sample is decoded from its f_hat with the VQVAE
(``model.vae``) to 8-bit pixels and re-encoded, as NVlabs/DDO's VAR code trains on images its
sampler saved (see :func:`retokenize`); the VQVAE's fingerprint goes into the file's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ccalign.data.codes import FLAT_FORMAT
from ccalign.io import atomic_save_safetensors, atomic_write, open_safetensors
from ccalign.models import families, var
from ccalign.sample.engine import Sampler
from ccalign.sample.var import VarSampler
from ccalign.tokenizers import var_vq
from ccalign.train import distributed as D
from ccalign.train.config import MethodSection, TrainConfig
from ccalign.train.objectives import DDOObjective
from ccalign.train.run import model_from_config, train_once, var_vae_file
from ccalign.train.rundir import check_output_folder
from ccalign.train.state import tensor_fingerprint
from ccalign.train.trainer import Callback, Trainer

NEGATIVES_FILE = "negatives.safetensors"
NEGATIVES_DIR = "negatives"
RETOKENIZE_ROWS = 32  # images decoded and re-encoded at once (a constant: part of the result)
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


@torch.no_grad()
def retokenize(vae: var_vq.VarVQ, f_hat: Tensor) -> Tensor:
    """Codes (B, L) of the 8-bit images that ``f_hat`` decodes to.

    As DDO's VAR_sample.py saves its samples: decode, (x + 1) / 2 * 255 cast to uint8 (which
    truncates, as numpy's astype does); read back as VAR's data pipeline reads images
    (2 p / 255 - 1, no resize: they already have the VQVAE's size); then encode. Runs in
    fixed chunks of ``RETOKENIZE_ROWS`` rows (256 px images at full batch would need tens of GiB).
    """
    codes = []
    for part in f_hat.split(RETOKENIZE_ROWS):
        images = vae.decode_fhat(part.to(vae.device, torch.float32))
        pixels = images.add(1).mul(0.5).mul(255).to(torch.uint8)
        codes.append(vae.encode(pixels.float().div(255).mul(2).sub(1)))
    return torch.cat(codes)


class VarNegatives:
    """VAR's sampler as DDO's negative sampler: guidance-free codes, or with ``vae`` the codes
    of the decoded 8-bit images re-encoded (:func:`retokenize`). ``kwargs`` go to VarSampler."""

    def __init__(self, reference: var.VAR, vae: var_vq.VarVQ | None = None, **kwargs):
        self.sampler = VarSampler(reference, **kwargs)
        self.device, self.seq_len = self.sampler.device, self.sampler.seq_len
        self.vae = None if vae is None else vae.to(self.device, torch.float32)

    def generate(
        self,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> Tensor:
        """(B, L) codes of guidance-free samples for ``labels``."""
        refusal = _var_refusal(temperature, False)
        if refusal is not None:
            raise ValueError(refusal)
        settings = {"generator": generator, "top_k": top_k, "top_p": top_p}
        # the trainer's autocast (online mode) must not reach the float32 quantiser steps
        with torch.autocast(self.device.type, enabled=False):
            if self.vae is None:
                return self.sampler.generate(labels, **settings)
            _, f_hat = self.sampler.generate(labels, return_fhat=True, **settings)
            return retokenize(self.vae, f_hat)

    def release(self) -> None:
        """Free what the sampler holds between calls."""
        self.sampler.release()


def _llamagen_negatives(
    reference: nn.Module, vae: var_vq.VarVQ | None = None, **kwargs
) -> Sampler:
    """LlamaGen's KV-cache sampler, without CUDA graphs (each call's batch differs)."""
    if vae is not None:
        raise ValueError(_llamagen_refusal(1.0, True))
    return Sampler(reference, cuda_graph=False, **kwargs)


def _llamagen_refusal(temperature: float, retokenize: bool) -> str | None:
    if retokenize:
        return (
            "method.negatives_retokenize decodes VAR samples to images and re-encodes them (the "
            "VAR recipe of NVlabs/DDO); a LlamaGen reference's negatives are its own tokens: "
            "remove it"
        )
    return None


def _var_refusal(temperature: float, retokenize: bool) -> str | None:
    if temperature != 1.0:
        return (
            f"method.negatives_temperature = {temperature}: VAR's sampler has no temperature "
            "(top-k and top-p only): leave it at 1 for a VAR reference"
        )
    return None


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model family samples DDO negatives."""

    #: (reference, vae, device=, inplace=) -> an object with generate(labels, generator=,
    #: temperature=, top_k=, top_p=), release(), device and seq_len
    sampler: Callable[..., object]
    grid: Callable[[nn.Module], int]  # the last scale's side, for the code file's metadata
    refusal: Callable[[float, bool], str | None]  # (temperature, retokenize) -> why not


#: the one place that knows the families' negative samplers
_FAMILIES = {
    "llamagen": _Family(_llamagen_negatives, lambda m: m.config.grid, _llamagen_refusal),
    "var": _Family(VarNegatives, lambda m: m.quantizer.side, _var_refusal),
}


def negative_sampler(reference: nn.Module, *, vae: var_vq.VarVQ | None = None, **kwargs):
    """The sampler of ``reference``'s family for negatives (``vae``: re-encode, VAR only)."""
    return _FAMILIES[families.family_of(reference)].sampler(reference, vae, **kwargs)


def check_negative_settings(method: MethodSection, model: nn.Module) -> None:
    """Refuse negative settings that ``model``'s family cannot sample, naming the key."""
    family = _FAMILIES[families.family_of(model)]
    refusal = family.refusal(method.negatives_temperature, method.negatives_retokenize)
    if refusal is not None:
        raise ValueError(refusal)


def retokenizer(config: TrainConfig, model: nn.Module) -> var_vq.VarVQ | None:
    """The VQVAE that re-encodes the negatives (``method.negatives_retokenize``), else None."""
    if not config.method.negatives_retokenize:
        return None
    path = var_vae_file(config.model)
    if path is None:
        raise ValueError(
            "method.negatives_retokenize needs the VQVAE (encoder and decoder) that decodes the "
            "samples and re-encodes them: set model.vae (vae_ch160v4096z32.pth or the registry "
            "name var-vae)"
        )
    # the reference was loaded with this VQVAE, which checked that their quantisers agree
    return var_vq.load(path, patch_nums=model.config.patch_nums)


class OnlineNegatives:
    """Samples each micro-batch's negatives from the reference inside the training step."""

    def __init__(
        self, *, seed: int, round_index: int, sampling: dict, vae: var_vq.VarVQ | None = None
    ):
        self.seed, self.round_index, self.sampling = seed, round_index, sampling
        self.vae = vae
        self._sampler = None

    def draw(self, reference: nn.Module, labels: Tensor, row_ids: Tensor) -> Tensor:
        """(K, N) tokens keyed by (seed, round, the micro-batch's first conditional row)."""
        if self._sampler is None:  # on CUDA: one bf16 copy of the reference, kept for the round
            self._sampler = negative_sampler(reference, vae=self.vae)
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


def write_negatives(
    reference: nn.Module, trainer: Trainer, vae: var_vq.VarVQ | None = None
) -> Path:
    """Sample every negative of ``trainer``'s round into ``<out>/negatives.safetensors``.

    ``reference`` must hold the round's reference weights; each process samples its steps, the
    main process joins them. An existing file for the same settings and steps is reused; a
    resume with more steps samples only the new steps' negatives. ``vae``: re-encode (VAR).
    """
    config, out, steps = trainer.config, trainer.out, trainer.total_steps
    manifest = _manifest(config, trainer, vae)
    final = out / NEGATIVES_FILE
    if final.exists():
        meta = FileNegatives(final).meta
        if meta.get("manifest") == json.dumps(manifest) and meta["steps"] == str(steps):
            return final
    folder = out / NEGATIVES_DIR
    _claim(folder, manifest, trainer.dist)
    labels = trainer.dataset.all_labels()
    started = time.perf_counter()
    sampler = negative_sampler(reference, vae=vae, device=trainer.device, inplace=True)
    for step in range(1 + trainer.dist.rank, steps + 1, trainer.dist.world_size):
        path = folder / f"step_{step:08d}.npz"
        if not path.exists():
            arrays = _sample_step(sampler, config, labels, trainer.plan, step)
            atomic_write(path, lambda tmp, a=arrays: _savez(tmp, a))
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


def _manifest(config: TrainConfig, trainer: Trainer, vae: var_vq.VarVQ | None) -> dict:
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
    if vae is not None:  # only then: manifests of earlier runs stay valid
        manifest["retokenize_vae"] = f"{tensor_fingerprint(vae):.10g}"
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
    grid, seq_len = _FAMILIES[families.family_of(reference)].grid(reference), reference.seq_len
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


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def attach_negatives(trainer: Trainer) -> None:
    """Give the trainer's DDO objective its negative source (sampling the file if needed)."""
    objective, config = trainer.objective, trainer.config
    if not isinstance(objective, DDOObjective):
        raise TypeError(f"a DDO round needs a DDOObjective, got {type(objective).__name__}")
    method = config.method
    check_negative_settings(method, trainer.model)
    vae = retokenizer(config, trainer.model)
    if method.negatives == "online":
        objective.negatives = OnlineNegatives(
            seed=config.train.seed,
            round_index=method.round,
            sampling=sampling_settings(method),
            vae=vae,
        )
        return
    cuda = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # building the model draws; dropout must not see it
        reference = model_from_config(config.model)  # the init weights, unsharded, for sampling
    objective.negatives = FileNegatives(write_negatives(reference, trainer, vae))


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


def run_rounds(config: TrainConfig, *, resume: bool, callbacks: Sequence[Callback] = ()) -> None:
    """Train ``method.rounds`` DDO rounds into ``checkpoint.out`` (see the module doc).

    The caller has claimed the output folder (``run_training`` does).
    """
    if config.method.rounds == 1:
        train_once(config, resume=resume, callbacks=callbacks, prepare=attach_negatives)
        return
    out, init = Path(config.checkpoint.out), config.model.init
    first = config.method.round
    # one process group for all rounds: re-creating it per round races the next rendezvous
    # against the teardown of the last one
    dist = D.init_from_env(_device_type(config.train.device))
    try:
        for index in range(first, first + config.method.rounds):
            folder = out / f"round_{index}"
            if not (folder / "final.safetensors").exists():
                check_output_folder(folder, resume=resume, restart=False)
                one = round_config(config, index, init, folder)
                train_once(one, resume=resume, callbacks=callbacks, prepare=attach_negatives)
            init = str(folder / "final.safetensors")
    finally:
        D.shutdown(dist)
    if D.launched_as_main():  # at the end: every process has checked the folder long before
        text = json.dumps(config.to_dict(), indent=2)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
        atomic_write(out / "final.safetensors", lambda tmp: shutil.copyfile(init, tmp))


def _device_type(name: str) -> str:
    """``train.device``'s type, ``auto`` resolved as the trainer resolves it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type
