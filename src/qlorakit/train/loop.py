"""`qlorakit train`: one explicit loop, top to bottom.

    validate config, data and output directory        (nothing is written before this passes)
    load the base (quantized), add adapters, build the optimizer
    [resume: restore adapter, optimizer, RNG and data position from the last checkpoint]
    for step in start+1 .. total:
        lr <- schedule(step)
        for each of grad_accum micro-batches: loss = Σ token losses / tokens in the whole step; backward
        clip gradients; stop (or skip) on a non-finite loss or gradient; optimizer step
        log / validate / checkpoint
    save adapter (peft format), loss.png

`merge.after_train` is carried out by the caller (qlorakit.pipeline), since train and merge are
siblings that do not import each other.

Losses are normalised by the number of trained tokens in the whole accumulated step, so
grad_accum=k with batch b gives the same update as one batch of k·b rows.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlorakit import metadata
from qlorakit.adapters.inject import add_adapters, find_targets, trainable_parameters, without_foldless_bases
from qlorakit.adapters.peft_format import adapter_state_dict, save_adapter
from qlorakit.data.chat_formats import CHAT_FORMATS
from qlorakit.config import Config, save_config
from qlorakit.data.collate import collate_packed, collate_padded, length_grouped_batches, pad_token_id
from qlorakit.data.dataset import build_datasets
from qlorakit.dtypes import matmul_is_native
from qlorakit.models.load import load_model, load_tokenizer
from qlorakit.models.sources import resolve_source
from qlorakit.quant.linear import cached_dense_weights
from qlorakit.train import checkpoint as ckpt
from qlorakit.train import fsdp
from qlorakit.train.distributed import World, distributed_mode, init_world, shutdown
from qlorakit.train.fast_paths import model_fast_paths, process_fast_paths
from qlorakit.train.loss import causal_lm_loss
from qlorakit.train.metrics import MetricsLog, plot_loss, read_metrics, sparkline
from qlorakit.train.optim import build_optimizer
from qlorakit.train.rundir import claim_output_dir, create_output_dir
from qlorakit.train.schedule import lr_at


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None
    seconds: float
    resumed_from: str | None
    model: object = None  # None after an fsdp run (its ranks held shards): restore it from run_dir
    tokenizer: object = None
    source: object = None  # the resolved model source (models.sources.ModelSource)
    spec: dict | None = None  # quantization.json of the run
    is_main: bool = True  # rank 0 (or the only process): the one that writes the run directory


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchStream:
    """Deterministic batches over epochs; the position (epoch, index) is what a checkpoint stores.

    Unpacked rows are length-grouped (seeded per epoch); packed sequences are shuffled.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, packed: bool, pad_id: int, world: World = World()):
        self.examples, self.seed, self.packed, self.pad_id, self.world = examples, seed, packed, pad_id, world
        self.local_batch_size = batch_size
        self.batch_size = batch_size * world.size  # global batch: every rank's slice together
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)
        self.last_tokens = 0  # real (non-padding) tokens of the last batch this rank read

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.packed:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        lengths = [len(e["input_ids"]) for e in self.examples]
        return length_grouped_batches(lengths, self.batch_size, seed=self.seed + epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._batches = self._epoch_batches(epoch)

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._batches):
            self.seek(self.epoch + 1, 0)
        indices = self._batches[self.index]
        self.index += 1
        if self.world.size > 1:  # a short global batch is filled by repeating, as DistributedSampler does
            indices = (indices * self.batch_size)[: self.batch_size]
            start = self.world.rank * self.local_batch_size
            indices = indices[start : start + self.local_batch_size]  # this rank's slice
        rows = [self.examples[i] for i in indices]
        self.last_tokens = sum(len(row["input_ids"]) for row in rows)  # a packed row: its examples only
        collate = collate_packed if self.packed else collate_padded
        return collate(rows, pad_token_id=self.pad_id)


def _trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens whose next-token loss counts: labels are shifted by one inside the model."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _forward_loss(model, batch: dict[str, torch.Tensor], num_items: int, device) -> torch.Tensor:
    """Σ token cross-entropy / num_items (transformers' num_items_in_batch normalisation)."""
    return causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}, num_items)


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, packed: bool, pad_id: int, device) -> float:
    """Token-weighted mean validation loss."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    collate = collate_packed if packed else collate_padded
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id=pad_id)
        n = _trained_tokens(batch)
        if n:
            total += float(_forward_loss(model, batch, n, device)) * n
            count += n
    model.train(was_training)
    return total / count if count else float("nan")


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * batches_per_epoch / cfg.train.grad_accum))


def train(cfg: Config, *, overwrite: bool = False, progress: bool = True, device: str | None = None,
          keep_dense_weights: bool = False) -> TrainResult:
    """Train `cfg` (module docstring). `keep_dense_weights` keeps every quantized layer's dense
    weight for the whole run (`cached_dense_weights`: one dequantization per layer instead of two
    per step, at the cost of a dense copy of the base; same numbers, since the base is frozen);
    `qlorakit demo` uses it, where the model is small and each step short.

    The fast paths `train.fast_paths` names (train/fast_paths.py) apply for the run and are undone
    before this returns: the returned model has transformers' own modules and attention."""
    with contextlib.ExitStack() as run_scope:  # the run directory's lock and the fast paths, left on return
        return _train(cfg, run_scope, overwrite=overwrite, progress=progress, device=device,
                      keep_dense_weights=keep_dense_weights)


def _train(cfg: Config, run_scope: contextlib.ExitStack, *, overwrite: bool, progress: bool, device: str | None,
           keep_dense_weights: bool) -> TrainResult:
    started = time.perf_counter()
    t = cfg.train
    run_dir = Path(t.output_dir)
    # The allocator settings first: glibc's mallopt is set before the process group starts gloo's threads.
    fast = run_scope.enter_context(process_fast_paths(t.fast_paths, dtype=cfg.model.dtype, gradient_checkpointing=t.gradient_checkpointing))
    world = init_world()
    device = device or (f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    progress = progress and world.is_main
    if world.is_main and not matmul_is_native(cfg.model.dtype, device):
        _log(f"warning: model.dtype {cfg.model.dtype}: this CPU has no {cfg.model.dtype} matmul instructions and torch "
             f"emulates them, many times slower than fp32; model.dtype=fp32 trains faster here")
    mode, chosen_by = distributed_mode(t.distributed)
    sharded = world.size > 1 and mode == "fsdp"
    if world.size > 1 and world.is_main:
        _log(f"world size: {world.size}")
        if chosen_by:
            _log(chosen_by)
        _log(f"FSDP shards the model across {world.size} ranks (train.distributed: fsdp)" if sharded
             else "data parallel: every rank holds the whole model (train.distributed: ddp)")
    if sharded and keep_dense_weights:
        raise ValueError("train.distributed: fsdp shards the 4-bit base; keeping every layer's dense weight "
                         "(keep_dense_weights) would gather it whole on every rank")

    # 1. Validate everything before writing anything.
    # Rank 0 writes the run directory: it holds its lock (files/lock.py) until train() returns or raises.
    run_scope.enter_context(claim_output_dir(run_dir, overwrite=overwrite, resume=t.resume, lock=world.is_main,
                                              inputs={"data.path": cfg.data.path, "model.name": cfg.model.name}))
    source = resolve_source(cfg.model.name, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(source)
    d = cfg.data
    train_rows, val_rows, report = build_datasets(
        d.path, tokenizer, format=d.format, template=d.template, train_on_prompt=d.train_on_prompt,
        max_length=d.max_length, packing=d.packing, val_fraction=d.val_fraction, limit=d.limit, shuffle_seed=d.shuffle_seed,
    )
    if world.is_main:
        _log(f"data: {report.summary()}")
        for line in report.warnings(d.max_length):
            _log(f"warning: {line}")

    # 2. The model: quantized base, frozen, with adapters in fp32.
    torch.manual_seed(t.seed)
    # fsdp with nf4/fp4/int4: the first rank of each node loads first, writing the quantized cache
    # that the node's other ranks then map; every rank passes the one barrier, before or after loading.
    first_on_node = world.local_rank == 0
    serialize = sharded and cfg.quant.method not in ("gguf", "none")
    if serialize and not first_on_node:
        world.barrier()
    try:
        loaded = load_model(
            source, dtype=cfg.model.dtype, quant=cfg.quant.method, group_size=cfg.quant.group_size,
            double_quant=cfg.quant.double_quant, quantize_lm_head=cfg.quant.quantize_lm_head,
            device="cpu" if sharded else device, progress=progress,  # fsdp: each rank moves only its shards to `device`
            map_quantized=sharded,  # fsdp: a rank copies only its shards out of the file it maps (train/fsdp.py)
        )
    finally:
        if serialize and first_on_node:
            world.barrier()  # also when loading failed: the waiting ranks go on (and fail) instead of hanging
    model = loaded.model
    torch.manual_seed(t.seed)
    targets = cfg.adapter.targets
    if cfg.adapter.kind == "qalora" and cfg.quant.method == "gguf":
        targets, left_out = without_foldless_bases(model, find_targets(model, targets))
        if not targets:
            raise ValueError(f"adapter.targets: every target layer of {cfg.model.name} is in a format without a min "
                             f"({', '.join(sorted(set(left_out.values())))}) that QA-LoRA can fold into; use adapter.kind: lora")
        if left_out and world.is_main:
            counts = ", ".join(f"{n} {f}" for f, n in sorted(Counter(left_out.values()).items()))
            _log(f"QA-LoRA: {len(left_out)} target layers left out, their formats have no min to fold an update into "
                 f"({counts}; e.g. {next(iter(left_out))}); the merge keeps them byte for byte")
    add_adapters(
        model, targets, r=cfg.adapter.r, alpha=cfg.adapter.alpha, dropout=cfg.adapter.dropout,
        use_rslora=cfg.adapter.use_rslora, kind=cfg.adapter.kind,
        group_size=cfg.adapter_group_size if cfg.adapter.kind == "qalora" else None,
    )
    run_scope.enter_context(model_fast_paths(model, t.fast_paths, fast, dtype=cfg.model.dtype, device=device))
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        units = fsdp.shard_model(model, world.size, device)
        if world.is_main:
            _log(f"FSDP: {units} units ({units - 1} decoder layers and the root); their 4-bit storage, adapters, gradients "
                 f"and optimizer state split {world.size} ways, the frozen embeddings, final norm and head whole on every rank")
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay)
    pad_id = pad_token_id(tokenizer)
    stream = BatchStream(train_rows, t.batch_size, t.seed, d.packing, pad_id, world)
    steps = total_steps(cfg, stream.batches_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]

    # 3. The run directory, now that everything is known to work.
    if world.is_main:
        create_output_dir(run_dir, overwrite=overwrite, resume=t.resume)
    world.barrier()
    dataset_name = Path(d.path).stem if Path(d.path).suffix else d.path.rsplit("/", 1)[-1]
    spec = metadata.build_spec(cfg, source.name, dataset_name, source.location)
    start_step, resumed_from = 0, None
    if t.resume:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            start_step, adapter_state, optimizer_state, position = ckpt.load_checkpoint(latest)
            _check_topology(latest, optimizer_state, sharded)
            if sharded:
                fsdp.load_full_adapter_state(model, adapter_state)
                fsdp.load_full_optimizer_state(model, optimizer, optimizer_state)
            else:
                _load_adapter_state(model, adapter_state)
                optimizer.load_state_dict(optimizer_state)
            stream.seek(position["epoch"], position["index"])
            resumed_from = str(latest)
            _log(f"resumed from {latest}")
    if world.is_main:
        save_config(cfg, run_dir / "config.yaml")
        metadata.write_spec(run_dir, spec)
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if t.tensorboard else None) if world.is_main else None
    if world.is_main:
        _log(
            f"training {spec['tag']}: {trainable_parameters(model):,} trainable parameters, {steps} steps "
            f"({t.schedule} schedule, warmup {t.warmup_ratio:g}), effective batch {t.batch_size} x {t.grad_accum} x "
            f"{world.size} = {t.batch_size * t.grad_accum * world.size}, device {device}"
        )
        _log(fast.summary())

    # 4. The loop.
    model.train()
    first_loss = last_loss = val_loss = None
    dense_weights = cached_dense_weights(model) if keep_dense_weights else contextlib.nullcontext()
    with dense_weights:
        bar = tqdm(total=steps, initial=start_step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
        for step in range(start_step + 1, steps + 1):
            step_start = time.perf_counter()
            lr = lr_at(step, lr=t.lr, total_steps=steps, schedule=t.schedule, warmup_ratio=t.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, tokens = [], 0
            for _ in range(t.grad_accum):
                micro_batches.append(stream.next())
                tokens += stream.last_tokens
            num_items = max(1, world.sum_int(sum(_trained_tokens(b) for b in micro_batches), device))
            step_loss = 0.0
            for batch in micro_batches:
                loss = _forward_loss(model, batch, num_items, device)
                loss.backward()
                step_loss += float(loss.detach())
            if not sharded:  # FSDP has reduce-scattered them already
                world.sum_gradients(params)
            if world.size > 1:
                step_loss = _sum_float(step_loss, world, device)
            grad_norm = fsdp.sharded_gradient_norm(params, t.max_grad_norm) if sharded else _clip(params, t.max_grad_norm)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if not t.skip_nonfinite:
                    bar.close()
                    raise NonFiniteLossError(
                        f"step {step}: loss {step_loss} / gradient norm {grad_norm} is not finite; the last good checkpoint "
                        f"is kept in {run_dir / 'checkpoints'} (set train.skip_nonfinite=true to skip such batches)"
                    )
                if log is not None:
                    log.write({"step": step, "skipped": True, "loss": None, "lr": lr})
                bar.update(1)
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - step_start
            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            if log is not None and (step % t.log_every == 0 or step == steps):
                log.write({"step": step, "loss": step_loss, "lr": lr, "tokens_per_s": tokens / seconds, "tokens": tokens,
                           "step_seconds": seconds, "grad_norm": grad_norm,
                           "epoch": stream.epoch + stream.index / max(1, stream.batches_per_epoch)})
            if (log is not None or sharded) and val_rows and t.eval_every and step % t.eval_every == 0 and step != steps:
                loss_now = evaluate_loss(model, val_rows, t.batch_size, d.packing, pad_id, device)  # fsdp: every rank runs it
                if log is not None:
                    log.write({"step": step, "val_loss": loss_now})
            if t.save_every and step % t.save_every == 0 and step != steps:
                _save_checkpoint(run_dir, step, model, optimizer, stream, world, sharded)
        bar.close()

    # 5. Results (rank 0): final checkpoint, adapter, validation loss, loss curve.
    if steps > start_step:
        _save_checkpoint(run_dir, steps, model, optimizer, stream, world, sharded)
    if val_rows and (world.is_main or sharded):
        val_loss = evaluate_loss(model, val_rows, t.batch_size, d.packing, pad_id, device)
    final_adapter = fsdp.full_adapter_state(model) if sharded else None
    if world.is_main:
        if val_rows:
            log.write({"step": steps, "val_loss": val_loss})
        log.close()
        given_template = tokenizer.chat_template if report.template in CHAT_FORMATS else None
        save_adapter(model, run_dir / "adapter", source.location, cfg.adapter.dropout, chat_template=given_template,
                     state=final_adapter)
        records = read_metrics(run_dir / "metrics.jsonl")
        plot_loss(records, run_dir / "loss.png", spec["tag"])
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        if losses:
            _log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}  {sparkline(losses)}")
    world.barrier()
    shutdown(world)
    model.eval()
    kept = None if sharded else model  # a rank's shards are no model to merge or generate with: the run directory is
    return TrainResult(run_dir, steps, first_loss, last_loss, val_loss, time.perf_counter() - started, resumed_from, kept,
                       tokenizer, source, spec, world.is_main)


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, stream: BatchStream, world: World, sharded: bool) -> None:
    """Rank 0 writes the checkpoint; under fsdp every rank first takes part in gathering its tensors."""
    if sharded:
        adapter, optimizer_state = fsdp.full_adapter_state(model), fsdp.full_optimizer_state(model, optimizer)
    elif world.is_main:
        adapter, optimizer_state = adapter_state_dict(model), optimizer.state_dict()
    if world.is_main:
        ckpt.save_checkpoint(run_dir, step, adapter, optimizer_state, stream.position())


def _check_topology(checkpoint: Path, optimizer_state: dict, sharded: bool) -> None:
    """A checkpoint resumes under the train.distributed that wrote it: fsdp keys the optimizer
    state by parameter name, one process and ddp by parameter index."""
    keys = list(optimizer_state.get("state", {}))
    by_name = bool(keys) and isinstance(keys[0], str)
    if keys and by_name != sharded:
        wrote, now = ("fsdp", "ddp or one process") if by_name else ("ddp or one process", "fsdp")
        raise ValueError(f"{checkpoint}: written by a train.distributed {wrote} run, resumed as {now}; "
                         f"resume with the train.distributed and number of ranks that wrote it")


def _sum_float(value: float, world: World, device) -> float:
    """Σ over ranks of a per-rank float (the step loss: each rank's share of the global mean)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global gradient norm before clipping (clipping only when max_norm is set)."""
    if max_norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            named[key.removeprefix("base_model.model.")].copy_(tensor)

