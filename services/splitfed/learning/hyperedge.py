"""The maths of SMPL hyperedges (groups of u peers that train together and then synchronise),
independent of how the messages travel. numpy only, so that it imports without torch.

Start agreement. When a hyperedge opens, its members agree on one start model s (`choose_start`
picks whose: the best by loss with probability epsilon, otherwise a random member) and move to it.

Deltas. Member i then trains; its delta is delta_i = trained_i - s. A peer may be in several
hyperedges at once while holding ONE model, so "trained - s" read off the model would also contain
the corrections other hyperedges applied in the meantime. `DeltaLedger` therefore measures delta_i
as the sum of i's OWN training steps since the hyperedge opened, and nothing else.

Correction. Member i sends own_sent_i (its delta, possibly sparsified) and, when the hyperedge
closes, ADDS to its current model

    correction_i = weighted_mean_j(own_sent_j) - own_sent_i.

With nothing else happening, model_i = s + delta_i becomes s + mean_j(delta_j): every member holds
the exact (sample-weighted) mean of the trained models. Subtracting instead of adding moves each
member away from the mean, which is the sign error the earlier system made.

Concurrency. Because the correction is added, not assigned, whatever else changed the model since
the hyperedge opened (another hyperedge's correction, later training steps) stays in it. Assigning
"model := mean of this hyperedge's trained models" would throw away every concurrent hyperedge's
contribution, which is the lost update the earlier system suffered.

Sparsification with error feedback. `sparsify` keeps the top-k entries of each tensor by magnitude.
The entries not sent (the residual delta_i - own_sent_i) are not subtracted from the model: since
the correction only replaces own_sent_i by the mean, the residual stays in member i's model, so no
local training is lost even though the others never saw it. Integer tensors (BatchNorm's
num_batches_tracked) are counters, not parameters: they are sent whole and combine by max, as in
`averaging.weighted_average`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np

from splitfed.learning.averaging import weighted_average

State = dict[str, np.ndarray]
Sparse = dict[str, tuple[np.ndarray | None, np.ndarray]]  # name -> (flat indices, or None for the whole tensor; values)
Layout = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype name, shape)


def layout_of(state: State) -> Layout:
    """The names, dtypes and shapes of a parameter set, which `densify` checks received data against."""
    return {name: (array.dtype.name, tuple(array.shape)) for name, array in state.items()}


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def _keep_count(sparsity: float, size: int) -> int:
    # The small tolerance keeps float noise ((1 - 0.7) * 10 == 3.0000000000000004) from keeping one more.
    return min(size, max(1, math.ceil((1.0 - sparsity) * size - 1e-9)))


def sparsify(delta: State, sparsity: float) -> Sparse:
    """Per tensor, the k = max(1, ceil((1 - sparsity) * size)) entries largest in magnitude, as
    (ascending int64 flat indices, values in the tensor's dtype). Equal magnitudes go to the lower
    index, so two peers sparsifying the same delta send the same thing. Integer tensors go whole."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), not {sparsity}")
    sparse = {}
    for name, array in delta.items():
        flat = np.ascontiguousarray(array).reshape(-1)
        if not _is_integer(flat.dtype) and not np.all(np.isfinite(flat)):
            raise ValueError(f"delta {name!r} has non-finite values")
        k = flat.size if _is_integer(flat.dtype) else _keep_count(sparsity, flat.size)
        if k == flat.size:
            indices = np.arange(flat.size, dtype=np.int64)
        else:
            # O(size): every entry above the k-th largest magnitude, then the lowest-index ties.
            magnitude = np.abs(flat)
            threshold = np.partition(magnitude, flat.size - k)[flat.size - k]
            above = np.flatnonzero(magnitude > threshold)
            ties = np.flatnonzero(magnitude == threshold)[: k - above.size]
            indices = np.sort(np.concatenate([above, ties])).astype(np.int64)
        sparse[name] = (indices, flat[indices].copy())
    return sparse


def densify(sparse: Sparse, layout: Layout) -> State:
    """Dense arrays (zeros where nothing was sent) from `sparse`, which may come from a peer and is
    checked against `layout` first: anything malformed raises ValueError rather than corrupting the
    model or being silently clipped by numpy indexing."""
    if set(sparse) != set(layout):
        missing, extra = sorted(set(layout) - set(sparse)), sorted(set(sparse) - set(layout))
        raise ValueError(f"sparse tensors do not match the layout: missing {missing}, unexpected {extra}")
    dense = {}
    for name, (dtype_name, shape) in layout.items():
        indices, values = sparse[name]
        dtype, size = np.dtype(dtype_name), math.prod(shape)
        if indices is None:  # sent whole
            if not isinstance(values, np.ndarray) or values.shape != (size,):
                raise ValueError(f"{name!r}: a tensor sent whole has {size} values")
            indices = np.arange(size, dtype=np.int64)
        if not isinstance(indices, np.ndarray) or indices.dtype != np.int64 or indices.ndim != 1:
            raise ValueError(f"{name!r}: indices must be a 1-D int64 array")
        if not isinstance(values, np.ndarray) or values.dtype != dtype or values.ndim != 1:
            raise ValueError(f"{name!r}: values must be a 1-D {dtype.name} array")
        if values.size != indices.size:
            raise ValueError(f"{name!r}: {values.size} values for {indices.size} indices")
        if indices.size and (indices[0] < 0 or indices[-1] >= size):
            raise ValueError(f"{name!r}: indices out of range for {size} entries")
        if np.any(np.diff(indices) <= 0):
            raise ValueError(f"{name!r}: indices must be strictly increasing (no duplicates)")
        if not _is_integer(dtype) and not np.all(np.isfinite(values)):
            raise ValueError(f"{name!r}: non-finite values")
        flat = np.zeros(size, dtype=dtype)
        flat[indices] = values
        dense[name] = flat.reshape(shape)
    return dense


def to_wire(sparse: Sparse) -> State:
    """Flat tensors for a tensor file: NAME/indices and NAME/values, or NAME/values alone for a
    tensor sent whole (its indices would be 0..size-1: twice the bytes of float32 values, for nothing)."""
    wire = {}
    for name, (indices, values) in sparse.items():
        if not (indices.size and indices[-1] == indices.size - 1):  # strictly increasing from 0: the last is size - 1 only if all are there
            wire[f"{name}/indices"] = indices
        wire[f"{name}/values"] = values
    return wire


def largest_wire(layout: Layout, sparsity: float) -> Layout:
    """The flat tensors `to_wire(sparsify(delta, sparsity))` sends for a delta of `layout` at their
    largest: a tensor cut to its top k as NAME/indices and NAME/values of k entries, one kept whole
    (an integer tensor, or k the whole size) as NAME/values alone."""
    wire = {}
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape)
        kept = size if _is_integer(np.dtype(dtype)) else _keep_count(sparsity, size)
        if kept < size:
            wire[f"{name}/indices"] = ("int64", (kept,))
        wire[f"{name}/values"] = (dtype, (kept,))
    return wire


def from_wire(tensors: State) -> Sparse:
    """The inverse of `to_wire`: every name must be NAME/values, with or without its NAME/indices
    (without: the tensor whole, which `densify` holds to its size)."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        name, _, part = key.rpartition("/")
        if not name or part not in ("indices", "values"):
            raise ValueError(f"{key!r} is neither NAME/indices nor NAME/values")
        parts.setdefault(name, {})[part] = array
    unpaired = sorted(name for name, pair in parts.items() if "values" not in pair)
    if unpaired:
        raise ValueError(f"indices without values: {unpaired}")
    return {name: (pair.get("indices"), pair["values"]) for name, pair in parts.items()}


def draw_members(waiting: list[str], size: int, rng: random.Random, acceptable: Callable[[list[str]], bool], tries: int) -> list[str] | None:
    """`size` of the `waiting` peers: the first of them (the longest waiting) and size - 1 others
    drawn at random, redrawn up to `tries` times until `acceptable`; None if no draw was."""
    first, *others = waiting
    for _ in range(tries):
        members = [first, *rng.sample(sorted(others), size - 1)]
        if acceptable(members):
            return members
    return None


def choose_start(losses: dict[str, float], epsilon: float, rng: random.Random) -> str:
    """Whose model a hyperedge starts from: with probability epsilon the member with the lowest
    loss (ties: the lowest name; NaN counts as worst), otherwise a uniformly random member. Members
    are sorted first, so the answer depends only on the rng state and the members, not dict order."""
    if not losses:
        raise ValueError("a hyperedge needs members")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], not {epsilon}")
    members = sorted(losses)
    if rng.random() < epsilon:
        return min(members, key=lambda m: (math.isnan(losses[m]), losses[m], m))
    return rng.choice(members)


def _check_names(state: State, layout: Layout, what: str) -> None:
    if set(state) != set(layout) or any(state[n].shape != tuple(shape) for n, (_, shape) in layout.items()):
        raise ValueError(f"{what} does not match the hyperedge's tensor names and shapes")


class DeltaLedger:
    """One peer's own training change per open hyperedge, so that a peer in several hyperedges at
    once sends each only what it trained since that hyperedge opened, and applies each one's
    result additively (see the module docstring). Accumulates in float64 (int64 for counters)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Layout, State]] = {}

    @property
    def edges(self) -> tuple[str, ...]:
        """The hyperedges now open."""
        return tuple(self._open)

    def open(self, edge: str, layout: Layout) -> None:
        """Start accumulating for `edge`, from zero (the peer has just moved to the agreed start)."""
        if edge in self._open:
            raise ValueError(f"hyperedge {edge!r} is already open")
        zeros = {n: np.zeros(shape, np.int64 if _is_integer(np.dtype(d)) else np.float64) for n, (d, shape) in layout.items()}
        self._open[edge] = (dict(layout), zeros)

    def record(self, step_change: State) -> None:
        """A local training step changed the model by `step_change`: count it for every open edge.
        Corrections applied by closing hyperedges must NOT be recorded: they are not own training."""
        for layout, accumulated in self._open.values():
            _check_names(step_change, layout, "step change")
            for name, change in step_change.items():
                accumulated[name] += change

    def own(self, edge: str) -> State:
        """This peer's own change since `edge` opened, in the layout's dtypes: its delta to send."""
        layout, accumulated = self._edge(edge)
        return {n: accumulated[n].astype(np.dtype(d)) for n, (d, _) in layout.items()}

    def close(self, edge: str, own_sent: State, member_deltas: list[State], weights: list[float]) -> State:
        """The correction to ADD to the current model: weighted_mean(member_deltas) - own_sent.
        `member_deltas` holds every member's (densified) delta, this peer's `own_sent` among them,
        and `weights` one per entry (sample counts). Float tensors are combined in float64; integer
        ones by max. The edge is then forgotten."""
        layout, _ = self._edge(edge)
        _check_names(own_sent, layout, "own_sent")
        for delta in member_deltas:
            _check_names(delta, layout, "a member delta")
        if not any(all(np.array_equal(d[n], own_sent[n]) for n in layout) for d in member_deltas):
            raise ValueError("member_deltas must include this peer's own_sent")
        wide = [{n: a if _is_integer(a.dtype) else a.astype(np.float64) for n, a in d.items()} for d in member_deltas]
        mean = weighted_average(wide, weights)
        correction = {}
        for name, (dtype_name, _) in layout.items():
            dtype = np.dtype(dtype_name)
            wider = np.int64 if _is_integer(dtype) else np.float64
            correction[name] = (mean[name].astype(wider) - own_sent[name].astype(wider)).astype(dtype)
        del self._open[edge]
        return correction

    def discard(self, edge: str) -> None:
        """Forget `edge` without a correction (the hyperedge was aborted); unknown edges are ignored."""
        self._open.pop(edge, None)

    def _edge(self, edge: str) -> tuple[Layout, State]:
        if edge not in self._open:
            raise KeyError(f"hyperedge {edge!r} is not open")
        return self._open[edge]
