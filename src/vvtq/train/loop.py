"""The training loop: FP training (the teacher) and quantization-aware training share it.

One step: ``loss = distill/CE(student(crops), targets) + lambda(t) * R_bin``, AdamW with warmup + cosine, gradient
clipping, bf16 autocast on CUDA. Runs in one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU).
Resumption is bit-exact: the data order and crops are functions of (seed, epoch, index), the global RNG is
re-seeded from (seed, rank, step) before every step, and the checkpoint holds model and optimizer state.

``train`` reads top to bottom; each step is a method of ``_Run``, which holds what the steps share.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..device import global_mean, init_distributed, resolve_device
from ..evaluation import eval_loader, evaluate
from ..modelio import build_model, checkpoint_kwargs, load_fp_weights
from ..progress import progress_bar
from ..qat import Lever, RunContext, StepOutputs
from ..spec import ModelSpec
from .batching import ImageBatchSampler, training_datasets
from .config import TrainConfig
from .metrics import MetricsLog
from .optim import lr_at, param_groups
from .state import TrainingError, check_replicas_agree

__all__ = ["ImageBatchSampler", "TrainingError", "eval_loader", "evaluate", "lr_at", "param_groups", "train"]


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run one recipe; returns the final metrics. Writes ``out/last.safetensors``, ``out/best.safetensors``,
    ``out/metrics.jsonl`` and ``out/config.yaml``."""
    run = _Run(cfg, resume)  # device, process group, output folder, datasets
    run.build_student()  # from scratch, from init_from, or the checkpoint being resumed; quantized for QAT
    run.build_targets()  # training views and the teacher (vvtq.qat.targets), checked before calibration
    run.plan_steps()
    run.restore_or_calibrate()
    run.build_optimizer()
    run.build_helpers()  # the QAT levers the recipe turns on (vvtq.qat), metrics log, validation loader
    for epoch in run.epochs():
        run.train_epoch(epoch)
        run.end_epoch(epoch)
    return run.result()


@dataclass(frozen=True)
class _Epoch:
    """One pass of the sampler: steps ``[start, end)``; ``index`` counts every epoch of the run, ``phase`` 1 is
    the recipe's crops per image, 2 the single-crop final phase."""

    index: int
    phase: int
    start: int
    end: int


@dataclass(frozen=True)
class _Plan:
    """How many steps: per epoch, in all, where warmup ends and where this invocation stops (``max_steps``), and
    the epochs, the last of the multi-crop phase cut where the single-crop phase (``single_from``) starts."""

    steps_per_epoch: int
    total_steps: int
    warmup: int
    stop_at: int
    single_from: int
    single_steps_per_epoch: int
    epochs: tuple[_Epoch, ...]

    @property
    def num_epochs(self) -> int:
        return len(self.epochs)

    def epoch_float(self, step: int) -> float:
        """Passes over the images at ``step``, each phase counted in its own epochs."""
        first = min(step, self.single_from) / self.steps_per_epoch
        return first + max(step - self.single_from, 0) / max(self.single_steps_per_epoch, 1)


class _Run:
    """One training run: the steps ``train`` calls, in order, and the state they share."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg, self.resume = cfg, resume
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = init_distributed(self.device)
        self.out = Path(cfg.out)
        self.last_path, self.best_path = self.out / "last.safetensors", self.out / "best.safetensors"
        if self.rank == 0:
            import yaml

            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.train_set, self.val_set = training_datasets(cfg)
        self.step, self.best_acc, self.history = 0, -1.0, []
        self.ckpt: dict[str, Any] | None = None
        self.calib_digests: list[float] | None = None
        self.levers: list[Lever] = []
        self.last_acc = float("nan")

    # ------------------------------------------------------------------ set-up
    def build_student(self) -> None:
        """The model: its architecture options come from the recipe on top of the checkpoint it starts from."""
        cfg, ts = self.cfg, self.train_set
        kwargs = {"num_classes": ts.num_classes, "in_chans": ts.in_chans, **cfg.model_kwargs}
        arch_from = self.last_path if self.resume and self.last_path.is_file() else cfg.init_from
        if arch_from:  # QAT keeps the FP checkpoint's architecture options (e.g. the pooling); the recipe's win
            kwargs = checkpoint_kwargs(arch_from, cfg.model, kwargs)
        self.qcfg = cfg.quant_config()
        self.spec = ModelSpec(cfg.model, kwargs, quant=self.qcfg.to_dict() if self.qcfg else None,
                              img_size=cfg.img_size, mean=list(ts.mean), std=list(ts.std), classes=ts.classes,
                              dataset=ts.identity())
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, kwargs, cfg.pretrained, cfg.drop_path)
        model.vvtq_spec = self.spec  # the input size and normalisation of this recipe's data
        if self.resume:
            if not self.last_path.is_file():
                raise CheckpointError(f"--resume: no checkpoint at {self.last_path}")
            self.ckpt = load_checkpoint(self.last_path)
        elif cfg.init_from:
            load_fp_weights(model, cfg.init_from)
        if self.qcfg is not None:
            from ..quant import quantize_model

            quantize_model(model, self.qcfg)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.core = self.model = model.to(self.device, memory_format=self.memory_format)

    def build_targets(self) -> None:
        """What the student learns from (``teacher``: hard labels, a live teacher, a soft-label file), its
        training views and their batch sampler."""
        cfg, ts = self.cfg, self.train_set
        self.images_per_batch = cfg.batch_size // cfg.num_crops
        self.targets = cfg.teacher.build(self._context(total_steps=0))
        self.views = self.targets.views(cfg.num_crops)
        self.sampler = ImageBatchSampler(len(ts), self.images_per_batch, self.rank, self.world, cfg.seed)

    def _context(self, total_steps: int) -> RunContext:
        return RunContext(self.core, total_steps, self.device, self.cfg, self.train_set, self.spec.model_kwargs)

    def plan_steps(self) -> None:
        """Steps per epoch, in all, and the epochs: the last ``single_crop_frac`` of the steps (with several crops
        an image) take one crop of each of ``batch_size`` images a step (the published recipe's final phase)."""
        cfg, n = self.cfg, len(self.train_set)
        per_epoch = n // self.images_per_batch
        if per_epoch == 0:
            raise TrainingError(f"{n} training images cannot fill one batch of {self.images_per_batch}")
        total = max(1, math.ceil(cfg.epochs * per_epoch))
        single_from, per_single = total, 0
        if cfg.single_crop_frac > 0:
            single_from, per_single = total - round(cfg.single_crop_frac * total), n // cfg.batch_size
            if per_single == 0:
                raise TrainingError(f"{n} training images cannot fill one single-crop batch of {cfg.batch_size}")
        epochs = [_Epoch(i, 1, a, min(a + per_epoch, single_from)) for i, a in enumerate(range(0, single_from,
                                                                                             per_epoch))]
        epochs += [_Epoch(len(epochs) + j, 2, a, min(a + per_single, total))
                   for j, a in enumerate(range(single_from, total, per_single or 1))]
        self.plan = _Plan(per_epoch, total, int(cfg.warmup_epochs * per_epoch),
                          total if cfg.max_steps is None else min(total, cfg.max_steps), single_from, per_single,
                          tuple(epochs))
        self.single = None
        if single_from < total:  # the final phase's views and sampler: one crop an image, batch_size images
            self.single = (self.targets.views(1),
                           ImageBatchSampler(n, cfg.batch_size, self.rank, self.world, cfg.seed))

    def restore_or_calibrate(self) -> None:
        """The resumed checkpoint's weights; or, for QAT, every scale calibrated on the same leading batches on
        every rank (identical scales, checked)."""
        if self.ckpt is not None:
            try:
                self.model.load_state_dict({k: v.to(self.device) for k, v in self.ckpt["model"].items()}, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{self.last_path} does not fit this recipe's model: {exc}") from None
        elif self.qcfg is not None:
            from ..quant import calibrate

            calib_sampler = ImageBatchSampler(len(self.train_set), self.images_per_batch, 0, 1, self.cfg.seed + 1)
            calib = DataLoader(self.views, batch_sampler=calib_sampler, collate_fn=self.targets.collate)
            calibrate(self.model, calib, num_batches=self.cfg.calib_batches, device=self.device)
            self.calib_digests = check_replicas_agree(self.model)

    def build_optimizer(self) -> None:
        """DDP (with several ranks) and AdamW (or Nesterov SGD); a resumed run takes its optimizer state, step and
        history."""
        cfg, device = self.cfg, self.device
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.core, device_ids=[device.index] if device.type == "cuda" else None)
        groups = param_groups(self.core, cfg.weight_decay, cfg.quant_lr_scale, cfg.weight_quant_lr_scale)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        if self.ckpt is None:
            return
        try:
            self.optimizer.load_state_dict(self.ckpt["optimizer"])
        except ValueError as exc:  # e.g. made with another grouping of the parameters (another version or recipe)
            raise CheckpointError(f"{self.last_path}: its optimizer state does not fit this recipe's parameter "
                                  f"groups ({exc}); it cannot be resumed") from None
        meta = self.ckpt["meta"]
        self.step, self.best_acc, self.history = meta["step"], meta["best_acc"], meta["history"]
        self.last_acc = self.history[-1]["val_acc"] if self.history else float("nan")

    def build_helpers(self) -> None:
        """The levers (the targets first, then each one the recipe turns on), their state when resumed, the
        metrics log and the validation loader."""
        ckpt = self.ckpt
        ctx = self._context(self.plan.total_steps)
        self.levers = [self.targets]
        for name, settings in self.cfg.lever_settings():
            lever = settings.build(ctx)
            lever.name = name  # its key in the checkpoint's metadata
            self.levers.append(lever)
        for lever in self.levers:
            if ckpt is not None and lever.name in ckpt["meta"]:
                lever.load_state_dict({"meta": ckpt["meta"][lever.name], "tensors": ckpt["extra"]})
        self.log = MetricsLog(self.out / "metrics.jsonl", self.rank == 0, self.step if ckpt is not None else None)
        if self.calib_digests is not None:
            self.log.write({"type": "calibration", "step": 0, "scale_digests": self.calib_digests})
        bf16 = self.cfg.amp == "bf16" or (self.cfg.amp == "auto" and self.device.type == "cuda")
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.val_loader = eval_loader(self.val_set, self.cfg.img_size, rank=self.rank, world=self.world)
        self.resumed_running = tuple(ckpt["meta"].get("epoch_loss", (0.0, 0))) if ckpt is not None else None
        self.t_start = time.time()  # the clock of time_s and wall_s starts with the first step

    # ------------------------------------------------------------------ the epochs
    def epochs(self):
        """The epochs left to train (from the resumed step on), until ``stop_at``."""
        for epoch in self.plan.epochs:
            if self.step >= self.plan.stop_at:
                return
            if epoch.end > self.step:
                yield epoch

    def train_epoch(self, epoch: _Epoch) -> None:
        """The steps of one epoch (the rest of it, when resumed mid-epoch), with logging and step checkpoints."""
        cfg, plan = self.cfg, self.plan
        views, sampler = (self.views, self.sampler) if epoch.phase == 1 else self.single
        views.set_epoch(epoch.index)
        sampler.epoch, sampler.start = epoch.index, self.step - epoch.start
        loader = DataLoader(views, batch_sampler=sampler, collate_fn=self.targets.collate,
                            num_workers=cfg.num_workers)
        todo = min(epoch.end, plan.stop_at) - self.step
        bar = progress_bar(cfg.progress and self.rank == 0, todo, f"epoch {epoch.index + 1}/{plan.num_epochs}",
                           every=cfg.log_every)
        self.loss_sum, self.n_loss, t_epoch = 0.0, 0, time.time()
        if self.resumed_running is not None and sampler.start:  # resumed mid-epoch: its running loss goes on
            self.loss_sum, self.n_loss = self.resumed_running
        self.resumed_running = None
        first = self.step
        for batch in loader:
            if self.step >= min(epoch.end, plan.stop_at):
                break
            loss, lr = self.train_step(batch, epoch.index)
            ips = (self.step - first) * cfg.batch_size / max(time.time() - t_epoch, 1e-9)
            if bar is not None:
                bar.update(1)
                acc = "-" if math.isnan(self.last_acc) else f"{self.last_acc:.2f}"  # "-": not validated yet
                bar.set_postfix(loss=f"{loss:.4f}", acc=acc, lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            if self.step % cfg.log_every == 0 or self.step == plan.stop_at:
                self.log_step(epoch.index, loss, lr, ips)
            if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0 and self.step != epoch.end:
                self.save(self.last_path, plan.epoch_float(self.step), full=True,
                          running=(self.loss_sum, self.n_loss))
        if bar is not None:
            bar.close()

    def train_step(self, batch: tuple[Tensor, ...], epoch: int) -> tuple[float, float]:
        """One optimizer step; returns (the loss averaged over ranks, the lr)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1_000_003 + self.rank * 7_919 + self.step)  # drop-path etc.: a function of step
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
        x = x.contiguous(memory_format=self.memory_format)
        lr = lr_at(self.step, self.plan.total_steps, self.plan.warmup, cfg.lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        with self.amp:
            out = StepOutputs(self.model(x), x, y, batch)
            terms = [term for lever in self.levers if (term := lever.loss(self.step, out)) is not None]
            loss = terms[0]  # the targets' task loss, then each lever's term in turn
            for term in terms[1:]:
                loss = loss + term
        if not torch.isfinite(loss):
            kept = self.last_path if self.last_path.exists() else "none was saved"
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step} (epoch {epoch + 1}); "
                                f"stopping. The last good checkpoint is kept: {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for lever in self.levers:  # annealing holds its weights here (before clipping: they count for nothing)
            lever.after_backward(self.step)
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        for lever in self.levers:
            lever.after_step(self.step)
        self.step += 1
        value = global_mean(loss.detach())
        self.loss_sum, self.n_loss = self.loss_sum + value, self.n_loss + 1
        return value, lr

    def log_step(self, epoch: int, loss: float, lr: float, ips: float) -> None:
        rec = {"type": "step", "step": self.step, "epoch": epoch + 1, "loss": loss, "lr": lr, "images_per_s": ips}
        for lever in self.levers:
            rec.update(lever.metrics())
        self.log.write(rec)

    def end_epoch(self, epoch: _Epoch) -> None:
        """At the end of an epoch: validation (every ``eval_every`` epochs and at the end), ``best`` and ``last``."""
        step, plan = self.step, self.plan
        epoch_done = step == epoch.end
        if epoch_done and ((epoch.index + 1) % self.cfg.eval_every == 0 or step == plan.total_steps):
            self.validate(epoch.index)
        if epoch_done or step == plan.stop_at:
            self.save(self.last_path, plan.epoch_float(step), full=True)

    def validate(self, epoch: int) -> None:
        metrics = evaluate(self.model, self.val_loader, self.device)
        self.last_acc = metrics["acc"]
        train_loss = self.loss_sum / max(self.n_loss, 1)
        rec = {"type": "epoch", "step": self.step, "epoch": epoch + 1, "train_loss": train_loss,
               "val_acc": metrics["acc"], "val_loss": metrics["loss"], "time_s": time.time() - self.t_start}
        self.history.append(rec)
        self.log.write(rec)
        if self.rank == 0 and self.cfg.progress:
            print(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}  val acc {metrics['acc']:.2f}%", flush=True)
        if metrics["acc"] > self.best_acc:
            self.best_acc = metrics["acc"]
            self.save(self.best_path, epoch + 1, full=False)

    # ------------------------------------------------------------------ checkpoints and the result
    def save(self, path: Path, epoch: float, full: bool, running: tuple[float, int] = (0.0, 0)) -> None:
        """Rank 0 writes the checkpoint: the model with its spec; ``full`` adds the optimizer and the levers'
        state (the oscillation tracker's)."""
        if self.rank != 0:
            return
        meta = {**self.spec.to_dict(), "train_config": self.cfg.to_dict(), "step": self.step, "epoch": epoch,
                "best_acc": self.best_acc, "history": self.history, "epoch_loss": list(running)}
        extra: dict[str, Tensor] = {}
        for lever in self.levers if full else ():
            if state := lever.state_dict():
                meta[lever.name] = state["meta"]
                extra.update(state["tensors"])
        save_checkpoint(path, self.core.state_dict(), meta, self.optimizer.state_dict() if full else None,
                        extra=extra)

    def result(self) -> dict[str, Any]:
        return {"step": self.step, "best_acc": self.best_acc, "final_acc": self.last_acc, "history": self.history,
                "wall_s": time.time() - self.t_start}
