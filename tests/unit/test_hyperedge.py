"""SMPL hyperedge maths: exact averaging, no lost update across concurrent hyperedges, additive
(not subtracted) corrections, top-k sparsification with the residual kept locally, hostile wire
input, and the choice of start model."""

from __future__ import annotations

import random

import numpy as np
import pytest
from splitfed.learning.hyperedge import (
    DeltaLedger,
    choose_start,
    densify,
    from_wire,
    largest_wire,
    layout_of,
    sparsify,
    to_wire,
)

COUNTER = "bn.num_batches_tracked"


def start_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "fc.bias": rng.normal(size=5).astype(np.float32),
        COUNTER: np.array(7, dtype=np.int64),
    }


def random_step(rng: np.random.Generator, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        n: np.array(1, dtype=a.dtype) if a.dtype == np.int64 else (0.1 * rng.normal(size=a.shape)).astype(a.dtype)
        for n, a in model.items()
    }


def train(model: dict, ledger: DeltaLedger, rng: np.random.Generator, steps: int) -> list[dict]:
    """Local training: change the model in place and record each step in the ledger."""
    taken = []
    for _ in range(steps):
        step = random_step(rng, model)
        for n, value in model.items():
            model[n] = value + step[n]
        ledger.record(step)
        taken.append(step)
    return taken


def add(model: dict, correction: dict) -> dict:
    return {n: model[n] + correction[n] for n in model}


def close_enough(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.allclose(a[n], b[n], atol=1e-6) for n in a)


def mean_of(models: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    out = {n: sum(w / total * m[n].astype(np.float64) for m, w in zip(models, weights)) for n in models[0] if n != COUNTER}
    out[COUNTER] = max(m[COUNTER] for m in models)
    return out


def synchronise(edge: str, models: dict, ledgers: dict, weights: dict, sparsity: float = 0.0) -> dict:
    """Every member sends its (sparsified) own delta through the wire format; returns what each sent."""
    layout = layout_of(next(iter(models.values())))
    sent = {p: densify(from_wire(to_wire(sparsify(ledgers[p].own(edge), sparsity))), layout) for p in models}
    members = sorted(models)
    for p in members:
        correction = ledgers[p].close(edge, sent[p], [sent[q] for q in members], [weights[q] for q in members])
        models[p] = add(models[p], correction)
    return sent


# (a) exact average, and the sign of the correction


@pytest.mark.parametrize("weights", [{"A": 1, "B": 1, "C": 1}, {"A": 100, "B": 300, "C": 50}])
def test_members_end_at_the_exact_weighted_mean(weights):
    rng = np.random.default_rng(1)
    s = start_model()
    models = {p: {n: a.copy() for n, a in s.items()} for p in "ABC"}
    ledgers = {p: DeltaLedger() for p in "ABC"}
    for steps, p in zip((3, 5, 2), "ABC"):
        ledgers[p].open("E", layout_of(s))
        train(models[p], ledgers[p], rng, steps)
    trained = {p: {n: a.copy() for n, a in m.items()} for p, m in models.items()}
    expected = mean_of([trained[p] for p in "ABC"], [weights[p] for p in "ABC"])
    assert not close_enough(trained["A"], expected)  # training did move them apart

    synchronise("E", models, ledgers, weights)

    for p in "ABC":
        assert close_enough(models[p], expected)
        assert models[p][COUNTER] == 7 + 5  # counters take the max, not a mean
        assert ledgers[p].edges == ()


def test_corrections_are_added_not_subtracted():
    rng = np.random.default_rng(2)
    s = start_model()
    models = {p: {n: a.copy() for n, a in s.items()} for p in "AB"}
    ledgers = {p: DeltaLedger() for p in "AB"}
    for p in "AB":
        ledgers[p].open("E", layout_of(s))
        train(models[p], ledgers[p], rng, 3)
    expected = mean_of(list(models.values()), [1, 1])
    sent = {p: ledgers[p].own("E") for p in "AB"}
    correction = ledgers["A"].close("E", sent["A"], [sent["A"], sent["B"]], [1, 1])
    assert close_enough(add(models["A"], correction), expected)
    subtracted = {n: models["A"][n] - correction[n] for n in models["A"]}
    assert not close_enough(subtracted, expected)


# (b) concurrent hyperedges: no lost update


def test_concurrent_hyperedges_keep_each_others_updates():
    rng = np.random.default_rng(3)
    s1 = start_model()
    layout = layout_of(s1)
    P, lp = {n: a.copy() for n, a in s1.items()}, DeltaLedger()
    Q, lq = {n: a.copy() for n, a in s1.items()}, DeltaLedger()  # E1 = {P, Q} starts from P's model
    lp.open("E1", layout)
    lq.open("E1", layout)
    x1 = train(P, lp, rng, 2)  # P alone in E1
    s2 = {n: a.copy() for n, a in P.items()}
    R, lr = {n: a.copy() for n, a in s2.items()}, DeltaLedger()  # E2 = {P, R} starts from P's current model
    lp.open("E2", layout)
    lr.open("E2", layout)
    x2 = train(P, lp, rng, 3)  # P in both
    q = train(Q, lq, rng, 4)
    r = train(R, lr, rng, 2)

    def total(steps):
        return {n: sum(np.asarray(st[n], np.float64) for st in steps) for n in layout if n != COUNTER}

    X1, X2, Qd, Rd = total(x1), total(x2), total(q), total(r)
    assert close_enough(lp.own("E1"), {**{n: X1[n] + X2[n] for n in X1}, COUNTER: 5})
    assert close_enough(lp.own("E2"), {**X2, COUNTER: 3})  # E1's history is not E2's delta

    # E1 closes while E2 is still open.
    sent_p1, sent_q = lp.own("E1"), lq.own("E1")
    c1 = lp.close("E1", sent_p1, [sent_p1, sent_q], [1, 1])
    P = add(P, c1)
    Q = add(Q, lq.close("E1", sent_q, [sent_p1, sent_q], [1, 1]))
    assert close_enough(P, Q)  # E1 alone is an exact average
    assert lp.edges == ("E2",)
    x3 = train(P, lp, rng, 2)  # P keeps training inside E2
    X3 = total(x3)

    # E2 closes.
    sent_p2, sent_r = lp.own("E2"), lr.own("E2")
    assert close_enough(sent_p2, {**{n: X2[n] + X3[n] for n in X2}, COUNTER: 5})  # c1 was not recorded
    c2 = lp.close("E2", sent_p2, [sent_p2, sent_r], [1, 1])
    P = add(P, c2)
    R = add(R, lr.close("E2", sent_r, [sent_p2, sent_r], [1, 1]))

    # By hand: start + all of P's own steps + (mean - own) of each hyperedge.
    hand_c1 = {n: (X1[n] + X2[n] + Qd[n]) / 2 - (X1[n] + X2[n]) for n in X1}
    hand_c2 = {n: (X2[n] + X3[n] + Rd[n]) / 2 - (X2[n] + X3[n]) for n in X1}
    by_hand = {n: s1[n] + X1[n] + X2[n] + X3[n] + hand_c1[n] + hand_c2[n] for n in X1}
    assert close_enough({n: P[n] for n in X1}, by_hand)
    assert P[COUNTER] == R[COUNTER] == 7 + 2 + 3 + 2  # counters: max of deltas, so P's own steps
    # Q's contribution from E1 survived E2: P sits exactly E1's correction away from R.
    assert close_enough({n: P[n] - R[n] for n in X1}, hand_c1)

    # An overwriting implementation (model := mean of E2's trained models) loses E1's update.
    trained_p = {n: s2[n] + X2[n] + X3[n] for n in X1}
    overwritten = {n: (trained_p[n] + s2[n] + Rd[n]) / 2 for n in X1}
    assert not close_enough({n: P[n] for n in X1}, overwritten)
    assert close_enough({n: P[n] - overwritten[n] for n in X1}, hand_c1)


# (c) sparsification


def test_sparsify_keeps_exactly_the_k_largest():
    rng = np.random.default_rng(4)
    delta = {"w": rng.normal(size=(40, 25)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    sparse = sparsify(delta, 0.9)
    for name, k in (("w", 100), ("b", 1)):
        indices, values = sparse[name]
        assert indices.dtype == np.int64 and values.dtype == np.float32 and indices.size == k
        assert np.all(np.diff(indices) > 0)
        flat = delta[name].reshape(-1)
        assert np.array_equal(values, flat[indices])
        dropped = np.delete(np.abs(flat), indices)
        assert dropped.size == 0 or np.abs(values).min() >= dropped.max()
        assert set(indices) == set(np.argsort(-np.abs(flat), kind="stable")[:k])


def test_sparsify_counts_ties_and_edges():
    ties = {"t": np.array([1, -1, 1, -1, 1, -1], dtype=np.float32)}
    assert sparsify(ties, 0.5)["t"][0].tolist() == [0, 1, 2]  # equal magnitudes: lower indices
    assert sparsify({"x": np.arange(10, dtype=np.float32)}, 0.7)["x"][0].tolist() == [7, 8, 9]  # not 4 from float noise
    assert sparsify({"x": np.ones(1, np.float32)}, 0.99)["x"][0].tolist() == [0]  # at least one
    whole = sparsify({"x": np.arange(5, dtype=np.float32), COUNTER: np.array(3, np.int64)}, 0.0)
    assert whole["x"][0].tolist() == [0, 1, 2, 3, 4]
    assert sparsify({COUNTER: np.array([3, 4], np.int64)}, 0.9)[COUNTER][0].tolist() == [0, 1]  # counters go whole
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="sparsity"):
            sparsify(ties, bad)
    with pytest.raises(ValueError, match="non-finite"):
        sparsify({"x": np.array([1.0, np.nan], np.float32)}, 0.0)


def test_wire_round_trip_reconstructs_the_kept_entries():
    rng = np.random.default_rng(5)
    delta = {"w": rng.normal(size=(8, 16)).astype(np.float32), COUNTER: np.array(2, np.int64)}
    sparse = sparsify(delta, 0.9)
    wire = to_wire(sparse)
    assert set(wire) == {"w/indices", "w/values", f"{COUNTER}/values"}  # the counter goes whole: its values alone
    dense = densify(from_wire(wire), layout_of(delta))
    kept = sparse["w"][0]
    assert dense["w"].dtype == np.float32 and dense["w"].shape == (8, 16)
    assert np.array_equal(dense["w"].reshape(-1)[kept], delta["w"].reshape(-1)[kept])
    assert np.count_nonzero(dense["w"]) == kept.size == 13
    assert dense[COUNTER] == 2
    whole = to_wire(sparsify(delta, 0.0))
    assert set(whole) == {"w/values", f"{COUNTER}/values"}  # nothing left out: no indices travel
    exact = densify(from_wire(whole), layout_of(delta))
    assert all(np.array_equal(exact[n], delta[n]) for n in delta)


def test_sparse_sync_keeps_the_untransmitted_residual_locally():
    rng = np.random.default_rng(6)
    s = {"w": rng.normal(size=(20, 10)).astype(np.float32), "b": rng.normal(size=30).astype(np.float32)}
    models = {p: {n: a.copy() for n, a in s.items()} for p in "AB"}
    ledgers = {p: DeltaLedger() for p in "AB"}
    for p in "AB":
        ledgers[p].open("E", layout_of(s))
        train(models[p], ledgers[p], rng, 3)
    own = {p: ledgers[p].own("E") for p in "AB"}
    sent = synchronise("E", models, ledgers, {"A": 2, "B": 1}, sparsity=0.9)
    for p in "AB":
        assert np.count_nonzero(sent[p]["w"]) == 20 and np.count_nonzero(sent[p]["b"]) == 3
        for n, start in s.items():
            residual = own[p][n] - sent[p][n]
            mean = (2 * sent["A"][n] + sent["B"][n]) / 3
            assert np.allclose(models[p][n], start + residual + mean, atol=1e-6)
            assert np.count_nonzero(residual) == residual.size - np.count_nonzero(sent[p][n])


# (d) hostile input


def hostile_cases():
    layout = {"w": ("float32", (2, 3))}
    good = (np.array([0, 4], np.int64), np.array([1.0, 2.0], np.float32))
    yield "match", {"w": good, "extra": good}, layout
    yield "match", {}, layout
    yield "int64", {"w": (np.array([0, 4], np.int32), good[1])}, layout
    yield "int64", {"w": (np.array([[0, 4]], np.int64), good[1])}, layout
    yield "int64", {"w": ([0, 4], good[1])}, layout
    yield "float32", {"w": (good[0], np.array([1.0, 2.0], np.float64))}, layout
    yield "2 values for 1", {"w": (np.array([0], np.int64), good[1])}, layout
    yield "out of range", {"w": (np.array([0, 6], np.int64), good[1])}, layout
    yield "out of range", {"w": (np.array([-1, 4], np.int64), good[1])}, layout
    yield "strictly increasing", {"w": (np.array([4, 4], np.int64), good[1])}, layout
    yield "strictly increasing", {"w": (np.array([4, 0], np.int64), good[1])}, layout
    yield "non-finite", {"w": (good[0], np.array([1.0, np.inf], np.float32))}, layout
    yield "non-finite", {"w": (good[0], np.array([np.nan, 1.0], np.float32))}, layout
    yield "sent whole has 6 values", {"w": (None, good[1])}, layout
    yield "sent whole has 6 values", {"w": (None, np.zeros((2, 3), np.float32))}, layout
    yield "float32", {"w": (None, np.zeros(6, np.float64))}, layout
    yield "non-finite", {"w": (None, np.full(6, np.nan, np.float32))}, layout


@pytest.mark.parametrize(("message", "sparse", "layout"), list(hostile_cases()))
def test_densify_rejects_hostile_input(message, sparse, layout):
    with pytest.raises(ValueError, match=message):
        densify(sparse, layout)


def test_densify_accepts_the_good_case_and_empty_tensors():
    dense = densify({"w": (np.array([0, 4], np.int64), np.array([1.0, 2.0], np.float32))}, {"w": ("float32", (2, 3))})
    assert dense["w"].tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    assert densify({"e": (np.zeros(0, np.int64), np.zeros(0, np.float32))}, {"e": ("float32", (0,))})["e"].shape == (0,)


@pytest.mark.parametrize(
    "tensors",
    [
        {"w/indices": np.zeros(1, np.int64)},
        {"w/indices": np.zeros(1, np.int64), "v/values": np.zeros(1, np.float32)},
        {"w/indices": np.zeros(1, np.int64), "w/values": np.zeros(1), "w/extra": np.zeros(1)},
        {"w": np.zeros(1)},
        {"/values": np.zeros(1), "/indices": np.zeros(1, np.int64)},
    ],
)
def test_from_wire_rejects_names_that_are_not_values_with_or_without_indices(tensors):
    with pytest.raises(ValueError):
        from_wire(tensors)


# (e) choice of the start model


def test_choose_start():
    losses = {"c": 0.5, "a": 0.9, "b": 0.5, "d": 2.0}
    rng = random.Random(0)
    assert {choose_start(losses, 1.0, rng) for _ in range(50)} == {"b"}  # lowest loss, then lowest name
    assert {choose_start(losses, 0.0, rng) for _ in range(400)} == set(losses)
    shuffled = dict(reversed(list(losses.items())))
    draws = [choose_start(losses, 0.3, random.Random(7)) for _ in range(3)]
    assert draws == [choose_start(shuffled, 0.3, random.Random(7)) for _ in range(3)]
    first, second = random.Random(11), random.Random(11)
    assert [choose_start(losses, 0.3, first) for _ in range(30)] == [choose_start(shuffled, 0.3, second) for _ in range(30)]
    assert choose_start({"a": float("nan"), "b": 3.0}, 1.0, rng) == "b"
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="epsilon"):
            choose_start(losses, bad, rng)
    with pytest.raises(ValueError):
        choose_start({}, 0.5, rng)


# ledger bookkeeping


def test_ledger_bookkeeping_errors():
    s = start_model()
    ledger = DeltaLedger()
    ledger.open("E", layout_of(s))
    with pytest.raises(ValueError, match="already open"):
        ledger.open("E", layout_of(s))
    with pytest.raises(ValueError, match="names and shapes"):
        ledger.record({"fc.weight": np.zeros((6, 5), np.float32)})
    with pytest.raises(KeyError):
        ledger.own("other")
    zero = ledger.own("E")
    other = {n: a + 1 for n, a in zero.items()}
    with pytest.raises(ValueError, match="own_sent"):
        ledger.close("E", zero, [other], [1])  # own delta missing from the members
    with pytest.raises(ValueError, match="weights"):
        ledger.close("E", zero, [zero, other], [1])
    ledger.discard("E")
    ledger.discard("E")  # forgetting twice is harmless
    assert ledger.edges == ()
    with pytest.raises(KeyError):
        ledger.close("E", zero, [zero], [1])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999])
def test_largest_wire_is_what_a_sparsified_change_sends_at_most(sparsity):
    """Every tensor `to_wire(sparsify(...))` makes of a random change has the dtype and shape
    `largest_wire` gives it; what it leaves out is only the indices of a tensor whose kept entries
    happen to be its first ones (sent as values alone). An integer tensor goes whole."""
    rng = np.random.default_rng(5)
    delta = {"w": rng.standard_normal((7, 11)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32),
             "scalar": np.float32(rng.standard_normal()).reshape(()), "count": np.array(4, dtype=np.int64)}
    sent, largest = to_wire(sparsify(delta, sparsity)), largest_wire(layout_of(delta), sparsity)
    assert {name: largest[name] for name in sent} == layout_of(sent)
    for name in set(largest) - set(sent):
        assert name.endswith("/indices") and largest[name][1] == sent[name.replace("/indices", "/values")].shape
    assert "count/indices" not in largest and largest["count/values"] == ("int64", (1,))
    assert ("w/indices" in largest) == (sparsity > 0)
