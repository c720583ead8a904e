"""Record-level DP-SGD inside train-local (privacy.mode local): each site protects its own records, whatever the
coordinator or the other sites do with its updates.

Every step Poisson-samples the site's packed training rows, computes each row's own gradient of the LoRA weights
(Opacus's GradSampleModule, hooks mode), clips it to example_clip_norm, sums, and adds N(0, (z·example_clip_norm)²)
before the optimizer sees it. One row is the unit of privacy, so prepare packs whole records per row in this mode:
a record split across two rows would have two clipped gradients and twice the sensitivity.

What a site has spent is kept in a ledger beside its prepared data (privacy_ledger.json, readable by the site
only): one entry per training run, composed by the federation's accountant. A run is entered before its update
is handed back, since the privacy is spent by training, sent or not; the next run is refused before it trains
when it would take the ledger past privacy.local.target_epsilon. Sampling and noise come from generators seeded
from the operating system's random source; those seeds are never written anywhere, and config.seed plays no part.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import ConfigDict, Field

from fedtune.artifacts import now, read_json, write_bytes_atomic
from fedtune.config import FederationConfig, Strict, TrainingSettings, parse_model
from fedtune.errors import BadInput, BudgetSpent, StageFailed
from fedtune.privacy.accountant import epsilon, epsilon_of, noise_multiplier

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "fedtune.privacy_ledger/1"
WHOLE_RECORDS = "whole-records"


class _Record(Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a damaged number is an error, not an ε


class LedgerEntry(_Record):
    """One training run: `steps` Poisson-sampled steps at rate `sample_rate` with noise `noise_multiplier`."""

    federation: str
    round: int = Field(ge=1)
    parent: str
    steps: int = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(gt=0)
    example_clip_norm: float = Field(gt=0)
    created: str


class Calibration(_Record):
    """The z a site chose on its first round to meet target_epsilon over the planned rounds; later rounds keep it."""

    noise_multiplier: float = Field(gt=0)
    target_epsilon: float = Field(gt=0)
    rounds: int = Field(ge=1)
    steps: int = Field(ge=1)
    sample_rate: float = Field(gt=0, le=1)
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "pld"]


class Ledger(_Record):
    format: Literal["fedtune.privacy_ledger/1"] = LEDGER_FORMAT
    calibration: Calibration | None = None
    entries: list[LedgerEntry] = []


def read_ledger(path: Path) -> Ledger:
    """The site's ledger (empty before its first private run); BadInput naming the file when it is damaged."""
    if not path.exists():
        return Ledger()
    try:
        return parse_model(Ledger, read_json(path), str(path))
    except BadInput as err:
        # Deleting a damaged ledger would forget what was spent, so the fix is to restore it.
        raise BadInput(f"{err}; restore the ledger from a backup rather than delete it: it records the ε this "
                       "site has spent") from None


def _write_private(path: Path, ledger: Ledger) -> None:
    """Write atomically, readable by the site's owner only from the start."""
    write_bytes_atomic(path, (ledger.model_dump_json(indent=2) + "\n").encode(), private=True)


@contextlib.contextmanager
def _ledger_lock(path: Path):
    """Only one private run per site at a time: two at once would both pass the budget check on the same ledger."""
    try:
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise BadInput(f"{path}: cannot keep the site's privacy ledger here ({err.strerror}); under privacy.mode "
                       "local the prepared folder must be writable") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"{path}: another train-local of this site is training under it; wait for it to "
                           "finish") from None
        yield
    finally:
        os.close(fd)


def ledger_epsilon(entries: list[LedgerEntry], config: FederationConfig) -> float:
    """ε of every run in `entries` together, by the federation's accountant at privacy.local.delta."""
    return epsilon_of([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], config.privacy.local.delta,
                      config.privacy.accountant)


def sample_rate(rows: int, expected_batch: int) -> float:
    """The Poisson rate Opacus samples with: 1 / (number of batches of `expected_batch` rows in an epoch)."""
    return 1.0 / math.ceil(rows / expected_batch)


def row_losses(model, input_ids, labels):
    """Each row's mean next-token cross-entropy over its labelled positions, [rows]; 0 for a row without labels.

    Averaging per row first makes the batch loss's per-sample gradients exactly each row's own loss gradient."""
    import torch

    from fedtune import models

    logits, target = models.labelled_logits(model, input_ids, labels)
    rows = len(input_ids)
    if target.numel() == 0:  # keeps the graph, so backward still gives every row a (zero) per-sample gradient
        return logits.sum() * 0.0 + torch.zeros(rows, device=logits.device)
    row = (labels[:, 1:] != models.IGNORE).nonzero(as_tuple=True)[0]  # the row of each position, in `[keep]` order
    token = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    sums = torch.zeros(rows, dtype=token.dtype, device=token.device).index_add(0, row, token)
    return sums / torch.bincount(row, minlength=rows).clamp(min=1)


def _poisson_batches(loader):
    while True:
        yield from loader


def dp_train_loop(model, ids, labels, settings: TrainingSettings, noise_multiplier: float, example_clip_norm: float,
                  log: Callable[[int, float], None] = lambda _step, _loss: None):
    """DP-SGD on the model's trainable (LoRA) parameters for `settings.steps` steps; returns train.LoopResult.

    Each step is one Poisson batch of expected size batch_size × grad_accum and one AdamW step on the clipped,
    noised mean gradient. FedProx's proximal term is added after the noise: it depends on no record."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedtune.train import LoopResult

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()  # fp32 throughout: per-sample gradients and their norms are not taken in bf16
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if settings.prox_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # Left to itself Opacus draws both the sample and the noise from torch's global generator, which config.seed
    # fixes: anyone holding federation.yaml could then subtract the noise and knows which rows each step used. Both
    # generators are seeded from the OS instead and the seeds are dropped here. (secure_mode would use torchcsprng,
    # which has no build for this torch.)
    sampler = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    loader = DataLoader(TensorDataset(torch.from_numpy(ids), torch.from_numpy(labels)),
                        batch_size=settings.batch_size * settings.grad_accum, generator=sampler)
    with warnings.catch_warnings():
        # Expected here: no secure RNG (see above), and Opacus's backward hooks on a layer whose input needs no
        # gradient (the frozen embeddings feed the first LoRA layer).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)  # its own accountant is unused: the ledger counts
        private, dp_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=example_clip_norm, poisson_sampling=True, noise_generator=noise)
        warmup = settings.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        batches = _poisson_batches(private_loader)
        losses: list[float] = []
        tokens = 0
        started = time.perf_counter()
        for step in range(1, settings.steps + 1):
            input_ids, target = (t.to(device) for t in next(batches))
            if len(input_ids):
                # The peft model inside the wrapper: its LoRA layers carry Opacus's hooks either way.
                loss = row_losses(private._module, input_ids, target).mean()
                loss.backward()
                value = loss.item()
            else:
                # No row was sampled: the step still adds its noise (skipping it would reveal the empty sample).
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                value = 0.0  # as for a batch without labels
            if not math.isfinite(value):
                raise StageFailed(f"train-local: loss became {value} at step {step}; lower --lr")
            if dp_optimizer.pre_step():  # clip each row, sum, add noise, divide by the expected batch: p.grad
                if anchors is not None:
                    for p, a in zip(params, anchors):
                        p.grad.add_(p.detach() - a, alpha=settings.prox_mu)
                optimizer.step()
            scheduler.step()
            dp_optimizer.zero_grad(set_to_none=True)
            tokens += input_ids.numel()
            losses.append(value)
            log(step, value)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model = private.to_standard_module()
    model.eval()
    return LoopResult(model, losses, tokens, seconds)


def _noise_for(config: FederationConfig, ledger: Ledger, q: float, steps: int) -> tuple[float, Calibration | None]:
    """The federation's z; else the z this site calibrated on its first round; else calibrate it now."""
    local, settings = config.privacy.local, config.privacy
    if local.noise_multiplier is not None:
        return local.noise_multiplier, ledger.calibration
    if ledger.calibration is not None:
        return ledger.calibration.noise_multiplier, ledger.calibration
    if steps < 1:
        raise BadInput("--steps 0: nothing to calibrate privacy.local.noise_multiplier for")
    z = noise_multiplier(local.target_epsilon, q, settings.rounds * steps, local.delta, settings.accountant)
    return z, Calibration(noise_multiplier=z, target_epsilon=local.target_epsilon, rounds=settings.rounds, steps=steps,
                          sample_rate=q, delta=local.delta, accountant=settings.accountant)


def _plan(config: FederationConfig, card: dict, data: Path, rows: int, settings: TrainingSettings, round: int,
          parent: str, calibrate: bool = True):
    """(ledger path, z, calibration, q, ledger entries with this run's, ε they spend); BadInput past the budget.
    Without `calibrate`, None for a site whose z is still to be chosen: that z is chosen to fit the budget."""
    local = config.privacy.local
    if card.get("packing_mode") != WHOLE_RECORDS:
        raise BadInput(f"{data / 'data_card.json'}: prepared with records split across rows; prepare again under "
                       "privacy.mode local")
    if rows == 0:
        raise BadInput(f"{data / 'train.parquet'}: no training rows; prepare again with more records")
    q = sample_rate(rows, settings.batch_size * settings.grad_accum)
    path = data / LEDGER_FILE
    ledger = read_ledger(path)
    if not calibrate and local.noise_multiplier is None and ledger.calibration is None:
        return None
    z, calibration = _noise_for(config, ledger, q, settings.steps)
    entry = LedgerEntry(federation=config.name, round=round, parent=parent, steps=settings.steps, sample_rate=q,
                        noise_multiplier=z, example_clip_norm=local.example_clip_norm, created=now())
    entries = [*ledger.entries, entry]
    spent = ledger_epsilon(entries, config)
    if local.target_epsilon is not None and spent > local.target_epsilon:
        raise BudgetSpent(f"{path}: round {round} would take this site's record-level ε to {spent:.4f}, past "
                          f"privacy.local.target_epsilon {local.target_epsilon} (δ {local.delta}); the site's budget "
                          "is spent and nothing was trained")
    return path, z, calibration, q, entries, spent


def preflight(config: FederationConfig, card: dict, data: Path, rows: int, settings: TrainingSettings, *, round: int,
              parent: str) -> None:
    """train_private's checks (packing, ledger, budget), run before the base model is loaded."""
    _plan(config, card, data, rows, settings, round, parent, calibrate=False)


def train_private(model, ids, labels, settings: TrainingSettings, config: FederationConfig, card: dict, data: Path, *,
                  round: int, parent: str, log: Callable[[int, float], None] = lambda _step, _loss: None):
    """Check the ledger's budget, train with DP-SGD and enter the run in the ledger.

    Returns (train.LoopResult, the update manifest's privacy record)."""
    local = config.privacy.local
    with _ledger_lock(data / LEDGER_FILE):
        path, z, calibration, q, entries, spent = _plan(config, card, data, len(ids), settings, round, parent)
        result = dp_train_loop(model, ids, labels, settings, z, local.example_clip_norm, log)
        try:
            _write_private(path, Ledger(calibration=calibration, entries=entries))
        except OSError as err:
            raise BadInput(f"{path}: could not record the privacy this run spent ({err.strerror or err}); its "
                           "update is not written") from None
    record = {"mechanism": "local", "example_clip_norm": local.example_clip_norm, "noise_multiplier": z,
              "sample_rate": q, "steps": settings.steps, "rounds": len(entries), "delta": local.delta,
              "accountant": config.privacy.accountant, "epsilon": spent}
    return result, record


def check_update(config: FederationConfig, record) -> str | None:
    """Why an update's privacy record (wire PrivacyRecord) falls short of the federation's local DP; None if not."""
    local = config.privacy.local
    wanted = (f"this federation's local DP needs DP-SGD with example_clip_norm ≤ {local.example_clip_norm}"
              + (f", noise_multiplier ≥ {local.noise_multiplier}" if local.noise_multiplier is not None else "")
              + (f", ε ≤ {local.target_epsilon}" if local.target_epsilon is not None else "")
              + f" at δ ≤ {local.delta} by {config.privacy.accountant}")
    fields = ("example_clip_norm", "noise_multiplier", "sample_rate", "steps", "rounds", "delta", "accountant",
              "epsilon")
    if record.mechanism != "local" or any(getattr(record, f) is None for f in fields):
        return f"manifest.json: privacy is {record.model_dump(exclude_none=True)}, but {wanted}"
    claimed = f"manifest.json: privacy claims {record.model_dump(exclude_none=True)}, but {wanted}"
    if (record.example_clip_norm > local.example_clip_norm or record.delta > local.delta
            or record.accountant != config.privacy.accountant or record.rounds < 1
            or (local.noise_multiplier is not None and record.noise_multiplier < local.noise_multiplier)):
        return claimed
    if not math.isfinite(record.epsilon) or record.epsilon < 0:
        return f"manifest.json: privacy reports ε {record.epsilon}, not a finite ε ≥ 0"
    if local.target_epsilon is not None and record.epsilon > local.target_epsilon:
        return (f"manifest.json: privacy reports ε {record.epsilon:.4f}, past privacy.local.target_epsilon "
                f"{local.target_epsilon}")
    # Past rounds cannot be recomputed from one record, but this round alone spends a known ε: the total is no less.
    # Only by RDP, which takes milliseconds whatever the claim: PLD takes minutes for a tiny noise_multiplier, and a
    # hostile update must not stall the round.
    if record.accountant != "rdp":
        return None
    try:
        floor = epsilon(record.noise_multiplier, record.sample_rate, record.steps, record.delta, "rdp")
    except BadInput as err:
        return f"manifest.json: privacy claims cannot be accounted ({err})"
    if record.epsilon < floor * (1 - 1e-6):
        return (f"manifest.json: privacy reports ε {record.epsilon:.6g}, below the {floor:.6g} that this round's own "
                f"{record.steps} steps at noise_multiplier {record.noise_multiplier} and sample_rate "
                f"{record.sample_rate:.6g} spend")
    return None


def version_record(config: FederationConfig, base: dict, parent: dict, updates) -> dict:
    """A version's privacy under local DP: each site's record-level ε as its latest accepted update reported it
    (sites absent this round keep what earlier versions recorded: their records shaped this version too), and
    the largest of them as the version's ε. `base` is the record next_round made; `updates` the accepted ones."""
    local = config.privacy.local
    spent = dict((parent.get("privacy") or {}).get("site_epsilon") or {})
    for update in updates:
        reported = float(update.manifest["privacy"]["epsilon"])
        spent[update.site] = max(spent.get(update.site, 0.0), reported)
    return {**base, "mode": "local", "delta": local.delta, "accountant": config.privacy.accountant,
            "target_epsilon": local.target_epsilon, "noise_multiplier": local.noise_multiplier,
            "clip_norm": local.example_clip_norm, "site_epsilon": dict(sorted(spent.items())),
            "epsilon": max(spent.values(), default=0.0)}
