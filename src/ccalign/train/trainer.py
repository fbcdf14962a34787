"""The training loop shared by fine-tuning (CCA / DDO / DPO / unlearning) and pretraining (MLE).

One optimizer step = ``accum`` micro-steps per process. Each micro-batch loss (a mean over its
rows) is divided by ``accum`` before backward, and DDP only all-reduces on the last micro-step
(``no_sync`` before), so the update is that of the mean loss over the global batch. With
``train.parallel = "fsdp"`` the policy and the reference are sharded per block (FSDP2) and
each process saves its own shard (``ccalign.train.sharded``; ``checkpoint.format = "full"``
gathers whole states instead, see ``ccalign.train.sharding``).

The frozen reference is a copy of the policy taken before training: ``requires_grad`` off, run
under ``no_grad``. Dropout is consistent between the two (``method.dropout``): "both" keeps both
in train mode with their own masks, as the official recipe does (D = log p_theta - log p_phi is
noisy but zero-mean at step 1); "none" turns it off in both (D = 0 exactly at step 1);
"policy-only", the biased mix, runs only when a config asks for it. Step 1 is always logged, so
the measured D at the start is in ``metrics.jsonl``. Gradient clipping is logged per step
(``clipped``) and as the fraction of clipped steps so far (``clipped_fraction``).

With ``method.lora`` the policy gets peft LoRA adapters and only they train; the reference is the
same network with the adapters off (no copy of the weights; see ``ccalign.train.lora``).

Random choices are keyed so a run is reproducible and resumable: null-class rows (and the
per-row draws an objective asks for, e.g. GFT's beta) come from (seed, step, global position),
the data order from (seed, epoch), dropout from each process's torch RNG, which checkpoints
save. A run killed and resumed ends bitwise equal on the CPU.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from ccalign.errors import UserError
from ccalign.io import atomic_write
from ccalign.models import families
from ccalign.models.family import keep_float64
from ccalign.train import distributed as D
from ccalign.train import lora, methods, precision, sharded, sharding
from ccalign.train.config import TrainConfig, check_same_recipe
from ccalign.train.objectives import Objective
from ccalign.train.optim import EMA, make_optimizer, make_schedule
from ccalign.train.state import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    seed_everything,
    tensor_fingerprint,
)

MicroBatch = tuple[Tensor, Any]  # (tokens (M, N) int64, conditions: labels (M,) or captions)
Callback = Callable[["Trainer", dict], None]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss, gradient or weights became NaN/inf; nothing non-finite was applied or saved."""


class Trainer:
    """Trains ``model`` on ``dataset`` with ``objective`` as ``config`` says; see module doc."""

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        dataset: Dataset,
        *,
        objective: Objective | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        self.config, self.dataset, self.callbacks = config, dataset, list(callbacks)
        train = config.train
        wanted = train.device if train.device != "auto" else _auto_device_type()
        self.dist = D.init_from_env(torch.device(wanted).type)
        self.device = D.resolve_device(train.device, self.dist)
        self.family = families.of(model)
        self.condition = self.family.condition(model)
        method = methods.get(config.method.name)
        self.objective = objective or method.objective(config.method, self.condition)
        self.seq_len = model.seq_len
        self.fsdp = self.dist.distributed and train.parallel == "fsdp"
        self.sharded_saves = sharded.use_sharded(config.checkpoint.format, self.fsdp)
        self.model_class = type(model)  # FSDP swaps the instance's class for a subclass
        self.lora = (
            lora.add_adapters(model, config.method.lora, train.seed)
            if config.method.lora.enabled
            else None
        )
        self.reference = self._make_reference(model) if self.objective.needs_reference else None
        precision.cast_parameters(model, precision.WEIGHT_DTYPES[train.weights_dtype])
        self.reference_fingerprint = (
            tensor_fingerprint(self.reference) if self.reference is not None else None
        )
        if self.reference is not None and self.fsdp:
            sharding.shard(self.reference, self.device.type, self.dist.world_size)
        self.model = model.to(self.device)
        if train.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.policy = self._wrap(self.model)
        self.optimizer = make_optimizer(self.model, config.optim, self.device)
        self.plan = D.BatchPlan(
            len(dataset),
            train.global_batch,
            train.micro_batch,
            self.dist.world_size,
            config.data.seed,
        )
        epoch_steps = math.ceil(train.epochs * self.plan.steps_per_epoch)
        self.total_steps = train.steps or max(1, epoch_steps)
        self.schedule = make_schedule(config.optim, self.total_steps)
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.autocast_dtype = _autocast_dtype(train.precision, self.device)
        self.out = Path(config.checkpoint.out)
        self.metrics_log = self.out / "metrics.jsonl"
        self.step = 0
        self.clipped_steps = 0
        seed_everything(train.seed + self.dist.rank)

    # ---- setup ----
    def _make_reference(self, model: nn.Module) -> nn.Module:
        """A frozen copy of the policy as it is now (see the module doc for its mode), in the
        reference dtype; with LoRA the policy's own network with its adapters off."""
        if self.lora is not None:
            reference = lora.BaseReference(self.lora)
        else:
            reference = copy.deepcopy(model)
            precision.cast_parameters(reference, precision.reference_dtype(self.config.train))
            reference.to(self.device).requires_grad_(False)
        reference.train(self.config.method.dropout == "both")
        return reference

    def _wrap(self, model: nn.Module) -> nn.Module:
        model.train(self.config.method.dropout != "none")
        if not self.dist.distributed:
            return model
        if self.fsdp:
            return sharding.shard(model, self.device.type, self.dist.world_size)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    # ---- resume ----
    def resume(self) -> bool:
        """Load the newest complete checkpoint under the output folder; False if there is none.

        The data position carries over to any number of processes (same global batch); the
        dropout RNG streams are restored exactly only with the same number, else reseeded.
        A sharded checkpoint loads into any number of processes, with FSDP or without.
        """
        found = latest_checkpoint(self.out)
        if found is None:  # killed before its first save: it starts over, and so does its log
            if self.dist.is_main:
                self._truncate_metrics_log(0)
            return False
        path, state = found
        changes = self._check_compatible(path, state)
        if state.get("format") == "sharded":
            self._load_sharded(path, state)
        else:
            self._load_full(state)
        self.step = state["step"]
        self.clipped_steps = state.get("clipped_steps", 0)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng(rngs[self.dist.rank])
        else:
            seed_everything(self.config.train.seed + self.dist.rank + 7919 * self.step)
        if self.dist.is_main:
            self._truncate_metrics_log(self.step)
            if changes:
                self._record_resume_changes(self.step, changes)
        return True

    def _load_full(self, state: dict) -> None:
        """Model, optimizer and EMA from a full checkpoint (given whole on every rank)."""
        if self.fsdp:
            sharding.load_full_model_state(self.model, state["model"])
            sharding.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        elif self.lora is not None:
            lora.load_adapter_state(self.model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # EMA switched on at resume: average from here
            self.ema = EMA(self.model, self.ema.decay)

    def _load_sharded(self, path: Path, state: dict) -> None:
        """Model, optimizer and EMA from a sharded checkpoint: each rank reads its own shard."""
        saved_ema = self.ema is not None and state["ema_decay"] is not None
        shadow = self.ema.shadow if saved_ema else None
        sharded.restore(self.model, self.optimizer, shadow, path, state["param_groups"], self.dist)
        if saved_ema:
            self.ema.decay = state["ema_decay"]
        elif self.ema is not None:  # EMA switched on at resume: average from here
            self.ema = EMA(self.model, self.ema.decay)

    def _check_compatible(self, path: Path, state: dict) -> dict:
        """Refuse a resume that would change what the run computes; returns the harmless
        changes of settings, which ``resume`` records once the state is loaded."""
        saved = {**state["data"], "parallel": state["parallel"]}
        here = {
            "dataset_size": len(self.dataset),
            "global_batch": self.plan.global_batch,
            "parallel": self._parallel_mode(),
        }
        if state.get("format") == "sharded":  # keyed by name: loads into any layout
            del here["parallel"]
        for key, value in here.items():
            if saved[key] != value:
                raise ValueError(
                    f"cannot resume from {path}: it was trained with {key} {saved[key]}, this run "
                    f"has {value}; resume with the same data and batch or start a new --out"
                )
        changes = check_same_recipe(
            path, self._effective(state["config"]), self._effective(self.config)
        )
        fingerprint = state.get("reference_fingerprint")
        if fingerprint is not None and self.reference is not None:
            if not math.isclose(fingerprint, self.reference_fingerprint, rel_tol=1e-9):
                raise ValueError(
                    f"cannot resume from {path}: the reference (init) weights differ from those "
                    "the run started from; pass the same --init checkpoint"
                )
        return changes

    def _effective(self, config: TrainConfig | dict) -> dict:
        """A config as a dict with LoRA's default targets spelled out (the family's), so a run
        recorded either way compares equal."""
        record = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
        lora_section = record.get("method", {}).get("lora")
        if lora_section is not None and not lora_section.get("target_modules"):
            method = {**record["method"], "lora": {**lora_section,
                      "target_modules": list(self.family.lora_targets)}}
            record = {**record, "method": method}
        return record

    # ---- the loop ----
    def fit(self) -> nn.Module:
        """Train until ``total_steps``; returns the policy module (sharded under FSDP)."""
        self._write_run_config()
        progress = self._progress_bar()
        try:
            while self.step < self.total_steps:
                epoch, step_in_epoch = divmod(self.step, self.plan.steps_per_epoch)
                for micro_batches in self._epoch_batches(epoch, step_in_epoch):
                    started = time.perf_counter()
                    record = self.train_step(micro_batches, self.step + 1)
                    self.step += 1
                    record.update(self._throughput(time.perf_counter() - started), epoch=epoch)
                    self._after_step(record, progress)
                    if self.step >= self.total_steps:
                        break
        finally:
            if progress is not None:
                progress.close()
        self._write_final_model()
        D.barrier(self.dist)
        return self.model

    def train_step(self, micro_batches: Sequence[MicroBatch], step: int) -> dict:
        """One optimizer step over this process's micro-batches; returns the step's metrics."""
        lr = self.schedule.apply(self.optimizer, step)
        sums = self._accumulate_gradients(micro_batches, step)
        clip = self.config.optim.grad_clip
        max_norm = clip if clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = sharding.full_tensor(grad_norm)
        names = sorted(sums)
        values = torch.stack([sums[k] for k in names] + [grad_norm.float().to(self.device)])
        values = D.all_reduce_mean(values, self.dist).tolist()
        record = {"step": step, **dict(zip(names, values[:-1], strict=True))}
        record.update(lr=lr, grad_norm=values[-1])
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {step}: loss {record['loss']}, gradient norm {record['grad_norm']} is not "
                f"finite; the step was not applied. {self._recovery_advice()}"
            )
        clipped = record["grad_norm"] > max_norm
        self.clipped_steps += clipped
        record.update(clipped=int(clipped), clipped_fraction=self.clipped_steps / step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return record

    def _accumulate_gradients(self, micro_batches: Sequence[MicroBatch], step: int) -> dict:
        """Forward/backward every micro-batch (loss / accum); returns summed metrics / accum."""
        accum = len(micro_batches)
        if accum != self.plan.accum_steps:
            raise ValueError(f"expected {self.plan.accum_steps} micro-batches, got {accum}")
        seed, size = self.config.train.seed, self.plan.global_batch
        masks = D.keyed_row_mask(seed, step, size, self.objective.row_mask_ratio)
        draws = None
        if self.objective.row_draws:
            draws = D.keyed_uniforms(seed, step, size, D.DRAWS_STREAM)
        offsets = self.plan.chunk_offsets(self.dist.rank)
        first_row = (step - 1) * self.plan.global_batch
        sums: dict[str, Tensor] = {}
        for m, (tokens, labels) in enumerate(micro_batches):
            count = self.condition.size(labels)
            rows = slice(offsets[m], offsets[m] + count)
            extra = {} if draws is None else {"row_draws": draws[rows].to(self.device)}
            if self.objective.needs_row_ids:  # global positions: (step - 1) * G + offset
                start = first_row + offsets[m]
                extra["row_ids"] = torch.arange(start, start + count)
            with self._gradient_sync(last=m == accum - 1):
                with self._autocast():
                    out = self.objective(
                        self.policy,
                        self.reference,
                        self.condition.to(labels, self.device),
                        tokens.to(self.device, non_blocking=True),
                        masks[rows].to(self.device),
                        **extra,
                    )
                (out.loss / accum).backward()
            for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.float() / accum
        return sums

    def _gradient_sync(self, *, last: bool):
        """Reduce gradients across processes only on the last micro-step of an optimizer step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.distributed and not last:
            return self.policy.no_sync()
        return nullcontext()

    # ---- data ----
    def _epoch_batches(self, epoch: int, first_step: int) -> Iterator[list[MicroBatch]]:
        """This process's micro-batches, grouped per optimizer step, from ``first_step`` on."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        order = self.plan.epoch_order(epoch)
        index_lists = [
            idx.tolist()
            for s in range(first_step, self.plan.steps_per_epoch)
            for idx in self.plan.micro_batches(order, s, self.dist.rank)
        ]
        workers = self.config.data.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=getattr(self.dataset, "collate", None),
            generator=torch.Generator().manual_seed(self.config.data.seed),  # spares global RNG
        )
        group: list[MicroBatch] = []
        for tokens, labels in loader:
            group.append((tokens, labels))
            if len(group) == self.plan.accum_steps:
                yield group
                group = []

    def _autocast(self):
        """The mixed-precision context of the forward passes (none in float32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- bookkeeping ----
    def _throughput(self, seconds: float) -> dict:
        images = self.plan.global_batch / seconds
        return {"images_per_s": images, "tokens_per_s": images * self.seq_len, "step_s": seconds}

    def _after_step(self, record: dict, progress) -> None:
        every = self.config.checkpoint.every
        if self.step % every == 0 or self.step == self.total_steps:
            self.save()
        if self.dist.is_main:
            logged = self.step % self.config.train.log_every == 0 or self.step == self.total_steps
            if logged or self.step == 1:  # step 1 shows D with policy == reference
                with open(self.metrics_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.step == 1 and "d_pos" in record:
                self._say_start_gap(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
        for callback in self.callbacks:
            callback(self, record)

    def _say_start_gap(self, record: dict) -> None:
        """Print the mean D at step 1, where the policy still equals the reference."""
        expected = {
            "both": "zero-mean, noisy: both run dropout",
            "none": "exactly 0: no dropout",
            "policy-only": "biased by the policy's dropout gap",
        }[self.config.method.dropout]
        message = (
            f"step 1: mean D+ {record['d_pos']:+.3f}, D- {record['d_neg']:+.3f} nats per image "
            f"(method.dropout = {self.config.method.dropout}: {expected})"
        )
        if self.config.train.progress:
            from tqdm.auto import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)

    def _record_resume_changes(self, step: int, changes: dict) -> None:
        """Append what this resume changed to ``resumes.jsonl`` and say it."""
        entry = {"step": step, "changed": {k: list(v) for k, v in changes.items()}}
        with open(self.out / "resumes.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"resuming with changed settings (recorded in resumes.jsonl): {entry['changed']}")

    def _recovery_advice(self) -> str:
        """Where to go back to: the newest checkpoint (every saved one has finite weights)."""
        saved = list_checkpoints(self.out)
        if not saved:
            return "No checkpoint was written yet: lower optim.lr or check the data, then restart"
        return (
            f"The last checkpoint, {saved[-1][1]} (step {saved[-1][0]}), has finite weights: lower "
            "optim.lr or check the data, then continue from it with --resume"
        )

    def _check_finite_weights(self, model_state: dict[str, Tensor]) -> None:
        """Refuse to save non-finite weights: the newest checkpoint is the one users resume.

        Each rank checks what it holds (a gathered state lies on rank 0 alone, a shard on its
        rank); every rank learns the verdict, so all raise together instead of the others
        waiting at the next barrier.
        """
        bad = sharded.non_finite(model_state)
        verdict = torch.tensor([float(len(bad))], device=self.device)
        if D.all_reduce_mean(verdict, self.dist).item() > 0:
            first = f", first {bad[0]}" if bad else ""
            raise NonFiniteLossError(
                f"step {self.step}: the weights became non-finite{first}; no checkpoint was "
                f"written. {self._recovery_advice()}"
            )

    def save(self) -> Path | None:
        """Write a resumable checkpoint for the current step; every rank takes part.

        "full": rank 0 writes the gathered states to one file; "sharded": each rank writes its
        own shard into the step's folder. Returns the path on rank 0, None elsewhere.
        """
        rngs = D.gather_objects(capture_rng(), self.dist)
        if self.sharded_saves:
            path = self._save_sharded(rngs)
            return path if self.dist.is_main else None
        model_state, optimizer_state = self._full_states()
        self._check_finite_weights(model_state)
        ema_state = self.ema.state_dict() if self.ema is not None else None
        path = None
        if self.dist.is_main:
            state = self._small_state(rngs)
            state.update(model=model_state, optimizer=optimizer_state, ema=ema_state)
            path = save_checkpoint(state, self.out, self.config.checkpoint.keep)
        D.barrier(self.dist)
        return path

    def _save_sharded(self, rngs: list) -> Path:
        """Each rank writes its shard of model, optimizer and EMA; rank 0 the small state."""
        shadow = self.ema.shadow if self.ema is not None else None
        tensors, param_groups = sharded.tensor_state(self.model, self.optimizer, shadow)
        self._check_finite_weights(tensors["model"])
        state = self._small_state(rngs)
        state.update(
            format="sharded",
            param_groups=param_groups,
            ema_decay=self.ema.decay if self.ema is not None else None,
        )
        folder = checkpoint_path(self.out, self.step, folder=True)
        path = sharded.save(tensors, state, folder, self.dist)
        if self.dist.is_main:
            prune_checkpoints(self.out, self.config.checkpoint.keep)
        D.barrier(self.dist)
        return path

    def _small_state(self, rngs: list) -> dict:
        """What a checkpoint holds besides tensors: step, data position, RNGs, config, ..."""
        epoch, step_in_epoch = divmod(self.step, self.plan.steps_per_epoch)
        return {
            "step": self.step,
            "data": {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "dataset_size": len(self.dataset),
                "global_batch": self.plan.global_batch,
            },
            "parallel": self._parallel_mode(),
            "schedule": {"step": self.step, "total_steps": self.total_steps},
            "rng": rngs,
            "clipped_steps": self.clipped_steps,
            "reference_fingerprint": self.reference_fingerprint,
            "config": self.config.to_dict(),
        }

    def _parallel_mode(self) -> str:
        """How optimizer states are laid out in checkpoints: "fsdp" (by name) or "replicated"."""
        return "fsdp" if self.fsdp else "replicated"

    def _full_states(self) -> tuple[dict, dict]:
        """Whole model and optimizer states (gathered under FSDP: every rank calls this); with
        LoRA the adapters only (the frozen base is ``model.init``)."""
        if self.lora is not None:
            return lora.adapter_state(self.model), self.optimizer.state_dict()
        if self.fsdp:
            return (
                sharding.full_model_state(self.model),
                sharding.full_optimizer_state(self.model, self.optimizer),
            )
        return self.model.state_dict(), self.optimizer.state_dict()

    def _write_final_model(self) -> None:
        """final.safetensors (and final_ema, and the official layout when asked: LlamaGen's
        .pt, VAR's raw .pth), each saved by its model family; with LoRA the merged weights,
        and the adapters alone in final_lora.safetensors."""
        if self.lora is not None:
            weights = lora.merged_state(self.model)
        elif self.fsdp:
            weights = sharding.full_model_state(self.model)
        else:
            weights = self.model.state_dict()
        averaged = self.ema.state_dict()["shadow"] if self.ema is not None else None
        if not self.dist.is_main:
            return
        outputs = (
            {"final": weights} if averaged is None else {"final": weights, "final_ema": averaged}
        )
        for name, state in outputs.items():
            model = self._plain_copy(state)
            self.family.save(model, self.out / f"{name}.safetensors")
            if self.config.model.save_official:
                suffix = self.family.official_suffix
                self.family.save(model, self.out / f"{name}{suffix}", official=True)
        if self.lora is not None:
            lora.save_adapters(self.lora, self.out / "final_lora.safetensors")

    def _plain_copy(self, state: dict[str, Tensor]) -> nn.Module:
        """An unsharded CPU model holding ``state`` (cast to its float32 parameters; float64
        weights stay float64), for saving only.

        Built on the meta device and materialised empty: its non-persistent buffers (the rotary
        table) are not initialised, which no saved file contains.
        """
        with torch.device("meta"):
            model = self.model_class(self.model.config)
        model.to_empty(device="cpu")
        keep_float64(model, state).load_state_dict(state)
        return model

    def _write_run_config(self) -> None:
        if self.dist.is_main:
            text = json.dumps(self.config.to_dict(), indent=2)
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(text))

    def _truncate_metrics_log(self, step: int) -> None:
        """Drop log lines of steps after ``step`` (written after the checkpoint, before a kill),
        and a line the kill cut short."""
        if not self.metrics_log.exists():
            return
        kept = [
            line
            for line in self.metrics_log.read_text().splitlines()
            if _logged_step(line) is not None and _logged_step(line) <= step
        ]
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.metrics_log, lambda tmp: Path(tmp).write_text(text))

    def _progress_bar(self):
        if not (self.dist.is_main and self.config.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step")

    def close(self) -> None:
        """Leave the process group if the trainer joined it, after dropping the DDP wrapper:
        its reducer must not hold the group's last reference, or the group's destructor runs
        from the reducer's, with the GIL held, and can deadlock with a Gloo worker thread that
        needs the GIL to free a finished collective (seen once, at the end of a 2-process run)."""
        self.policy = self.model
        D.shutdown(self.dist)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations during backward instead of storing them.

    The block's ``forward`` is replaced on the instance (state_dict keys are unchanged); the
    recomputation replays the same dropout masks, so gradients equal the plain ones.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"activation checkpointing needs a model with a .layers ModuleList; "
            f"{type(model).__name__} has none: set train.activation_checkpointing = false"
        )
    for block in layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _auto_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for ``bf16`` (and ``auto`` on CUDA); None (plain float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short (or not a record)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) else None
