"""Every scenario `splitfed run` offers. Adding one is a module with its SCENARIO and an entry here."""

from __future__ import annotations

from splitfed.scenarios import centralized, fedavg, p2p, split, splitnn
from splitfed.scenarios.launch import Scenario

SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in (centralized.SCENARIO, split.SCENARIO, splitnn.SCENARIO, fedavg.SCENARIO, p2p.P2P, p2p.SMPL)}
