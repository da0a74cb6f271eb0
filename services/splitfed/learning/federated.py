"""Federated learning without the messaging: a worker's local training, the parties' scores of
a global model, and the whole FedAvg loop in one process (the baseline the distributed run must
equal and is timed against)."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitfed.errors import TaskError
from splitfed.learning import calibration, data, models, objectives, privacy, secagg, strategies, train
from splitfed.learning.context import Context, context_of
from splitfed.learning.device import CPU, Compute
from splitfed.learning.tasks import Task
from splitfed.learning.settings import FederatedSettings, PartitionSettings, worker_ids
from splitfed.learning.train import EpochRecord


def round_seed(seed: int, worker_index: int, round_number: int) -> int:
    """Each worker's batch order in each round: fixed by the run's seed, so runs repeat exactly."""
    return seed * 1_000_003 + worker_index * 10_007 + round_number


WORKER_ROLE, SERVER_ROLE = "fedavg-worker", "fedavg-server"  # as roles.fedavg names them: what a task's context says


def worker_context(settings: PartitionSettings, index: int) -> Context:
    return context_of(settings, WORKER_ROLE, worker_ids(settings.workers)[index], index)


def server_scores(settings: FederatedSettings) -> bool:
    """Whether the server scores the global model on its own data (--evaluate server or both)."""
    return settings.evaluate != "parties"


def parties_score(settings: FederatedSettings) -> bool:
    """Whether the workers score the global model on theirs (--evaluate parties or both)."""
    return settings.evaluate != "server"


def server_context(settings: FederatedSettings) -> Context:
    """The server's context. With --evaluate parties it scores nothing itself, so it is given no
    data folder: whatever it builds, it builds without reading any data."""
    context = context_of(settings, SERVER_ROLE, SERVER_ROLE)
    return context if server_scores(settings) else dataclasses.replace(context, data_dir=None)


def server_classes(task: Task, context: Context, reads_data: bool) -> tuple[str, ...]:
    """The class list the server holds the workers to: its data's, or without data the one the
    settings, the task or a built-in data set names (TaskError when none does)."""
    if reads_data or not task.own_data:
        return task.classes(context)
    if named := task.named_classes():
        return named
    raise TaskError(f"{context.party} reads no data with --evaluate parties, so no data tells it the class list the workers must share: "
                    f"name it (--classes, or classes in {task.origin or 'the task'})")


def training_data(task: Task, context: Context) -> data.Samples:
    """A party's training samples less the held-out ones: the set the workers share out, or the
    worker's own."""
    full = task.data(context, train=True)
    holdout = task.settings.holdout
    if holdout >= len(full):
        raise ValueError(f"--holdout {holdout} leaves no training samples out of {len(full)}")
    return full.subset(slice(0, len(full) - holdout))


def evaluation_data(task: Task, context: Context) -> data.Samples:
    """What a party scores the global model on: its held-out training samples, or its test set."""
    holdout = task.settings.holdout
    if holdout:
        full = task.data(context, train=True)
        return full.subset(slice(len(full) - holdout, None))
    return task.data(context, train=False)


def score(model: nn.Module, samples: data.Samples, batch_size: int, loss_of: train.Loss = train.loss_fn, compute: Compute = CPU) -> train.Score:
    """`model`'s counts on `samples`, in eval mode (its modes are restored after)."""
    with models.evaluating(model):
        return train.score(model, samples, batch_size, loss_of, compute)


def parties_figures(scores: dict[str, train.Score]) -> dict:
    """What a round's record says of the parties' scores: the total over the workers that scored
    (correct and losses added up, in the order of their names, then divided by the samples) and
    each worker's own figures."""
    ordered = sorted(scores.items())
    correct, loss_sum, samples = sum(s.correct for _, s in ordered), sum(s.loss_sum for _, s in ordered), sum(s.samples for _, s in ordered)
    return {
        "parties_accuracy": correct / samples, "parties_loss": loss_sum / samples, "parties_samples": samples,
        "parties": {worker: {"accuracy": s.accuracy, "loss": s.loss, "samples": s.samples} for worker, s in ordered},
    }


@dataclass
class RoundRecord(EpochRecord):
    """A round of the plain loop; `parties`: each worker's score of the round's model (--evaluate
    parties or both). `accuracy` and `loss` are the server's, or with --evaluate parties the
    parties' total."""

    parties: dict[str, train.Score] | None = None


def worker_shares(task: Task, settings: PartitionSettings, indices: list[int]) -> list[data.Samples]:
    """The training samples of the workers at `indices`: each one's own, or their shares of the one
    data set (loaded and partitioned once)."""
    task.check_partition()
    if task.own_data:
        return [training_data(task, worker_context(settings, index)) for index in indices]
    full = training_data(task, worker_context(settings, 0))
    shares = data.partition(full.labels.cpu(), settings.partition, settings.workers, settings.seed)
    return [full.subset(shares[index]) for index in indices]


def local_batches(size: int, settings: PartitionSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """This round's batches of indices: `local_epochs` passes over the share, or exactly
    `local_steps` batches (further passes begin as the previous one ends)."""
    if settings.local_steps is None:
        return [batch for _ in range(settings.local_epochs) for batch in data.batch_order(size, settings.batch_size, generator)]
    batches: list[torch.Tensor] = []
    while len(batches) < settings.local_steps:
        batches.extend(data.batch_order(size, settings.batch_size, generator))
    return batches[: settings.local_steps]


def sample_workers(candidates: list[str], count: int, seed: int, round_number: int, secret: bool = False) -> list[str]:
    """`count` of `candidates` (all of them when there are no more), drawn for one round: the
    same seed, round and candidates, in any order, always give the same workers, sorted.
    `secret`: drawn from the operating system's randomness instead, so that nobody who knows the
    seed knows who took part (central DP's amplification by sampling rests on that)."""
    ordered = sorted(candidates)
    if count >= len(ordered):
        return ordered
    draw = random.SystemRandom() if secret else random.Random(f"splitfed-sample/{seed}/{round_number}")
    return sorted(draw.sample(ordered, count))


def round_lr(settings: PartitionSettings, round_number: int) -> float:
    return settings.lr * settings.lr_decay ** (round_number - 1)


def local_gradient(model: nn.Module, share: data.Samples, batches: list[torch.Tensor], loss_of: train.Loss = train.loss_fn, compute: Compute = CPU) -> dict[str, torch.Tensor]:
    """The mean gradient of the local loss at the model as it is, over `batches` (no step)."""
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    model.train()
    for indices in batches:
        model.zero_grad(set_to_none=True)
        images, labels = share.batch(indices)
        with compute.autocast():
            loss = loss_of(model(images), labels)
        loss.backward()
        for name, p in model.named_parameters():
            totals[name] += p.grad
    model.zero_grad(set_to_none=True)
    return {name: total / len(batches) for name, total in totals.items()}


def last_layer(model: nn.Module) -> list[str]:
    """Names of the parameters of the last module that has any: the classifier head."""
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return [f"{owners[-1]}.{name}" for name, _ in dict(model.named_modules())[owners[-1]].named_parameters(recurse=False)]


@dataclass
class LocalWork:
    loss: float  # mean training loss of the round
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD: this worker's new control variate c_i
    steps: int = 0  # optimiser steps taken (sample-level DP's accountant counts them)


def local_training(
    model: nn.Module, share: data.Samples, settings: PartitionSettings, seed: int, round_number: int,
    recipe: strategies.LocalRecipe = strategies.LocalRecipe(), controls: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    loss_of: train.Loss = train.loss_fn, compute: Compute = CPU,
) -> LocalWork:
    """One round of local work on this worker's share, from the global model in `model`, as
    the strategy's `recipe` asks.

    prox_mu > 0: the FedProx term mu/2 * ||w - w_global||^2 keeps the local model near the
    global one. absent_scale < 1: the logits of classes this share holds no sample of are scaled
    by it (FedRS's restricted softmax). calibration_tau > 0: the logits in the loss are
    calibrated by the share's label counts, z_c - tau * n_c^(-1/4) (FedLC). frozen_head: the last layer is not trained (FedBABU).
    `controls` = (c, c_i), the server's and this worker's SCAFFOLD control variates (with a
    recipe's control_variates): every gradient is corrected by c - c_i, and the new c_i is the
    local gradient at the global model over this round's batches (the paper's option I,
    whatever the optimiser). With --dp sample the steps are DP-SGD's (learning.privacy)."""
    generator = torch.Generator().manual_seed(seed)
    batches = local_batches(len(share), settings, generator)
    new_control = local_gradient(model, share, batches, loss_of, compute) if controls is not None else None
    correction = {name: controls[0][name] - controls[1][name] for name in controls[0]} if controls is not None else None
    head = set(last_layer(model)) if recipe.frozen_head else set()
    trained = [p for name, p in model.named_parameters() if name not in head]
    opt = train.optimizer(trained, settings.optimizer, round_lr(settings, round_number))
    if settings.dp == "sample":  # every sample's gradient clipped and noised (Opacus); the model is plain again after
        with privacy.sample_dp(model, opt, settings.dp_clip, settings.dp_noise_multiplier, settings.batch_size) as (private_model, private_opt):
            return _train_batches(private_model, share, batches, private_opt, settings, recipe, correction, loss_of, compute, new_control)
    return _train_batches(model, share, batches, opt, settings, recipe, correction, loss_of, compute, new_control)


def _train_batches(
    model: nn.Module, share: data.Samples, batches: list[torch.Tensor], opt: torch.optim.Optimizer, settings: PartitionSettings,
    recipe: strategies.LocalRecipe, correction: dict[str, torch.Tensor] | None, loss_of: train.Loss, compute: Compute,
    new_control: dict[str, torch.Tensor] | None,
) -> LocalWork:
    """`local_training`'s loop over its batches, with whichever model and optimiser it set up."""
    proximal = objectives.Proximal(model, recipe.prox_mu) if recipe.prox_mu > 0 else None
    classes = models.output_shape(model, tuple(share.images.shape[1:]))[0]  # the model's logits: one per class
    local_loss = objectives.adjusted(
        loss_of,
        objectives.absent_class_scale(share, classes, recipe.absent_scale) if recipe.absent_scale != 1.0 else None,  # (classes,)
        objectives.calibration_offsets(share, classes, recipe.calibration_tau) if recipe.calibration_tau > 0 else None,  # (classes,)
    )
    losses = []
    model.train()
    for indices in batches:
        opt.zero_grad(set_to_none=True)
        images, labels = share.batch(indices)  # (B, C, H, W), (B,) on the device
        with compute.autocast():
            loss = local_loss(model(images), labels)
        if proximal is not None:
            loss = loss + proximal()
        compute.backward(loss)
        if correction is not None:
            if compute.scaler:  # the correction is added to true gradients, not scaled ones
                compute.scaler.unscale_(opt)
            for name, p in model.named_parameters():
                p.grad += correction[name]
        compute.step(opt)
        losses.append(loss.item())
    return LocalWork(sum(losses) / max(1, len(losses)), new_control, len(batches))


def dp_weighted(settings: PartitionSettings) -> bool:
    """Whether an update weighs its samples in the mean: not under central or local DP, whose noise
    is calibrated to every worker weighing the same (McMahan et al. 2018)."""
    return settings.dp not in ("central", "local")


def private_change(change: torch.Tensor, settings: PartitionSettings, clip: float) -> tuple[torch.Tensor, bool]:
    """What a worker sends of its model change (P,) under --dp: clipped to `clip` (central, local) and
    noised (local); and whether it was under the clip (adaptive clipping counts those)."""
    if settings.dp not in ("central", "local"):
        return change, True
    clipped, under = privacy.clip_l2(change, clip)
    if settings.dp == "local":
        clipped = privacy.local_noise(clipped, clip, settings.dp_noise_multiplier)
    return clipped, under


def noise_multiplier(settings: FederatedSettings) -> float:
    """The z of the Gaussian the server adds to the sum (central DP): the setting's, or with adaptive
    clipping the larger one that leaves room for the noised count (Andrew et al. 2021)."""
    if not settings.dp_adaptive_clip:
        return settings.dp_noise_multiplier
    return privacy.effective_noise_multiplier(settings.dp_noise_multiplier, count_stddev(settings))


def count_stddev(settings: FederatedSettings) -> float:
    """The noise on adaptive clipping's count: the setting's, or the paper's default for the round
    size the run was started with (fixed: a round that shrinks must not spend more)."""
    if settings.dp_clip_count_stddev is not None:
        return settings.dp_clip_count_stddev
    return privacy.default_count_stddev(settings.round_sample_size(settings.workers))


def next_model(current: torch.Tensor, mean_change: torch.Tensor, contributors: int, settings: FederatedSettings, clip: float) -> torch.Tensor:
    """The mean model (P,) float32 from the mean change of the round's `contributors` (float64), with
    central DP's noise on their sum."""
    if settings.dp == "central":
        mean_change = privacy.noised_mean(mean_change * contributors, contributors, clip, noise_multiplier(settings)).to(torch.float64)
    return (current.to(torch.float64) + mean_change.to(current.device)).to(torch.float32)


def next_clip(settings: FederatedSettings, clip: float, under_clip: int, contributors: int) -> float:
    """The clip for the next round: adapted with --dp-adaptive-clip, else as it was."""
    if not settings.dp_adaptive_clip:
        return clip
    return privacy.next_clip(clip, under_clip, contributors, settings.dp_target_quantile, settings.dp_clip_lr, count_stddev(settings))


def central_mean_change(current: torch.Tensor, vectors: torch.Tensor, clip: float) -> torch.Tensor:
    """Central DP without secure aggregation: the mean (float64) of the workers' changes (K, P) -
    (P,), each clipped again on the server, so one worker's weight in the sum is bounded whatever it sent."""
    changes = vectors.to(torch.float64) - current.to(torch.float64)
    return torch.stack([privacy.clip_l2(change, clip)[0] for change in changes]).mean(0)


def plain_step(strategy: strategies.Strategy, state: strategies.StrategyState, current: torch.Tensor, vectors: torch.Tensor, samples: list[int],
               settings: FederatedSettings, clip: float) -> tuple[torch.Tensor, strategies.StrategyState]:
    """The strategy's step from the round's models (K, P) as they arrived: weighted by samples, or
    every worker the same under central or local DP, with central DP's noise on their sum."""
    if settings.dp == "central":
        mean = next_model(current, central_mean_change(current, vectors, clip), len(vectors), settings, clip)
        return strategy.step(current, mean[None], torch.ones(1, device=current.device), state)
    weights = torch.tensor([float(n) if dp_weighted(settings) else 1.0 for n in samples], device=current.device)
    return strategy.step(current, vectors, weights, state)


def secure_step(strategy: strategies.Strategy, state: strategies.StrategyState, current: torch.Tensor, aggregate: secagg.Aggregate, contributors: int,
                settings: FederatedSettings, clip: float) -> tuple[torch.Tensor, strategies.StrategyState]:
    """The strategy's step from a secure round's unmasked aggregate: its mean model is the one update
    the strategy sees (rules that need only the sum give the same step as from every model)."""
    mean = next_model(current, torch.from_numpy(aggregate.mean_delta), contributors, settings, clip)
    return strategy.step(current, mean[None], torch.ones(1, device=current.device), state)


def secure_input(encoding: secagg.Encoding, change: torch.Tensor, loss: float, samples: int, under_clip: bool, settings: PartitionSettings):  # noqa: ANN201 (np.ndarray)
    """A worker's input to a secure round: its change weighted by its samples (or 1 under central or local DP)."""
    return encoding.encode(change.detach().cpu().numpy(), loss, samples if dp_weighted(settings) else 1, under_clip)


def epsilon_after(settings: FederatedSettings, rates: list[float]) -> float | None:
    """The run's epsilon at --dp-delta after rounds in which each worker took part with the chance
    `rates` gives (one a round), for central and local DP (each worker's own accountant gives it
    for sample-level DP); None without --dp. Each round is one Gaussian mechanism on every worker's
    change (central: on their sum; local: on each). Central DP is amplified by the round's sampling
    rate, the secret draw's (`sample_workers`): that assumes who took part stays with the server,
    whose results and checkpoint name them. Local DP is not: the server sees each noised change and
    knows whose it is."""
    if settings.dp not in ("central", "local"):
        return None
    return privacy.epsilon_of_rounds(settings.dp_noise_multiplier, rates if settings.dp == "central" else [1.0] * len(rates), settings.dp_delta)


def sampling_rate(settings: FederatedSettings, candidates: int) -> float:
    """A worker's chance of taking part in a round drawn from `candidates` (the live workers)."""
    return min(1.0, settings.round_sample_size(settings.workers) / max(1, candidates))


def calibrate(model: nn.Sequential, statistics: list[calibration.ClassStatistics], settings: FederatedSettings) -> float:
    """CCVR after the last round: the last layer retrained in place on the pooled statistics.
    Returns the retraining's last epoch's mean loss."""
    return calibration.retrain_head(model, calibration.pool(statistics), settings.calibration_samples, settings.calibration_epochs,
                                    settings.calibration_lr, settings.batch_size, settings.seed)


def reference_run(
    settings: FederatedSettings, on_round: Callable[[RoundRecord], None] | None = None,
    on_calibrated: Callable[[RoundRecord], None] | None = None,
) -> tuple[nn.Module, list[RoundRecord]]:
    """Federated settings run as a plain loop: each round every worker (or those the server's
    sampler draws) trains in turn from the global model, then the same strategy object the
    server uses steps the global model, which is scored where --evaluate says: on the server's
    data, and/or by every worker on its own (`parties_figures` adds them up). With --calibration
    ccvr every worker then summarises its features under the final model and the last layer is
    retrained (`on_calibrated` gets the score); the model returned is the calibrated one."""
    task = Task(settings)
    server = server_context(settings)
    model = task.model(server)
    if settings.calibration == "ccvr":
        calibration.split_head(model)  # a model that cannot be calibrated fails now, not after the rounds
    names = list(model.state_dict())
    shares = worker_shares(task, settings, list(range(settings.workers)))
    test_data = evaluation_data(task, server) if server_scores(settings) else None
    workers = worker_ids(len(shares))
    parties_data = {workers[index]: evaluation_data(task, worker_context(settings, index)) for index in range(len(shares))} if parties_score(settings) else {}
    local = task.model(server)
    loss_of = task.loss(server)
    strategy = strategies.from_settings(settings)
    recipe, strategy_state = strategy.recipe, {}
    worker_controls = [zeros_like_state(model) for _ in shares] if recipe.control_variates else []

    def scored(step: int, train_loss: float, started: float) -> RoundRecord:
        """The global model as it is now, scored where --evaluate says."""
        parties = {worker: score(model, samples, settings.eval_batch_size, loss_of, task.compute) for worker, samples in parties_data.items()} or None
        if test_data is not None:
            own = score(model, test_data, settings.eval_batch_size, loss_of, task.compute)
            accuracy, loss = own.accuracy, own.loss
        else:
            figures = parties_figures(parties)
            accuracy, loss = figures["parties_accuracy"], figures["parties_loss"]
        return RoundRecord(step, accuracy, loss, train_loss, time.perf_counter() - started, parties)

    history = []
    clip = settings.dp_clip
    for round_number in range(1, settings.rounds + 1):
        started = time.perf_counter()
        unclipped = 0
        current = strategies.flatten(model.state_dict(), names)
        server_control = strategies.unflatten(strategy.control(current, strategy_state), model.state_dict(), names) if recipe.control_variates else None
        vectors, samples, losses, control_deltas, inputs = [], [], [], [], []
        drawn = set(sample_workers(workers, settings.round_sample_size(len(shares)), settings.seed, round_number))
        encoding = secagg.Encoding(settings.secagg_clip, settings.secagg_max_samples if dp_weighted(settings) else 1, len(drawn))
        for index, share in enumerate(shares):
            if workers[index] not in drawn:
                continue
            local.load_state_dict(model.state_dict())
            controls = (server_control, worker_controls[index]) if server_control is not None else None
            work = local_training(local, share, settings, round_seed(settings.seed, index, round_number), round_number, recipe, controls, loss_of, task.compute)
            trained = strategies.flatten(local.state_dict(), names)
            if not torch.isfinite(trained).all():  # the server refuses a non-finite update (and a worker sits a secure round out): left out
                continue
            losses.append(work.loss)
            samples.append(len(share))
            change, under_clip = private_change(trained - current, settings, clip)
            if settings.secure_aggregation != "none":  # the sum the masked inputs add up to, without the masks
                inputs.append(secure_input(encoding, change, work.loss, len(share), under_clip, settings))
            vectors.append(trained if settings.dp not in ("central", "local") else current + change)
            unclipped += under_clip
            if work.control is not None:
                control_deltas.append(strategies.flatten(work.control, names) - strategies.flatten(worker_controls[index], names))
                worker_controls[index] = work.control
        if inputs:
            aggregate = encoding.decode(secagg.plain_sum(inputs), len(inputs))
            combined, strategy_state = secure_step(strategy, strategy_state, current, aggregate, len(inputs), settings, clip)
        else:
            combined, strategy_state = plain_step(strategy, strategy_state, current, torch.stack(vectors), samples, settings, clip)  # (P,), (K, P) -> (P,)
        clip = next_clip(settings, clip, unclipped, len(vectors))
        if recipe.control_variates:
            strategy_state = strategy.next_control(torch.stack(control_deltas), len(shares), strategy_state)
        model.load_state_dict(strategies.unflatten(combined, model.state_dict(), names))
        history.append(scored(round_number, sum(losses) / len(losses), started))
        if on_round:
            on_round(history[-1])
    if settings.calibration == "ccvr":
        started = time.perf_counter()
        classes = len(server_classes(task, server, server_scores(settings)))
        # Rounded to float32 as they would travel, so the plain loop pools what the server gets.
        statistics = [calibration.ClassStatistics.from_tensors(calibration.feature_statistics(model, share, classes, settings.eval_batch_size).tensors())
                      for share in shares]
        record = scored(settings.rounds, calibrate(model, statistics, settings), started)
        if on_calibrated:
            on_calibrated(record)
    return model, history


def zeros_like_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
