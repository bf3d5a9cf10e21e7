"""The training loop: FP training (the teacher) and quantization-aware training share it.

One step: ``loss = distill/CE(student(crops), targets) + lambda(t) * R_bin``, AdamW with warmup + cosine, gradient
clipping, bf16 autocast on CUDA. Runs in one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU).
Resumption is bit-exact: the data order and crops are functions of (seed, epoch, index), the global RNG is
re-seeded from (seed, rank, step) before every step, and the checkpoint holds model and optimizer state.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import EvalDataset, MultiCropDataset, SubsetImageDataset, multicrop_collate
from ..data.splits import train_val_datasets
from ..errors import ConfigError, VVTQError
from .checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from .config import TrainConfig


class TrainingError(VVTQError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# --------------------------------------------------------------------------- environment
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this rank's CUDA device if there is one, else the CPU; otherwise the device named
    (``ConfigError`` for a name torch does not know, or a CUDA device on a machine without one)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r}: {' '.join(str(exc).split())[:200]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is available here (use auto or cpu)")
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the ``torchrun`` process group if there is one; return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- models
def build_model(name: str, model_kwargs: dict[str, Any], pretrained: bool = False, drop_path: float = 0.0,
                ) -> nn.Module:
    """A timm model (the vvtq minis are registered on import)."""
    from .. import models  # noqa: F401

    kwargs = dict(model_kwargs)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise CheckpointError(f"unknown model {name!r}") from None
        raise
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):  # a mistyped model_kwargs key
            raise ConfigError(f"model {name!r}: {exc}") from None
        raise


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from (quantized if it was) and load its weights.

    Returns ``(model in eval mode, metadata)``. A checkpoint that does not fit its own recorded architecture or
    quantization config raises ``CheckpointError``.
    """
    from ..quant import QuantConfig, quantize_model

    meta = read_meta(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    model = build_model(meta["model"], meta["model_kwargs"])
    if meta.get("quant") is not None:
        quantize_model(model, QuantConfig.from_dict(meta["quant"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model it records: {exc}") from None
    return model.to(device).eval(), meta


class EnsembleTeacher(nn.Module):
    """The mean of several frozen teachers' class probabilities. Each teacher sees the crops resized to its own
    input size (bilinear), so a 28 px DeiT teacher can label 32 px Swin crops. Returns *probabilities*."""

    def __init__(self, teachers: list[nn.Module], img_sizes: list[int | None]):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.img_sizes = img_sizes

    def forward(self, x: Tensor) -> Tensor:
        probs = None
        for teacher, size in zip(self.teachers, self.img_sizes, strict=True):
            xi = x if size is None or x.shape[-1] == size else F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            p = teacher(xi).float().softmax(-1)
            probs = p if probs is None else probs + p
        return probs / len(self.teachers)


def load_teacher(spec: str | list[str], model_kwargs: dict[str, Any], device: torch.device) -> nn.Module:
    """A frozen FP teacher that returns class probabilities: a vvtq checkpoint path, ``timm:NAME`` for timm's
    pretrained weights, or a list of them (their probabilities averaged: an ensemble)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise CheckpointError("teacher.checkpoint is an empty list")
    teachers, sizes = [], []
    for one in specs:
        if one.startswith("timm:"):
            teachers.append(build_model(one[5:], model_kwargs, pretrained=True))
            sizes.append(None)
            continue
        teacher, meta = load_model(one, "cpu")
        if meta.get("quant") is not None:
            raise CheckpointError(f"teacher {one} is quantized; distillation needs a full-precision teacher")
        teachers.append(teacher)
        sizes.append(int(meta["img_size"]))
    return EnsembleTeacher(teachers, sizes).to(device).eval().requires_grad_(False)


def _checkpoint_kwargs(path: str | Path, model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` on top of the model options recorded in checkpoint ``path``, which must hold ``model``."""
    meta = read_meta(path)
    if meta.get("model") != model:
        raise CheckpointError(f"{path} holds model {meta.get('model')!r}, the recipe asks for {model!r}")
    return {**meta.get("model_kwargs", {}), **kwargs}


def _load_fp_weights(model: nn.Module, path: str) -> None:
    meta = read_meta(path)
    if meta.get("quant") is not None:
        raise CheckpointError(f"init_from {path} is a quantized checkpoint; QAT starts from an FP checkpoint")
    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"init_from {path} does not fit model {meta.get('model')!r}: {exc}") from None


# --------------------------------------------------------------------------- data
class ImageBatchSampler:
    """Batches of image indices: a seeded permutation per epoch, cut into global batches of ``images`` images,
    each split into ``world`` contiguous parts (rank r takes part r). All K crops of an image stay together, and
    the union of the ranks' parts is exactly the single-process batch."""

    def __init__(self, num_images: int, images: int, rank: int = 0, world: int = 1, seed: int = 0):
        if images % world:
            raise ConfigError(f"{images} images per batch cannot be split over {world} processes")
        self.n, self.images, self.rank, self.world, self.seed = num_images, images, rank, world, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n // self.images - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        part = self.images // self.world
        for b in range(self.start, self.n // self.images):
            chunk = perm[b * self.images:(b + 1) * self.images]
            yield chunk[self.rank * part:(self.rank + 1) * part].tolist()


def _datasets(cfg: TrainConfig):
    train, val = train_val_datasets(cfg.data, cfg.data_root, cfg.val_split, cfg.holdout)
    if cfg.train_subset:
        train = SubsetImageDataset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = SubsetImageDataset(val, range(min(cfg.val_subset, len(val))))
    return train, val


def eval_loader(base, img_size: int, batch_size: int = 500, rank: int = 0, world: int = 1) -> DataLoader:
    ds = EvalDataset(base, img_size)
    if world > 1:
        ds = torch.utils.data.Subset(ds, range(rank, len(ds), world))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (%) and mean CE loss, summed over ranks when distributed."""
    was = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x).float()
        stats += torch.tensor([(logits.argmax(1) == y).sum().item(),
                               F.cross_entropy(logits, y, reduction="sum").item(), y.numel()], dtype=torch.float64)
    if dist.is_initialized():
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    model.train(was)
    return {"acc": 100.0 * stats[0].item() / max(stats[2].item(), 1), "loss": stats[1].item() / max(stats[2].item(), 1)}


# --------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float, quant_lr_scale: float = 1.0,
                 weight_quant_lr_scale: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings, tokens, step sizes and offsets.

    The quantizers' step sizes and offsets form their own groups, whose lr is ``quant_lr_scale`` times the
    weights' (``lr_mult``); the weight quantizers' step sizes take ``weight_quant_lr_scale`` when it is given
    (0 keeps them at their MSE fit). Adam normalises every update, so LSQ's gradient scale does not slow a step
    size down: at the weights' lr a step size of 0.01 moves by several percent a step.
    """
    from ..quant.quantizers import Quantizer

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    owner = {id(p): m.is_weight for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    decay, no_decay, act_q, weight_q = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in owner:
            (weight_q if owner[id(p)] else act_q).append(p)
        elif p.ndim <= 1 or name in skip or name.split(".")[-1] in skip or "relative_position_bias_table" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    w_scale = quant_lr_scale if weight_quant_lr_scale is None else weight_quant_lr_scale
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    for params, mult in ((act_q, quant_lr_scale), (weight_q, w_scale)):
        if params:
            groups.append({"params": params, "weight_decay": 0.0, "lr_mult": mult})
    return groups


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))


# --------------------------------------------------------------------------- logging
class MetricsLog:
    """Metrics as JSONL (one record per logged step and per epoch), written by rank 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():  # drop what a killed run logged past its ckpt
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))
        elif enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the run
def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run one recipe; returns the final metrics. Writes ``out/last.safetensors``, ``out/best.safetensors``,
    ``out/metrics.jsonl`` and ``out/config.yaml``."""
    from ..distill import distill_loss
    from ..quant import calibrate, quantize_model

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device)
    out = Path(cfg.out)
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    train_set, val_set = _datasets(cfg)
    model_kwargs = {"num_classes": train_set.num_classes, "in_chans": train_set.in_chans, **cfg.model_kwargs}
    arch_from = last_path if resume and last_path.is_file() else cfg.init_from
    if arch_from:  # QAT keeps the FP checkpoint's architecture options (e.g. the pooling); the recipe's win
        model_kwargs = _checkpoint_kwargs(arch_from, cfg.model, model_kwargs)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_kwargs, cfg.pretrained, cfg.drop_path)
    qcfg = cfg.quant_config()
    ckpt = None
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path)
    elif cfg.init_from:
        _load_fp_weights(model, cfg.init_from)
    if qcfg is not None:
        quantize_model(model, qcfg)
    model.to(device)

    images_per_batch = cfg.batch_size // cfg.num_crops
    train_views = MultiCropDataset(train_set, cfg.num_crops, cfg.img_size, tuple(cfg.crop_scale), seed=cfg.seed)
    sampler = ImageBatchSampler(len(train_set), images_per_batch, rank, world, cfg.seed)
    # the teacher (or its soft-label file) is checked before any time is spent on calibration
    teacher, source = None, (cfg.teacher or {}).get("source", "none")
    hard_weight = float((cfg.teacher or {}).get("hard_weight", 0.0))
    if source == "live":
        teacher = load_teacher(cfg.teacher["checkpoint"], model_kwargs, device)
    elif source == "file":
        from ..data import ReplayCropDataset, replay_collate

        train_views = ReplayCropDataset(train_set, cfg.teacher["softlabels"], cfg.num_crops, cfg.img_size,
                                        seed=cfg.seed)
    collate = multicrop_collate if source != "file" else replay_collate
    steps_per_epoch = len(train_set) // images_per_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_set)} training images cannot fill one batch of {images_per_batch}")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    if ckpt is not None:
        try:
            model.load_state_dict({k: v.to(device) for k, v in ckpt["model"].items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{last_path} does not fit this recipe's model: {exc}") from None
    elif qcfg is not None:  # calibrate on the same leading batches on every rank (identical scales)
        calib_sampler = ImageBatchSampler(len(train_set), images_per_batch, 0, 1, cfg.seed + 1)
        calib = DataLoader(train_views, batch_sampler=calib_sampler, collate_fn=collate)
        calibrate(model, calib, num_batches=cfg.calib_batches, device=device)
        calib_digests = _check_replicas_agree(model)

    core = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    groups = param_groups(core, cfg.weight_decay, cfg.quant_lr_scale, cfg.weight_quant_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    start_step, best_acc, history = 0, -1.0, []
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:  # e.g. made with another grouping of the parameters (another version or recipe)
            raise CheckpointError(f"{last_path}: its optimizer state does not fit this recipe's parameter groups "
                                  f"({exc}); it cannot be resumed") from None
        start_step, best_acc = ckpt["meta"]["step"], ckpt["meta"]["best_acc"]
        history = ckpt["meta"]["history"]

    regularizer = tracker = None
    if qcfg is not None and cfg.regularizer:
        from ..regularize import ModelBinRegularizer

        regularizer = ModelBinRegularizer(core, total_steps, **cfg.regularizer)
    if qcfg is not None and cfg.oscillation is not None:
        from ..analysis.oscillation import OscillationTracker

        tracker = OscillationTracker(core, **cfg.oscillation)
        if ckpt is not None and "oscillation" in ckpt["meta"]:
            tracker.load_state_dict(_unpack_tracker(ckpt["meta"]["oscillation"], ckpt["extra"]))

    log = MetricsLog(out / "metrics.jsonl", rank == 0, start_step if ckpt is not None else None)
    if ckpt is None and qcfg is not None:
        log.write({"type": "calibration", "step": 0, "scale_digests": calib_digests})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    val_loader = eval_loader(val_set, cfg.img_size, rank=rank, world=world)
    meta_base = {"model": cfg.model, "model_kwargs": model_kwargs, "quant": qcfg.to_dict() if qcfg else None,
                 "train_config": cfg.to_dict(), "dataset": train_set.identity(), "img_size": cfg.img_size,
                 "mean": list(train_set.mean), "std": list(train_set.std), "classes": train_set.classes}

    def save(path: Path, step: int, epoch: float, full: bool, running: tuple[float, int] = (0.0, 0)) -> None:
        if rank != 0:
            return
        meta = {**meta_base, "step": step, "epoch": epoch, "best_acc": best_acc, "history": history,
                "epoch_loss": list(running)}
        extra = {}
        if tracker is not None and full:
            meta["oscillation"], extra = _pack_tracker(tracker.state_dict())
        save_checkpoint(path, core.state_dict(), meta, optimizer.state_dict() if full else None, extra=extra)

    step = start_step
    resumed_running = tuple(ckpt["meta"].get("epoch_loss", (0.0, 0))) if ckpt is not None else None
    t_start, last_acc = time.time(), (history[-1]["val_acc"] if history else float("nan"))
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    model.train()
    for epoch in range(step // steps_per_epoch, num_epochs):
        if step >= stop_at:
            break
        train_views.set_epoch(epoch)
        sampler.epoch, sampler.start = epoch, step - epoch * steps_per_epoch
        loader = DataLoader(train_views, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
        steps_this_epoch = min(steps_per_epoch, stop_at - epoch * steps_per_epoch) - sampler.start
        bar = _progress(cfg.progress and rank == 0, steps_this_epoch, f"epoch {epoch + 1}/{num_epochs}")
        loss_sum, n_loss, t_epoch = 0.0, 0, time.time()
        if resumed_running is not None and sampler.start:  # resumed mid-epoch: the epoch's running loss goes on
            loss_sum, n_loss = resumed_running
        resumed_running = None
        for batch in loader:
            if step >= stop_at:
                break
            torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)  # drop-path etc.: a function of step
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device)
            lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            with amp:
                logits = model(x)
                if source == "none":
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                else:
                    if source == "live":
                        with torch.no_grad():
                            target = teacher(x)
                    else:
                        target = batch[4].to(device)
                    loss = distill_loss(logits, target, y, hard_weight)
                if regularizer is not None:
                    loss = loss + regularizer(step)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch + 1}); stopping. "
                    f"The last good checkpoint is kept: {last_path if last_path.exists() else 'none was saved'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            if tracker is not None:
                tracker.step()
            step += 1
            loss_val = _global_mean(loss.detach())
            loss_sum, n_loss = loss_sum + loss_val, n_loss + 1
            ips = ((step - epoch * steps_per_epoch - sampler.start) * cfg.batch_size) / max(time.time() - t_epoch, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", acc=f"{last_acc:.2f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            if step % cfg.log_every == 0 or step == stop_at:
                rec = {"type": "step", "step": step, "epoch": epoch + 1, "loss": loss_val, "lr": lr,
                       "images_per_s": ips}
                if regularizer is not None:
                    rec.update(regularizer.metrics())
                if tracker is not None:
                    rec.update(tracker.metrics())
                log.write(rec)
            if cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0 and step % steps_per_epoch:
                save(last_path, step, step / steps_per_epoch, full=True, running=(loss_sum, n_loss))
        if bar is not None:
            bar.close()
        epoch_done = step % steps_per_epoch == 0 or step == total_steps
        if epoch_done and ((epoch + 1) % cfg.eval_every == 0 or step == total_steps):
            metrics = evaluate(model, val_loader, device)
            last_acc = metrics["acc"]
            rec = {"type": "epoch", "step": step, "epoch": epoch + 1, "train_loss": loss_sum / max(n_loss, 1),
                   "val_acc": metrics["acc"], "val_loss": metrics["loss"], "time_s": time.time() - t_start}
            history.append(rec)
            log.write(rec)
            if rank == 0 and cfg.progress:
                print(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}  val acc {metrics['acc']:.2f}%",
                      flush=True)
            if metrics["acc"] > best_acc:
                best_acc = metrics["acc"]
                save(best_path, step, epoch + 1, full=False)
        if epoch_done or step == stop_at:
            save(last_path, step, step / steps_per_epoch, full=True)
    final = {"step": step, "best_acc": best_acc, "final_acc": last_acc, "history": history,
             "wall_s": time.time() - t_start}
    return final


# --------------------------------------------------------------------------- helpers
def _check_replicas_agree(model: nn.Module) -> list[float]:
    """A digest of every quantizer scale and offset on each rank; raises if the replicas differ."""
    from ..quant import iter_quantizers

    digest = torch.zeros((), dtype=torch.float64)
    for i, q in enumerate(iter_quantizers(model)):
        for p in (q.scale, q.offset):
            if p is not None:
                digest += (p.detach().double().cpu() * (1 + (i % 97) / 97)).sum()
    if not dist.is_initialized():
        return [digest.item()]
    digest = digest.to(next(model.parameters()).device)  # nccl gathers device tensors
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    values = [g.item() for g in gathered]
    if any(v != values[0] for v in values):
        raise TrainingError(f"quantizer scales differ between ranks after calibration: {values}")
    return values


def _global_mean(value: Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def _pack_tracker(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    meta = {k: v for k, v in state.items() if k != "layers"}
    tensors = {f"osc.{layer}.{key}": t for layer, d in state["layers"].items() for key, t in d.items()}
    meta["layers"] = {layer: sorted(d) for layer, d in state["layers"].items()}
    return meta, tensors


def _unpack_tracker(meta: dict[str, Any], extra: dict[str, Tensor]) -> dict[str, Any]:
    layers = {layer: {key: extra[f"osc.{layer}.{key}"] for key in keys} for layer, keys in meta["layers"].items()}
    return {**{k: v for k, v in meta.items() if k != "layers"}, "layers": layers}
