"""SecAgg+'s maths (learning.secagg) in one process: the graph, the shares, the quantisation's bound
against an exact float64 weighted mean, and whole rounds with and without dropouts, whose
unmasked sum must be the plain sum of the survivors' inputs bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.learning import secagg
from splitfed.learning.secagg import Encoding, MaskingParty, SecAggError


def test_neighbourhoods_are_a_symmetric_k_regular_graph():
    names = [f"worker-{i}" for i in range(11)]
    graph = secagg.neighbourhoods(names, 4, b"seed")
    assert all(len(graph[u]) == 4 and u not in graph[u] for u in names)
    assert all(u in graph[v] for u in names for v in graph[u])
    assert graph != secagg.neighbourhoods(names, 4, b"another seed")  # the ring's order is drawn
    assert secagg.neighbourhoods(names[:4], 3, b"seed") == {u: [v for v in names[:4] if v != u] for u in names[:4]}


def test_shares_give_the_secret_back_from_any_threshold_of_them_only():
    secret = bytes(range(32))
    shares = secagg.share(secret, 3, 5)
    assert secagg.combine({1: shares[0], 3: shares[2], 5: shares[4]}) == secret
    assert secagg.combine({2: shares[1], 4: shares[3]}) != secret  # two of threshold three: another polynomial's value


def test_decoded_mean_is_within_the_stated_bound_of_the_exact_weighted_mean():
    rng = np.random.default_rng(0)
    participants, size = 7, 20_000
    encoding = Encoding(clip=0.5, max_samples=1000, participants=participants)
    deltas = [rng.normal(0, 0.2, size) for _ in range(participants)]
    samples = [int(n) for n in rng.integers(100, 1000, participants)]
    losses = [float(v) for v in rng.uniform(0.1, 3.0, participants)]
    total = secagg.plain_sum([encoding.encode(d, loss, n, i % 2 == 0) for i, (d, loss, n) in enumerate(zip(deltas, losses, samples))])
    aggregate = encoding.decode(total, participants)
    exact = sum(n * np.clip(d, -0.5, 0.5) for d, n in zip(deltas, samples)) / sum(samples)  # float64, independently of the encoding
    error = np.abs(aggregate.mean_delta - exact).max()
    bound = encoding.bound(participants, sum(samples))
    assert error <= bound
    assert error > bound / 20  # the bound is not vacuous: the rounding does reach its order
    assert aggregate.samples == sum(samples) and aggregate.under_clip == 4
    assert aggregate.mean_loss == pytest.approx(sum(n * v for n, v in zip(samples, losses)) / sum(samples), abs=1e-5)


def test_the_sum_of_the_largest_inputs_does_not_wrap():
    encoding = Encoding(clip=1.0, max_samples=10, participants=5)
    total = secagg.plain_sum([encoding.encode(np.full(3, sign * 9.0), 0.0, 10, False) for sign in (-1, -1, -1, -1, -1)])
    assert np.allclose(encoding.decode(total, 5).mean_delta, -1.0, atol=encoding.bound(5, 50))


def run_round(names, k, t, inputs, drop_before_sharing=(), drop_after_sharing=(), context="run/1/a"):
    """A whole round between MaskingParty objects and an honest server, returning the unmasked sum."""
    graph = secagg.neighbourhoods(names, k, b"graph")
    parties = {u: MaskingParty(u, context, graph[u], t) for u in names}
    adverts = {u: parties[u].advertisement() for u in names}
    sharers = [u for u in names if u not in drop_before_sharing]
    boxes = {u: parties[u].sealed_shares({v: adverts[v][:2] for v in graph[u]}) for u in sharers}
    senders = [u for u in sharers if u not in drop_after_sharing]
    masked = {u: parties[u].masked(inputs[u], {v: boxes[v][u] for v in sharers if u in boxes[v]}) for u in senders}
    survivors, dropped = set(senders), set(sharers) - set(senders)
    seed_shares: dict[str, dict[int, bytes]] = {}
    key_shares: dict[str, dict[int, bytes]] = {}
    for v in senders:
        seeds, keys = parties[v].reveal(survivors, dropped)
        for u, held in seeds.items():
            seed_shares.setdefault(u, {})[held.index] = held.seed
        for u, held in keys.items():
            key_shares.setdefault(u, {})[held.index] = held.key
    total = secagg.plain_sum(list(masked.values()))
    return total, secagg.unmask(total, sorted(survivors), sorted(dropped), graph, {u: adverts[u][1] for u in sharers},
                                {u: adverts[u][2] for u in sharers}, seed_shares, key_shares, t, context)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(1)
    return {f"worker-{i}": rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32) for i in range(7)}


def test_masks_cancel_to_the_plain_sum(inputs):
    names = sorted(inputs)
    masked_total, unmasked = run_round(names, 4, 3, inputs)
    assert np.array_equal(unmasked, secagg.plain_sum(list(inputs.values())))
    assert not np.array_equal(masked_total, unmasked)  # the self masks were there until the server removed them


def test_a_worker_that_drops_after_sharing_is_unmasked_from_its_neighbours_shares(inputs):
    names = sorted(inputs)
    _, unmasked = run_round(names, 4, 3, inputs, drop_after_sharing=("worker-2",))
    assert np.array_equal(unmasked, secagg.plain_sum([inputs[u] for u in names if u != "worker-2"]))


def test_a_worker_that_drops_before_sharing_is_left_out(inputs):
    names = sorted(inputs)
    _, unmasked = run_round(names, 6, 4, inputs, drop_before_sharing=("worker-5",), drop_after_sharing=("worker-0",))
    assert np.array_equal(unmasked, secagg.plain_sum([inputs[u] for u in names if u not in ("worker-5", "worker-0")]))


def test_too_many_dropped_neighbours_leave_a_worker_unrecoverable(inputs):
    names = sorted(inputs)
    graph = secagg.neighbourhoods(names, 4, b"graph")
    victim = names[0]
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        run_round(names, 4, 3, inputs, drop_after_sharing=(victim, *graph[victim][:2]))


def test_a_party_never_reveals_both_secrets_of_a_neighbour_nor_twice():
    party = MaskingParty("worker-0", "c", ["worker-1", "worker-2"], 2)
    with pytest.raises(SecAggError, match="both secrets"):
        party.reveal({"worker-0", "worker-1"}, {"worker-1"})
    party.held = {}
    party.reveal({"worker-0"}, set())
    with pytest.raises(SecAggError, match="already"):
        party.reveal({"worker-0"}, set())


def test_a_sealed_share_opens_only_for_its_recipient_and_context():
    a, b = MaskingParty("worker-0", "c", ["worker-1"], 1), MaskingParty("worker-1", "c", ["worker-0"], 1)
    boxes = a.sealed_shares({"worker-1": b.advertisement()[:2]})
    b.keys = {"worker-0": a.advertisement()[:2]}
    tampered = boxes["worker-1"][:-1] + bytes([boxes["worker-1"][-1] ^ 1])
    with pytest.raises(SecAggError, match="does not open"):
        b.masked(np.zeros(4, np.uint32), {"worker-0": tampered})
    other = MaskingParty("worker-1", "another attempt", ["worker-0"], 1)
    other.cipher_key, other.keys = b.cipher_key, b.keys
    with pytest.raises(SecAggError, match="does not open"):
        other.masked(np.zeros(4, np.uint32), {"worker-0": boxes["worker-1"]})
    assert b.masked(np.zeros(4, np.uint32), {"worker-0": boxes["worker-1"]}).dtype == np.uint32


def test_a_wrong_share_is_caught_by_the_seed_commitment(inputs):
    names = sorted(inputs)[:3]
    graph = secagg.neighbourhoods(names, 2, b"graph")
    parties = {u: MaskingParty(u, "c", graph[u], 2) for u in names}
    adverts = {u: parties[u].advertisement() for u in names}
    boxes = {u: parties[u].sealed_shares({v: adverts[v][:2] for v in graph[u]}) for u in names}
    masked = {u: parties[u].masked(inputs[u], {v: boxes[v][u] for v in names if u in boxes[v]}) for u in names}
    seed_shares: dict[str, dict[int, bytes]] = {}
    for v in names:
        for u, held in parties[v].reveal(set(names), set())[0].items():
            seed_shares.setdefault(u, {})[held.index] = held.seed if v != "worker-1" else bytes(16)
    with pytest.raises(SecAggError, match="committed"):
        secagg.unmask(secagg.plain_sum(list(masked.values())), names, [], graph, {u: adverts[u][1] for u in names},
                      {u: adverts[u][2] for u in names}, seed_shares, {}, 2, "c")


REFUSALS = {  # settings -> what the one line says
    (("strategy", "median"),): "--strategy median needs each worker's update",
    (("strategy", "trimmed-mean"),): "--strategy trimmed-mean needs each worker's update",
    (("strategy", "krum"),): "--strategy krum needs each worker's update",
    (("strategy", "fedadam"), ("rule", "median")): "--rule median needs each worker's update",
    (("strategy", "scaffold"),): "--strategy scaffold needs each worker's control variate",
    (("calibration", "ccvr"),): "--calibration ccvr needs each worker's feature statistics",
    (("workers", 1), ("partition", "iid")): "at least 2 workers a round",
    (("workers", 9), ("partition", "iid"), ("secagg_neighbours", 9)): "--secagg-neighbours 9 is more than the 8 other workers",
    (("workers", 9), ("partition", "iid"), ("secagg_neighbours", 3)): "--secagg-neighbours 3 must be even",
    (("workers", 9), ("partition", "iid"), ("secagg_neighbours", 4), ("secagg_threshold", 2)): "--secagg-threshold 2 must be above k/2 = 2",
    (("workers", 9), ("partition", "iid"), ("secagg_neighbours", 4), ("secagg_threshold", 5)): "and at most k = 4",
}


@pytest.mark.parametrize("changes", sorted(REFUSALS), ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes))
def test_secure_aggregation_refuses_what_it_cannot_do_at_start(changes):
    from splitfed.learning.settings import FederatedSettings

    with pytest.raises(ValueError) as refused:
        FederatedSettings(**{"secure_aggregation": "secagg+", **dict(changes)})
    assert REFUSALS[changes] in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedlc", "fedrs", "fedbabu"])
def test_the_rules_that_need_only_the_sum_are_taken(strategy):
    from splitfed.learning.settings import FederatedSettings

    settings = FederatedSettings(secure_aggregation="secagg+", strategy=strategy, workers=100, partition="iid", clients_per_round=10)
    assert settings.secagg_graph(10) == (9, 5)  # 3 log2 10 > 9: every pair, as the original SecAgg
    assert FederatedSettings(secure_aggregation="secagg+", workers=100, partition="iid").secagg_graph(100) == (20, 11)


def test_a_round_smaller_than_the_run_takes_the_largest_graph_that_fits():
    from splitfed.learning.settings import FederatedSettings

    settings = FederatedSettings(workers=5, partition="iid", secure_aggregation="secagg+", secagg_neighbours=4, secagg_threshold=3)
    assert [settings.secagg_graph(n, fitted=True) for n in (5, 4, 3, 2)] == [(4, 3), (3, 3), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="more than the 2 other workers"):
        settings.secagg_graph(3)  # as the run's start checks it: the settings themselves must fit
