"""Training loop: AdamW, linear warm-up then cosine decay, gradient clipping, loss-spike
skipping, EMA weights, bfloat16 autocast on GPU, gradient accumulation, DistributedDataParallel
under ``torchrun``, periodic validation, ``steps`` and ``max_minutes`` bounds, and atomic,
resumable checkpoints (run folders: :mod:`locdiff.run`, :mod:`locdiff.runfolder`).

Batches come from :class:`locdiff.data.sampler.BatchSampler` (epochs of shuffled rows; the
global batch ``k`` is the same whatever the number of processes) through
:func:`locdiff.data.dataset.make_loader`. The global batch is cut into ``W x accumulate``
pieces; piece ``c`` of step ``s`` draws its noise, timesteps and dropout from a generator
seeded by ``(seed, s, c)``. So a resumed run sees the same data as an uninterrupted one, and
runs with the same ``W x accumulate`` (2 processes, or 1 process accumulating 2 pieces) make
the same steps up to floating-point summation order (docs/training.md). Rank 0 alone writes
(checkpoints, logs, config), validates and calibrates.

>>> result = train(emb, coords, "runs/demo", RunConfig(train=TrainConfig(steps=2000)))  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from collections import deque
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from locdiff import distributed
from locdiff.calibration import CALIBRATED, HYBRID_GALLERY_ROWS, calibrate, uncalibrated, unconditional_nll
from locdiff.data.files import DataError, atomic_write_bytes, constant_embeddings, gather_rows
from locdiff.devices import resolve_device
from locdiff.diffusion import EMA, diffusion_loss
from locdiff.diffusion.losses import kl_temperature
from locdiff.models import CSUNet
from locdiff.optim import adamw, lr_factor
from locdiff.resume import DATA_KEY, data_fingerprint, prepare_folder
from locdiff.run import (CHECKPOINT_FILE, CONFIG_FILE, FINISHED_KEY, TOML_FILE, TOML_VERSION, PredictConfig, RunConfig,
                         TrainConfig, checkpoint_bytes, parse_checkpoint, read_config, restore, write_config)

__all__ = ["PredictConfig", "RunConfig", "TrainConfig", "TrainResult", "calibrate", "lr_factor", "train"]

# Consecutive steps with a NaN or infinite loss after which a run counts as diverged.
MAX_NONFINITE_STEPS = 20
# Validation sets from this many rows on get a line before each validation.
VALIDATION_NOTE_ROWS = 50_000


@dataclass
class TrainResult:
    steps: int
    elapsed_s: float
    samples_per_s: float
    history: list = field(default_factory=list)
    skipped_steps: int = 0
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), else None
    best: dict | None = None   # {"step", "median_km"} of the best validation
    time_up: bool = False      # train.max_minutes ended it before train.steps
    nothing_to_do: str | None = None  # why a resumed run had no step left to train (nothing was written)


class Diverged(DataError):
    """The weights became NaN or infinite; the last checkpoint on disk was not replaced."""


def piece_seed(seed: int, step: int, piece: int) -> int:
    """The seed of piece ``piece`` of the global batch of step ``step``."""
    return int(np.random.SeedSequence([seed, step, piece]).generate_state(1, np.uint64)[0])


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that shows its module's ``config`` (the loss reads the network's settings)."""

    @property
    def config(self):
        return self.module.config


def _unused_parameters(net, dc, schedule, dev) -> list[str]:
    """Parameters the loss leaves without a gradient with these settings (a density head
    without SHDD-KL, the null embedding without condition dropout): DDP must be told."""
    from locdiff import shdd

    x0 = shdd.encode(torch.zeros(2, 2, dtype=torch.float64), net.config.degree).float().to(dev)
    emb = torch.zeros(2, net.config.emb_dim, device=dev)
    gen = torch.Generator().manual_seed(0) if dev.type == "cpu" else None
    loss, _ = diffusion_loss(net, x0, emb, schedule, dc, generator=gen)
    loss.backward()
    names = [n for n, p in net.named_parameters() if p.grad is None]
    net.zero_grad(set_to_none=True)
    return names


def _check_density_head(config: RunConfig) -> None:
    """A new run's density head needs the SHDD-KL, the only loss that trains it (an earlier
    locdiff's run so made resumes: its denoiser trains on, its head stays unused)."""
    from locdiff.ranges import SettingError

    if config.model.density_head and config.diffusion.kl_weight == 0:
        raise SettingError("diffusion.kl_weight", config.diffusion.kl_weight, "> 0 when model.density_head is "
                           "true (the head learns from the SHDD-KL alone; without it the head stays at zero)")


def _split_rows(n: int, tc: TrainConfig, val) -> tuple[np.ndarray, np.ndarray | None]:
    """(training rows, held-out rows or None): ``val_size`` random rows are held out when no
    validation data is given and the data has more than 4 x ``val_size`` rows."""
    if val is None and tc.val_size > 0 and n > 4 * tc.val_size:
        val_idx = np.sort(np.random.default_rng(tc.seed).choice(n, tc.val_size, replace=False))
        return np.setdiff1d(np.arange(n), val_idx), val_idx
    return np.arange(n), None


def _check_rows(embeddings, coords, which: str) -> None:
    """Finite embeddings the network can read and (lat, lon) coordinates in range, or a
    DataError naming the first bad row; embeddings are read in chunks (memmaps, shards)."""
    from locdiff.data.files import scan_embeddings
    from locdiff.metrics import check_latlon

    try:
        check_latlon(coords, f"{which}coords")
    except ValueError as e:
        raise DataError(str(e)) from None
    bad = scan_embeddings(embeddings)
    if bad:
        raise DataError(f"{which}embeddings row {bad[0]} {bad[1]}")


def _inputs_of(embeddings, coords, val, config: RunConfig) -> tuple:
    """``(embeddings, val)`` to train on: without embeddings (None) the constant rows of an
    unconditional model, whose config says so; a DataError where the two disagree."""
    if embeddings is not None:
        if not config.model.conditional:
            raise DataError("embeddings were given, but model.conditional = False trains a model without them: "
                            "pass embeddings=None, or set model.conditional = True")
        if val is not None and isinstance(val, (tuple, list)) and len(val) == 2 and val[0] is None:
            raise DataError("val: embeddings None, but the training rows have embeddings; give both or neither")
        return embeddings, val
    config.model.conditional = False
    rows = np.shape(coords)[0] if np.ndim(coords) else 0
    if rows == 0:
        raise DataError("coordinates: no rows to train on")
    if val is not None and isinstance(val, (tuple, list)) and len(val) == 2:
        if val[0] is not None:
            raise DataError("val: embeddings given, but the training rows have none (an unconditional model); "
                            "give val as (None, coords)")
        if not (np.shape(val[1])[0] if np.ndim(val[1]) else 0):
            raise DataError("val: no coordinates to validate on")
        val = (constant_embeddings(np.shape(val[1])[0]), val[1])
    return constant_embeddings(rows), val


def train(embeddings, coords, run_dir, config: RunConfig | None = None, *, resume: bool = False,
          device: str | None = None, val: tuple | None = None, progress: bool = True,
          extra_config: dict | None = None, log=None, check_data: bool = True) -> TrainResult:
    """Train a CS-UNet on ``embeddings`` (N, D) (array, memmap or shards) and ``coords`` (N, 2).
    ``embeddings=None``: an unconditional model of where the ``coords`` lie
    (``model.conditional = False``; validation then tracks the density's NLL).

    ``val``: optional ``(embeddings, coords)`` for validation; by default ``val_size`` random
    rows are held out of the training data. Validation reports the median error and the
    accuracy within 750 km of the run's predictions with the EMA weights; at the end
    :func:`calibrate` sets the density temperature and coarse degree of the run's
    prediction settings. Under ``torchrun`` (a process group, :func:`locdiff.distributed.init`)
    each process trains on its part of each global batch. Returns a :class:`TrainResult`
    (``signal`` set when SIGINT or SIGTERM stopped it after a checkpoint); the run folder
    holds the config, the checkpoints and ``metrics.jsonl``. ``resume`` without ``config``
    continues with the run's own settings. ``check_data``: before anything is written, every
    embedding is checked finite and every coordinate a (lat, lon) in range, a DataError naming
    the first bad row otherwise (one pass over the embeddings; the CLI has checked its files).
    """
    from locdiff.runfolder import RunLock, check_run_folder, clean_stale_temp, ensure_space
    from locdiff.settings import validate
    from locdiff.trainlog import require_tensorboard

    run_dir = Path(run_dir)
    if config is None and resume and (run_dir / CONFIG_FILE).is_file():
        config = read_config(run_dir)[0]  # resuming as the run was set up
    config = copy.deepcopy(config or RunConfig())
    world, main = distributed.world_size(), distributed.is_main()
    dev = resolve_device(device)
    if distributed.is_distributed() and dev.type == "cuda":
        dev = distributed.device()
    embeddings, val = _inputs_of(embeddings, coords, val, config)
    if not hasattr(embeddings, "shape"):  # a list of rows
        embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings.shape) != 2:
        raise DataError(f"embeddings must have shape (N, D), got {tuple(embeddings.shape)}")
    n, d = embeddings.shape
    if n == 0:
        raise DataError("embeddings: no rows to train on")
    coords = np.asarray(coords, np.float64)
    if len(coords) != n:
        raise DataError(f"coordinates: {len(coords)} rows but the embeddings have {n}")
    if val is not None:  # before training, not at its first validation
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise DataError(f"val: expected a pair (embeddings, coordinates), got {type(val).__name__}")
        v_emb, v_coords = val
        if np.ndim(v_emb) != 2 or np.shape(v_emb)[1] != d or np.shape(v_coords) != (len(v_emb), 2):
            raise DataError(f"val: embeddings (M, {d}) and coordinates (M, 2) expected, got {np.shape(v_emb)} and "
                            f"{np.shape(v_coords)}")
    from locdiff.data.dataset import check_rows_readable

    check_rows_readable(embeddings)  # before the run folder is touched
    if check_data:
        _check_rows(embeddings, coords, "")
        if val is not None:
            _check_rows(val[0], val[1], "val ")
    config.model.emb_dim = d
    config.model.timesteps = config.diffusion.timesteps
    tc = config.train
    pieces = world * tc.accumulate
    if tc.batch_size % pieces:
        raise DataError(f"batch size {tc.batch_size} is not a multiple of the world size {world} (processes over all "
                        f"nodes) x accumulation {tc.accumulate} = {pieces}; use a batch size divisible by {pieces}")
    validate(config, device=dev, rows_per_call=tc.batch_size // pieces)
    train_idx, val_idx = _split_rows(n, tc, val)
    if tc.tensorboard:
        require_tensorboard()
    log = (log or _tqdm_write) if main else (lambda msg: None)
    with ExitStack() as stack:
        payload = {"config": None}
        ckpt = None
        if main:
            check_run_folder(run_dir)
            ensure_space(_nearest_folder(run_dir), _checkpoint_size(config), "a checkpoint of this model")
            lock = stack.enter_context(RunLock(run_dir))
            for p in clean_stale_temp(run_dir):
                log(f"removed {p.name}, left by a process killed while writing")
            try:
                data = data_fingerprint(embeddings, coords)
                extra_config = {**(extra_config or {}), DATA_KEY: data}
                config, ckpt, done, record = prepare_folder(run_dir, config, resume, d, data, log)
                if ckpt is None:
                    _check_density_head(config)
                    # Calibration's record of other weights (a config from locdiff config --run) does
                    # not hold for these: this run's own calibration writes its record.
                    config.predict.credible = {}
                if not record:
                    extra_config.pop(DATA_KEY)
            except DataError:
                lock.withdraw()  # refused before any work: nothing of this command stays behind
                raise
            payload = {"config": config.to_dict(), "resume": ckpt is not None, "done": done}
        if world > 1:  # the run folder is rank 0's: its settings and checkpoint reach the others
            payload = json.loads(distributed.broadcast_bytes(json.dumps(payload).encode() if main else None))
            config = RunConfig.from_dict(payload["config"])
            config.model.emb_dim = d
            ckpt = distributed.broadcast_bytes(ckpt if main else None) if payload["resume"] and not payload["done"] \
                else None
        done = payload["done"]
        if done:  # nothing written: the run stays as it was
            return TrainResult(int(done["step"] or 0), float(done["elapsed_s"] or 0.0), 0.0, done["history"] or [],
                               done["skipped"] or 0, best=done["best"], nothing_to_do=done["why"])
        if val is None and val_idx is None:  # (after the folder is accepted: a refusal comes first)
            why = ("train.val_size = 0" if tc.val_size <= 0 else
                   f"{n} rows are too few to hold out train.val_size = {tc.val_size} (more than "
                   f"{4 * tc.val_size} needed)")
            log(f"no validation: no validation files, and {why}; no best checkpoint, and the density temperature "
                "is not calibrated")
        if val_idx is not None and main:  # held-out rows, read by the rank that validates
            val = (gather_rows(embeddings, val_idx), coords[val_idx])
        return _train(stack, embeddings, coords, run_dir, config, ckpt, dev, train_idx, val, progress,
                      extra_config, log)


def _software(dev, world: int) -> dict:
    """What made the run, for config.json: versions, device, processes and threads."""
    import platform

    import locdiff

    return {"locdiff": locdiff.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": dev.type, "processes": world, "threads": torch.get_num_threads()}


def _tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def _nearest_folder(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _checkpoint_size(config: RunConfig) -> int:
    from locdiff.settings import parameters_at

    return 16 * parameters_at(config.model, config.model.degree) + 2**20


def _train(stack, embeddings, coords, run_dir, config, ckpt, dev, train_idx, val, progress, extra_config, log):
    from tqdm.auto import tqdm

    from locdiff import shdd
    from locdiff.data.dataset import EmbeddingDataset, make_loader
    from locdiff.data.sampler import BatchSampler
    from locdiff.runfolder import Checkpoints
    from locdiff.stopping import StopSignals
    from locdiff.trainlog import TrainLog

    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    mc, dc, tc = config.model, config.diffusion, config.train
    n, d = embeddings.shape
    extra = {"embedding_dim": d, **(extra_config or {})}
    torch.manual_seed(tc.seed)
    net = CSUNet(mc).to(dev)
    opt = adamw(net.parameters(), tc.lr, tc.weight_decay)
    ema = EMA(net, tc.ema_decay)
    state = {"step": 0, "elapsed_s": 0.0, "history": [], "skipped": 0, "recent": [], "best": None}
    if ckpt is not None:
        tensors, meta = parse_checkpoint(ckpt, run_dir / CHECKPOINT_FILE)
        state.update(restore(tensors, meta, net, ema, opt, run_dir / CHECKPOINT_FILE, config))
        log(f"resumed {run_dir} at step {state['step']}" + (f" on {world} processes" if world > 1 else ""))
        before = state.get("world_size", world) * state.get("accumulate", tc.accumulate)
        if before != world * tc.accumulate:  # piece seeds follow (seed, step, piece)
            log(f"note: the run's steps were cut into {before} pieces (processes x accumulate), these into "
                f"{world * tc.accumulate}: the noise of later steps differs from an uninterrupted run's")
    resumed_at = state["step"] if ckpt is not None else None
    command = extra.pop("command", None)  # the command line, where a CLI started this
    if ckpt is None and command:
        state["command"] = command
    if resumed_at is not None:  # config.json says how the run was made: 30 steps, then resumed to 60
        entry = {"step": resumed_at, "steps": tc.steps, "processes": world}
        if command:
            entry["command"] = command
        state["resumes"] = [*state.get("resumes", []), entry]
        extra["resumes"] = state["resumes"]
    if state.get("command"):
        extra["command"] = state["command"]
    extra["software"] = _software(dev, world)
    # Validation predicts with the settings the run started with, not the calibrated ones a
    # finished run holds, so that a resumed run's validations compare with its earlier ones.
    # (A checkpoint of an earlier locdiff does not hold them: where it validated, its config
    # holds calibrated ones.)
    calibrated = ckpt is not None and bool(state["history"])
    state.setdefault("val_predict", asdict(uncalibrated(config.predict) if calibrated else config.predict))
    val_config = dataclasses.replace(config, predict=PredictConfig(**state["val_predict"]))
    keeper, tlog = None, None
    if main:
        write_config(run_dir, config, extra)
        from locdiff import config as C

        # The prediction settings the run started with, not those calibrated since: a run
        # from this file validates as this one did.
        atomic_write_bytes(run_dir / TOML_FILE, C.dumps(val_config, version=TOML_VERSION, header=(
            "The settings of this run as last started or resumed (train.steps included); `locdiff train "
            "--config train.toml` repeats them.")).encode())
        keeper = Checkpoints(run_dir, tc.keep_checkpoints)
        if ckpt is None:
            keeper.remove_others()
        else:
            keeper.latest_step = state["step"]
        tlog = TrainLog(run_dir, state["step"] if ckpt is not None else None, tc.tensorboard)
        stack.callback(tlog.close)
    schedule = dc.make_schedule().to(dev)
    model = net
    if world > 1:
        unused = _unused_parameters(net, dc, schedule, dev)
        model = _DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                     find_unused_parameters=bool(unused))
    amp = tc.amp and dev.type == "cuda"
    max_s = tc.max_minutes * 60 if tc.max_minutes else None
    K, rows_per_piece = tc.accumulate, tc.batch_size // (world * tc.accumulate)

    ds = EmbeddingDataset(embeddings, coords)
    # Fewer rows than a batch: each batch holds every row, some twice (as the sampler pads).
    small = len(train_idx) < tc.batch_size
    if small:
        log(f"note: {len(train_idx)} training rows are fewer than a batch of {tc.batch_size}; batches repeat rows")
    sampler = BatchSampler(train_idx, tc.batch_size, seed=tc.seed, rank=rank, world_size=world, infinite=True,
                           drop_last=not small)
    step, elapsed0 = state["step"], state["elapsed_s"]
    sampler.seek(step)
    workers = config.data.workers if config.data.workers is not None else (2 if ds.reads_files else 0)
    batches = iter(make_loader(ds, sampler, workers=workers, prefetch=config.data.prefetch, device=dev))
    t_start = time.perf_counter()
    last_ckpt = t_start
    samples, step_s, window = 0, 0.0, [0, 0.0]
    recent = deque(state["recent"], maxlen=200)

    def elapsed():
        return elapsed0 + time.perf_counter() - t_start

    def ema_predictor():
        from locdiff.predict import Predictor

        ema_net = CSUNet(mc).to(dev)
        ema.copy_to(ema_net)
        return Predictor(ema_net.eval(), val_config, dev)

    def run_validation():
        if val is None:
            return None
        from locdiff.metrics import distance_metrics

        if len(val[0]) >= VALIDATION_NOTE_ROWS:  # minutes of silence otherwise, the bar standing still
            log(f"step {step}: validating on {len(val[0]):,} rows")
        pred = ema_predictor()
        if mc.conditional:
            m = distance_metrics(pred.predict(val[0], coeffs=False)["latlon"], val[1])
        else:  # one input, so one answer; what the run learns is its density
            one = pred.predict(val[0][:1])
            m = distance_metrics(np.repeat(one["latlon"], len(val[1]), 0), val[1])
            nll = unconditional_nll(one["coeffs"], val[1], kl_temperature(mc.degree, dc.kl_sharpness))
        v = {"step": step, "median_km": round(m["median_km"], 1), "acc_750km": round(m["acc_750km"], 4)}
        if not mc.conditional:
            v["nll"] = round(nll, 4)
        state["history"].append(v)
        tlog.write(step, {f"val_{k}": x for k, x in v.items() if k != "step"})
        what = (f"NLL {v['nll']:.3f} (density at the KL's temperature)" if "nll" in v else
                f"median {v['median_km']:.0f} km, acc@750km {100 * v['acc_750km']:.1f}%")
        log(f"step {step}: validation {what}")
        # An unconditional run has one answer for every place: its best is its best density.
        key = "median_km" if mc.conditional else "nll"
        if state["best"] is None or v[key] < state["best"].get(key, math.inf):
            state["best"] = {"step": step, **{k: v[k] for k in ("median_km", "nll") if k in v}}
            keeper.save_best(snapshot(), step)
        return v

    def snapshot() -> bytes:
        if not _finite_weights(net):  # never replace a good checkpoint with a diverged one
            raise _diverged(step, float("nan"), keeper, tc, 0, False)
        state.update(step=step, elapsed_s=elapsed(), recent=list(recent), world_size=world, accumulate=tc.accumulate)
        return checkpoint_bytes(net, ema, opt, state, schedule)

    # In a job's log (no terminal) a line every 30 s, not one a step, which would fill the log.
    bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", disable=not (progress and main),
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    stack.callback(bar.close)
    stopped_by, ran_out, nonfinite = None, False, 0
    # One handler from the first step to the end: a second signal, even during the final save,
    # stops at once (stopping.py) rather than as a bare KeyboardInterrupt.
    stop = stack.enter_context(StopSignals())
    while step < tc.steps:
        # One rank's signal, and rank 0's clock, decide for all (same step everywhere).
        sig, time_up, clock = distributed.all_reduce_max(
            [stop.signum or 0, float(main and bool(max_s) and elapsed() >= max_s), elapsed() if main else 0.0])
        if sig or time_up:
            stopped_by = int(sig) or None
            ran_out = not sig
            break
        t_step = time.perf_counter()
        prog = max(step / tc.steps, clock / max_s if max_s else 0.0)
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(step, prog, tc)
        try:
            batch = next(batches)
        except RuntimeError as err:  # a worker killed (the out-of-memory killer): the weights are whole
            if "DataLoader worker" not in str(err):
                raise
            raise _loader_died(err, step, keeper, snapshot if main and step != keeper.latest_step else None,
                               workers) from None
        emb_all = batch.emb.to(dev, non_blocking=True)
        x0_all = shdd.encode(batch.latlon, mc.degree, smoothing=dc.smoothing).float().to(dev)
        net.train()
        opt.zero_grad(set_to_none=True)
        sums: dict = {}
        for k in range(K):
            # Per-piece seeds: the noise of step s does not depend on where the run was
            # resumed, nor on which process computes the piece.
            seed = piece_seed(tc.seed, step, rank * K + k)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed) if dev.type == "cpu" else None
            rows = slice(k * rows_per_piece, (k + 1) * rows_per_piece)
            with model.no_sync() if world > 1 and k < K - 1 else nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss, parts = diffusion_loss(model, x0_all[rows], emb_all[rows], schedule, dc, generator=gen)
                (loss / K).backward()
            for name, v in {"loss": float(loss.detach()), **parts}.items():
                sums[name] = sums.get(name, 0.0) + v / K
        parts = distributed.all_reduce_mean(sums)
        value = parts["loss"]
        # A step whose loss jumps far above the recent median is skipped: one bad batch
        # must not undo hours of training (tc.spike_factor; docs/model.md, "Stability").
        if not math.isfinite(value) or (tc.spike_factor and len(recent) == recent.maxlen
                                        and value > tc.spike_factor * float(np.median(recent))):
            nonfinite = nonfinite + 1 if not math.isfinite(value) else 0
            # Weights gone non-finite, or a loss that stays non-finite: skipping leaves the
            # weights as they are, so no later step can recover.
            if nonfinite:
                weights_ok = _finite_weights(net)
                if nonfinite >= MAX_NONFINITE_STEPS or not weights_ok:
                    raise _diverged(step, value, keeper, tc, nonfinite, weights_ok)
            state["skipped"] += 1
            opt.zero_grad(set_to_none=True)
        else:
            nonfinite = 0
            recent.append(value)
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            ema.update(net)
        step += 1
        samples += tc.batch_size
        dt = time.perf_counter() - t_step
        step_s += dt
        window[0] += tc.batch_size
        window[1] += dt
        if not main:
            continue
        bar.update(1)
        lr = opt.param_groups[0]["lr"]
        if step % tc.log_every == 0 or step == tc.steps:
            rate = window[0] / max(window[1], 1e-9)
            tlog.write(step, {**parts, "lr": lr, "samples_per_s": round(rate, 1)})
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
            window = [0, 0.0]
        if tc.val_every and step % tc.val_every == 0 and step < tc.steps:
            run_validation()
        now = time.perf_counter()
        due = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or \
            now - last_ckpt > 60 * tc.checkpoint_minutes
        # Not at the last step: the final save follows at once (and names a failure itself).
        if due and not nonfinite and step < tc.steps:  # a non-finite loss never replaces the last good checkpoint
            try:
                keeper.save(snapshot(), step)
            except DataError as err:  # the next save may find the space freed
                # A warning (on stderr, with the command's name), not a progress line.
                warnings.warn(f"checkpoint of step {step} not saved: {err}", RuntimeWarning, stacklevel=2)
            last_ckpt = now
    del batches  # stops the loader's workers before the final work
    if nonfinite:  # ended (time, signal, last step) in a streak: these weights are not a result
        raise _diverged(step, value, keeper, tc, nonfinite, _finite_weights(net))
    result = TrainResult(step, elapsed(), samples / max(step_s, 1e-9), state["history"], state["skipped"],
                         stopped_by, state["best"], time_up=ran_out)
    if not main:
        return result
    # The steps first: a scheduler's SIGTERM gives seconds before SIGKILL, and the final
    # validation and calibration can take minutes.
    if step != resumed_at:
        _final_save(keeper, snapshot(), step)
    result.best = state["best"]
    if stopped_by is not None:
        return result
    # From here a first signal ends the run after the part in progress.
    # A validation of this very step is in the history already where a resumed run had
    # finished it (stopped during calibration), or a periodic one fell on the last step.
    validated = bool(state["history"]) and state["history"][-1]["step"] == step
    if not stop.signum and not validated and run_validation() is not None:
        _final_save(keeper, snapshot(), step)  # its history holds the last validation
    result.best = state["best"]
    if not stop.signum and val is not None and step > 0:
        rows = train_idx if len(train_idx) <= HYBRID_GALLERY_ROWS else \
            np.sort(np.random.default_rng(tc.seed).choice(train_idx, HYBRID_GALLERY_ROWS, replace=False))
        # Retrieval by embedding has nothing to retrieve by in an unconditional run.
        gallery = (gather_rows(embeddings, rows), coords[rows]) if mc.conditional else None
        cal = calibrate(ema_predictor(), val, gallery, log)
        for name in CALIBRATED:
            setattr(config.predict, name, cal[name])
    if stop.signum:
        result.signal = int(stop.signum)
        return result
    write_config(run_dir, config, {**extra, FINISHED_KEY: step})
    return result


def _finite_weights(net) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def _diverged(step: int, loss: float, keeper, tc: TrainConfig, nonfinite: int, weights_finite: bool) -> Diverged:
    last = "" if keeper is None else (f"; the checkpoint of step {keeper.latest_step} is kept"
                                      if keeper.latest_step is not None else "; no checkpoint was saved")
    what = (f"the loss was {loss:g} for the last {nonfinite} steps" if weights_finite else
            f"the weights hold NaN or infinite values (loss {loss:g})")
    return Diverged(f"training diverged by step {step}: {what}"
                    f"{last}; train again with a lower train.lr (now {tc.lr:g}), a longer train.warmup_steps "
                    f"(now {tc.warmup_steps}) or train.grad_clip > 0 (now {tc.grad_clip:g})")


def _loader_died(err: RuntimeError, step: int, keeper, snapshot, workers: int) -> DataError:
    """The one-line error of a data-loader worker that died; rank 0 first saves the weights
    of ``step`` (``snapshot``: None where nothing is to save)."""
    saved = ""
    if snapshot is not None:
        _final_save(keeper, snapshot(), step)
    if keeper is not None and keeper.latest_step is not None:
        saved = f"; the checkpoint of step {keeper.latest_step} is saved: --resume continues"
    cause = " ".join(str(err).split())
    return DataError(f"data loading stopped at step {step}: {cause}{saved} (the out-of-memory killer ends workers "
                     f"first: fewer loader workers, now {workers}, or more memory)")


def _final_save(keeper, data: bytes, step: int) -> None:
    try:
        keeper.save(data, step)
    except DataError as err:
        last = f"the checkpoint of step {keeper.latest_step} is intact" if keeper.latest_step is not None else \
            "no checkpoint was saved"
        raise DataError(f"{err}; {last}") from None
