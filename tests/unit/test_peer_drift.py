"""Decentralized peers under label skew: synchronising several times an epoch, and the drift
corrections (--prox-mu towards the last average, --lc-tau logit calibration by a peer's own label
counts). Each distributed run, over the in-memory transport with every peer a thread, equals its
one-process run (learning.peers); the corrections' maths against hand computations; and what
more synchronisation buys on skewed digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from splitfed.learning import data, objectives, peers
from splitfed.learning.settings import P2PSettings, SMPLSettings
from splitfed.learning.tasks import Task
from splitfed.scenarios import launch
from splitfed.scenarios.p2p import P2P, SMPL, PeerRun

DIGITS = dict(dataset="digits", batch_size=32, lr=3e-3)
CORRECTED = dict(prox_mu=0.05, lc_tau=1.0)  # both corrections at once: a path either takes that the one-process run does not shows


def records_of(result: dict) -> dict[str, list[tuple[float, float]]]:
    """Each peer's (accuracy, loss) after each epoch."""
    return {name: [(record["accuracy"], record["loss"]) for record in peer["history"]] for name, peer in result["peers"].items()}


def assert_same(distributed: list[tuple[float, float]], reference: list[tuple[float, float]]) -> None:
    assert len(distributed) == len(reference)
    for (accuracy, loss), (reference_accuracy, reference_loss) in zip(distributed, reference):
        assert accuracy == reference_accuracy and loss == pytest.approx(reference_loss, abs=1e-5)


def test_p2p_peers_that_wait_for_each_other_equal_the_one_process_run():
    """Three peers, classes 0-3/4-6/7-9, three synchronisations an epoch, both drift corrections,
    --sync-wait long enough that every model arrives: every peer's every epoch scores as the
    lock-step run's model."""
    settings = P2PSettings(**DIGITS, model="tiny", peers=3, epochs=2, partition="classes:0-3,4-6,7-9", syncs_per_epoch=3, sync_wait=60, **CORRECTED)
    reference = peers.in_memory_run(settings)
    result = launch.run(P2P, settings, PeerRun())
    expected = [(record["accuracy"], record["loss"]) for record in reference["history"]]
    for name, history in records_of(result).items():
        assert_same(history, expected)
    assert all(record["averaged"] == 2 * 3 for peer in result["peers"].values() for record in peer["history"])  # both others, at every synchronisation
    assert result["spread"] == 0.0


@pytest.mark.parametrize("start", ["source", "mean"])
def test_smpl_peers_in_global_rounds_equal_the_one_process_run(start):
    """Four peers, hyperedges of two, two hyperedges an epoch, both drift corrections, global
    rounds, each way of agreeing on the start: every peer's every epoch scores as the one-process
    run's (which draws the rounds as the tracker does)."""
    settings = SMPLSettings(**DIGITS, model="tiny", peers=4, hyperepochs=2, partition="classes:0-2,3-5,6-7,8-9", syncs_per_epoch=2,
                            hyperedge_size=2, async_global=False, async_local=False, start=start, **CORRECTED)
    reference = peers.smpl_in_memory_run(settings)
    result = launch.run(SMPL, settings, PeerRun())
    for name, history in records_of(result).items():
        assert_same(history, [(record["accuracy"], record["loss"]) for record in reference["peers"][name]])
    assert [len(peer["history"]) for peer in result["peers"].values()] == [2] * 4


def test_an_epoch_is_cut_into_consecutive_runs_of_batches():
    batches = [torch.tensor([index]) for index in range(10)]
    chunks = peers.sync_chunks(batches, 4)
    assert [len(chunk) for chunk in chunks] == [3, 3, 2, 2]
    assert [int(batch) for chunk in chunks for batch in chunk] == list(range(10))
    assert [len(chunk) for chunk in peers.sync_chunks(batches[:2], 3)] == [1, 1, 0]


def test_peers_that_average_the_same_models_hold_the_same_one_whatever_the_order_they_came_in():
    rng = np.random.default_rng(3)
    models = {name: {"w": (rng.normal(size=1000) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)} for name in "abcd"}
    settings = P2PSettings(peers=4)
    averages = []
    for own in "abcd":
        others = [peers.Received(name, 1, 10 + ord(name), models[name]) for name in "dcba" if name != own]
        average, kept, _ = peers.mix(peers.Received(own, 1, 10 + ord(own), models[own]), others, settings)
        assert len(kept) == 3
        averages.append(average["w"])
    assert all(np.array_equal(average, averages[0]) for average in averages)
    weights = np.array([10 + ord(name) for name in "abcd"], np.float64)
    by_hand = sum(weight * models[name]["w"].astype(np.float64) for name, weight in zip("abcd", weights)) / weights.sum()
    assert np.allclose(averages[0], by_hand, rtol=1e-5, atol=1e-4)  # float32 against float64


def test_the_local_loss_is_calibrated_by_the_peers_own_label_counts():
    """--lc-tau: the loss a peer trains on is cross-entropy of z_c - tau * n_c^(-1/4), n_c its
    count of class c (an absent class counts as 1), computed here in numpy."""
    settings = P2PSettings(**DIGITS, model="tiny", peers=3, partition="classes:0-3,4-6,7-9", lc_tau=1.5)
    learner = peers.learner(Task(settings), peers.peer_context(settings, "p2p-peer", 1), settings)
    counts = np.bincount(learner.share.labels.numpy(), minlength=10).astype(np.float64)
    assert counts[:4].sum() == counts[7:].sum() == 0 and counts[4:7].min() > 0
    logits = torch.randn(5, 10, dtype=torch.float32)
    labels = torch.tensor([4, 5, 6, 4, 0])
    shifted = logits.double().numpy() - 1.5 * np.maximum(counts, 1.0) ** -0.25
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    by_hand = -log_softmax[np.arange(5), labels.numpy()].mean()
    assert float(learner.local_loss(logits, labels)) == pytest.approx(by_hand, rel=1e-6)
    assert float(learner.loss_of(logits, labels)) != pytest.approx(by_hand, rel=1e-3)  # scores use the plain logits


def test_the_proximal_term_pulls_towards_the_last_synchronisation():
    """--prox-mu: mu/2 ||w - w_anchor||^2, whose gradient mu (w - w_anchor) an SGD step follows;
    the anchor moves when the peer synchronises."""
    model = nn.Linear(3, 2)
    proximal = objectives.Proximal(model, mu=0.5)
    anchor = [p.detach().clone().numpy() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    value = proximal()
    assert float(value.detach()) == pytest.approx(0.5 / 2 * sum(np.sum((p.detach().numpy() - a) ** 2) for p, a in zip(model.parameters(), anchor)), rel=1e-6)
    value.backward()
    for p, a in zip(model.parameters(), anchor):
        assert np.allclose(p.grad.numpy(), 0.5 * (p.detach().numpy() - a), atol=1e-6)
    proximal.anchor_here()
    assert float(proximal().detach()) == 0.0


def test_synchronising_often_with_logit_calibration_beats_once_an_epoch_under_label_skew():
    """Digits split 0-2/3-5/6-7/8-9 over four peers, two epochs: averaging once an epoch leaves a
    model that knows little beyond each peer's classes; eight synchronisations an epoch with
    --lc-tau learn the digits."""
    skewed = dict(**DIGITS, peers=4, epochs=2, partition="classes:0-2,3-5,6-7,8-9")
    once = peers.in_memory_run(P2PSettings(**skewed))
    often = peers.in_memory_run(P2PSettings(**skewed, syncs_per_epoch=8, lc_tau=1.0))
    assert often["accuracy"] > once["accuracy"] + 0.2, (once["accuracy"], often["accuracy"])
