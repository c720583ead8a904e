"""`fedtune train-local`: one site's round. Load the base model and the global version, train the LoRA
adapter with an explicit accelerate loop, and export the delta (local − parent) as an update.

The loop is written out rather than hidden in a Trainer because federated methods need to reach into
it (proximal terms, control variates, clipping and noise for privacy). It runs in one process, or data-parallel
in several (`--num-processes`, `accelerate launch`, `torchrun`; see fedtune.launch): the processes split each
batch, and process 0 alone writes the update.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedtune import launch, lm_loss, models, qlora
from fedtune.adapter import ADAPTER_FILE, adapter_config, lora_config, read_tensors
from fedtune.aggregate import method_class
from fedtune.config import FederationConfig, TrainingSettings, parse_model
from fedtune.data.contract import require_contract
from fedtune.data.prepared import read_prepared
from fedtune.errors import BadInput, StageFailed
from fedtune.privacy.dp_fedavg import next_round, privatize_update
from fedtune.privacy.sampling import round_sample
from fedtune.registry import checked_version, round_dir_name
from fedtune.wire import UPDATE_FORMAT, SigningKey
from fedtune.wire.tensors import factor_of, rank_slice
from fedtune.wire.sample import SAMPLE_FILE
from fedtune.wire.update import encode_update, write_update


def _batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless shuffled batches, reshuffled each epoch with a fixed seed.

    Yields (ids, labels, rows, labelled): this process's share of the batch, the batch's rows and its labelled
    positions. Every process draws the same order and takes a contiguous 1/world of each batch, so together they
    take exactly the batches one process would.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            if world == 1:
                yield ids[pick], labels[pick], len(pick), 0
                continue
            labelled = int((labels[pick][:, 1:] != models.IGNORE).sum())
            share = pick.tensor_split(world)[rank]
            if len(share):
                yield ids[share], labels[share], len(pick), labelled
            else:
                # An epoch's short last batch may have fewer rows than processes. This process still has to take
                # part in the step (DDP waits for every process's gradients), so it runs one row with no labels:
                # its loss and gradients are zero.
                yield ids[pick[:1]], torch.full_like(labels[pick[:1]], models.IGNORE), len(pick), labelled


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   labelled: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as `model(labels=…).loss`.

    With `labelled` (the labelled positions of a whole batch split over processes), the summed cross-entropy of
    this share divided by it: the shares' losses add up to the whole batch's mean.
    """
    total, count = lm_loss.labelled_loss_sum(model, input_ids, labels)
    return total / max(count if labelled is None else labelled, 1)


class _Objective(torch.nn.Module):
    """The model with its loss as `forward`. DistributedDataParallel arms its gradient all-reduce in forward(), and
    the loss takes the labelled-positions path (fedtune.lm_loss) rather than the model's own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, labelled: int | None = None) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, labels, labelled)


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW for these parameters: floating point, on the CPU or a CUDA GPU."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


@dataclass
class LoopResult:
    model: torch.nn.Module
    losses: list[float]
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_loop(
    model: torch.nn.Module,
    ids: np.ndarray,
    labels: np.ndarray,
    settings: TrainingSettings,
    seed: int,
    log: Callable[[int, float], None] = lambda _step, _loss: None,
) -> LoopResult:
    """Train the model's trainable parameters for `settings.steps` optimizer steps.

    Under a launched group of N processes (fedtune.launch, accelerate launch, torchrun) every process calls this
    with the same arguments: each takes its share of every batch of `settings.batch_size` sequences, DDP averages
    the gradients, and all end with the same weights, those one process would reach on the same batches.

    Args:
        model: a peft model whose LoRA parameters require grad.
        ids, labels: packed sequences [rows, seq_len]; labels -100 where no loss is taken.
        settings: steps, lr, batch size (in all, over the processes), accumulation, warmup, weight decay, clipping.
        seed: fixes the batch order.
        log: called with (step, loss) after every optimizer step (the whole batch's loss, in every process).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        # On a machine without CUDA, accelerate joins a launched group (over gloo) only when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=settings.grad_accum,
        # The processes split each batch rather than each taking one: the learning-rate schedule steps once per
        # optimizer step, not once per process.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per tensor for the whole update, rather than a dozen small ops per LoRA factor (measured:
    # half the optimizer's CPU time); the same update to float rounding.
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=_fusable(params))
    warmup = settings.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    objective = _Objective(model)
    if world > 1:
        launch.sync_trained_only(objective)
        torch.manual_seed(seed + rank)  # LoRA dropout: each process's rows get their own masks, as rows of one batch
    # A 4-bit base already sits on this process's GPU, and transformers refuses to move one.
    placed = not getattr(model, "is_loaded_in_4bit", False)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler,
                                                          device_placement=[placed, True, True])
    # FedProx: the proximal term pulls the site towards the global version it started from.
    anchors = [p.detach().clone() for p in params] if settings.prox_mu > 0 else None

    batches = _batches(torch.from_numpy(ids), torch.from_numpy(labels), settings.batch_size, seed, rank, world)
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(settings.grad_accum):
            input_ids, target, rows, labelled = next(batches)
            input_ids, target = (t.to(accelerator.device, non_blocking=True) for t in (input_ids, target))
            with accelerator.accumulate(objective), accelerator.autocast():
                # Alone: the batch's mean loss. In a group: this share's part of the batch's mean; DDP averages
                # the processes' gradients, so × world turns that average into the gradient of the batch's mean.
                loss = objective(input_ids, target, labelled if world > 1 else None)
                total = loss * world if world > 1 else loss
                if anchors is not None:
                    proximal = sum((p - a).square().sum() for p, a in zip(params, anchors))
                    total = total + 0.5 * settings.prox_mu * proximal
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / settings.grad_accum
            tokens += rows * input_ids.shape[1]
        if world > 1:
            step_loss = accelerator.reduce(step_loss, reduction="sum")  # the shares' parts make the batch's loss
        value = step_loss.item()
        if not math.isfinite(value):
            raise StageFailed(f"train-local: loss became {value} at step {step}; lower --lr")
        losses.append(value)
        log(step, value)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model = accelerator.unwrap_model(objective).model
    model.eval()
    return LoopResult(model, losses, tokens, seconds)


@dataclass
class ComputedUpdate:
    """One site's update in memory: what `wire.encode_update` turns into the bytes that are sent."""

    site: str
    round: int
    tensors: dict[str, torch.Tensor]
    fields: dict  # the manifest, less what encoding adds (tensors' sha256, nonce, stamp)
    adapter_config: dict


def site_signer(config: FederationConfig, site: str, key: Path | None) -> SigningKey | None:
    """The site's private key, checked against the roster before any training starts."""
    config.require_site(site, "train-local")
    listed = config.site_key(site)
    if key is None:
        if config.signatures_required():
            raise BadInput(f"--key: this federation requires signed updates; give site {site}'s private key "
                           f"(`fedtune keys new --name {site}` makes one; the coordinator puts its .pub on the roster)")
        return None
    signer = SigningKey.load(key)
    if listed is None and config.signatures_required():
        raise BadInput(f"{key}: the roster holds no key for site {site}; the coordinator adds it with "
                       f"`fedtune roster add --site {site} --key {site}.pub`")
    if listed is not None and signer.public != listed:
        raise BadInput(f"{key}: not the key the roster holds for site {site} (its public key is {signer.public})")
    return signer


def train_local(
    config: FederationConfig,
    site: str,
    data: Path,
    global_ref: Path,
    updates: Path,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    model_dir: Path | None = None,
    key: Path | None = None,
    num_processes: int = 1,
) -> Path | None:
    """Train one site's update for the round after the given global version and write it, signed.

    Args:
        config: the federation.
        site: this site's roster name.
        data: the site's prepared folder.
        global_ref: a registry (its LATEST is used) or a global version folder.
        updates: the updates root; the update goes to updates/round-NNNN/<site>/.
        steps, lr, batch_size: override the federation's training defaults.
        log: receives progress lines.
        model_dir: the folder holding this site's copy of the base model (else FEDTUNE_MODEL_DIR or its id).
        key: the site's private key (required when the federation requires signed updates).
        num_processes: train data-parallel over this many processes on this machine (one per GPU, else CPU
            processes); they split each batch and process 0 writes the one update. In a group that a launcher
            started (accelerate launch, torchrun) its processes are used, and this is 1 or their number.

    Returns:
        The update folder; None in a launched group's processes other than process 0, which write nothing.
    """
    rank, world = launch.group()
    if world > 1 and num_processes not in (1, world):
        raise BadInput(f"--num-processes {num_processes}: this is one of {world} processes a launcher started "
                       f"(WORLD_SIZE={world}); give --num-processes {world} or leave it out")
    log = log if rank == 0 else (lambda _msg: None)  # process 0 speaks for the group
    signer = site_signer(config, site, key)
    _parent_dir, parent = checked_version(global_ref, config)
    target = updates / round_dir_name(parent["round"] + 1) / site
    if target.exists():
        raise BadInput(f"{target}: already exists; this site has already sent an update for round {parent['round'] + 1}")
    called = round_sample(config, target.parent, parent)
    if called is not None and site not in called:
        how = (f"rounds calls {len(called)} of {len(config.sites)} sites, a seeded draw" if config.rounds.samples()
               else f"each round calls each site with probability {config.privacy.sample_rate}")
        raise BadInput(f"{target.parent / SAMPLE_FILE}: site {site} was not drawn for round {parent['round'] + 1}; "
                       f"it sends nothing this round ({how})")
    if config.privacy.secure_aggregation:
        from fedtune.privacy.secagg import round_plan
        from fedtune.privacy.secagg_site import mask_update, require_exchange_key

        # Checked before training: a roster without exchange keys, or the wrong key, cannot mask.
        round_plan(config, parent)
        require_exchange_key(config, site, signer)
    train = _settings(config, steps, lr, batch_size)
    launch.check(max(world, num_processes), train.batch_size, config.privacy.mode == "local", launched=world > 1)
    if world == 1 and num_processes > 1:
        # Located once here, not by every process: the embedded model is converted and the weights fingerprinted.
        models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "train-local")
        launch.run(num_processes, train_local, (config, site, data, global_ref, updates, steps, lr, batch_size),
                   {"model_dir": model_dir, "key": key}, log)
        if not target.is_dir():
            raise StageFailed(f"{target}: the {num_processes} processes finished, but process 0 wrote no update")
        return target
    update = compute_update(config, site, data, global_ref, steps, lr, batch_size, log, model_dir=model_dir)
    if world > 1:
        from accelerate import PartialState

        # Every process has trained to the end before process 0 writes, so a failure anywhere leaves nothing.
        PartialState().wait_for_everyone()
        if rank != 0:
            return None
    if config.privacy.secure_aggregation:
        files = mask_update(config, signer, parent, site, update.tensors, update.fields, update.adapter_config)
    else:
        files = encode_update(update.tensors, update.fields, update.adapter_config, signer)
    return write_update(target, files)


def _settings(config: FederationConfig, steps: int | None, lr: float | None,
              batch_size: int | None) -> TrainingSettings:
    """The federation's training settings with a site's command-line overrides, checked; and, before any model is
    loaded, that this machine can hold the base as lora.quantization asks."""
    overrides = {k: v for k, v in {"steps": steps, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    train = parse_model(TrainingSettings, {**config.training.model_dump(), **overrides}, "train-local")
    if config.lora.quantization == "4bit":
        qlora.require("train-local")
    return train


def compute_update(
    config: FederationConfig,
    site: str,
    data: Path,
    global_ref: Path,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    model_dir: Path | None = None,
) -> ComputedUpdate:
    """Train from the global version (its coordinator signature and files checked first) and return the delta
    (local − parent) and its manifest fields, in memory. Arguments as for `train_local`."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config.require_site(site, "train-local")
    train = _settings(config, steps, lr, batch_size)
    parent_dir, parent = checked_version(global_ref, config)
    number = parent["round"] + 1
    next_round(config, parent, "train-local")  # no training for a round the privacy budget cannot pay for
    card, ids, labels = read_prepared(data, config, "train")
    if card["site"] != site:
        raise BadInput(f"{data / 'data_card.json'}: prepared for site '{card['site']}', not '{site}'")
    weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "train-local")
    tokenizer = models.load_tokenizer(weights)
    require_contract(card, config, models.tokenizer_fingerprint(tokenizer), models.chat_template_sha(tokenizer), data)
    if config.privacy.mode == "local":
        from fedtune.privacy.local import preflight

        # A run the site's privacy budget cannot pay for is refused before the base model is loaded.
        preflight(config, card, data, len(ids), train, round=number, parent=parent["version"])

    # Seeds differ by site and round so sites do not draw the same batches, yet every rerun is identical.
    seed = config.seed + 1000 * number + zlib.crc32(site.encode()) % 1000
    torch.manual_seed(seed)
    base = models.load_base_model(weights, quantization=config.lora.quantization)
    # The site starts from the global version's first `rank` components: all of them at the
    # federation's rank, the best truncation for a smaller one (svd/stack versions are in SVD order).
    rank = config.site_rank(site)
    parent_tensors = {k: rank_slice(v, k, rank).contiguous() for k, v in read_tensors(parent_dir / ADAPTER_FILE).items()}
    model = get_peft_model(base, lora_config(config, rank))
    result_load = set_peft_model_state_dict(model, parent_tensors)
    if result_load.unexpected_keys:
        raise BadInput(f"{parent_dir / ADAPTER_FILE}: keys do not fit the base model ({result_load.unexpected_keys[:2]})")
    # What the method lets a site train: FFA-LoRA keeps A at the shared seeded init; only B trains and travels.
    trained = method_class(config.aggregation.method).trains
    for name, param in model.named_parameters():
        param.requires_grad = "lora_B" in name or ("lora_A" in name and trained == "AB")

    def progress(step: int, loss: float) -> None:
        if step == 1 or step % 5 == 0 or step == train.steps:
            log(f"{site}: round {number} step {step}/{train.steps} loss {loss:.4f}")

    if config.privacy.mode == "local":
        from fedtune.privacy.local import train_private

        # Record-level DP-SGD: the site's ledger beside its prepared data counts what every run spends.
        result, privacy = train_private(model, ids, labels, train, config, card, data, round=number,
                                        parent=parent["version"], log=progress)
    else:
        result = train_loop(model, ids, labels, train, seed, log=progress)
    losses, seconds = result.losses, result.seconds
    world = launch.group()[1]

    local = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    sent = [k for k in parent_tensors if trained == "AB" or factor_of(k) != "A"]
    delta = {k: (local[k].detach().float().cpu() - parent_tensors[k].float()).contiguous() for k in sent}
    if config.privacy.mode != "local":
        privacy = privatize_update(config, delta)  # distributed DP: clipped and noised before it leaves the site
    fields = {
        "format": UPDATE_FORMAT,
        "site": site,
        "round": number,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        "lora": {"r": rank, "alpha": config.lora.alpha, "target_modules": config.lora.target_modules},
        "trained": trained,
        "num_examples": int(len(ids)),
        "num_tokens": int(card["tokens"]["train"]["trained"]),
        "train": {
            "steps": train.steps, "lr": train.lr, "batch_size": train.batch_size, "grad_accum": train.grad_accum,
            **({"loss_first": None, "loss_last": None} if config.privacy.mode == "local"
               else {"loss_first": losses[0], "loss_last": losses[-1]}),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(result.tokens_per_second, 1),
            # Absent for one process, so such an update reads the same to a coordinator on an earlier fedtune.
            **({"processes": world} if world > 1 else {}),
        },
        "privacy": privacy,
    }
    from fedtune.monitor import site_fields  # data profile; parent's eval loss (restores the parent's tensors)

    fields.update(site_fields(config, card, data, result.model, parent_tensors))
    return ComputedUpdate(site, number, delta, fields, adapter_config(config, rank))
