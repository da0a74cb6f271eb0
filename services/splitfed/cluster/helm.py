"""The helm binary, run as a subprocess: `upgrade --install` and `uninstall`, each failure one line.

helm is found as SPLITFED_HELM, else `helm` on PATH, else the repository's .tools/bin/helm (where
ci/chart.sh installs helm 3.19). The chart is --chart, else SPLITFED_CHART, else helm/splitfed of
the repository this package runs from: the chart is not part of the Python package, so an
installed wheel needs --chart (a path, or a chart reference helm understands)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # services/splitfed/cluster/helm.py -> the repository
REPO_CHART = REPO / "helm" / "splitfed"
REPO_HELM = REPO / ".tools" / "bin" / "helm"
TIMEOUT_SECONDS = 300.0  # helm without --wait only creates objects; this is generous


class HelmError(RuntimeError):
    """helm is missing or failed; the message is one line."""


class ReleaseNotFound(HelmError):
    pass


def find_helm() -> str:
    given = os.environ.get("SPLITFED_HELM")
    if given:
        if not (shutil.which(given) or Path(given).is_file()):
            raise HelmError(f"SPLITFED_HELM={given}: no such program")
        return given
    found = shutil.which("helm") or (str(REPO_HELM) if REPO_HELM.is_file() else None)
    if not found:
        raise HelmError("helm not found: install helm 3 (https://helm.sh/docs/intro/install/), put it on PATH or set SPLITFED_HELM")
    return found


def find_chart(given: str | None) -> str:
    chart = given or os.environ.get("SPLITFED_CHART")
    if chart:
        return chart  # a path or a reference (repo/chart, oci://...): helm says if it is not one
    if (REPO_CHART / "Chart.yaml").is_file():
        return str(REPO_CHART)
    raise HelmError(f"no chart at {REPO_CHART} (the chart ships with the splitfed repository, not the Python package): "
                    "give --chart PATH to helm/splitfed of a checkout, or a chart reference")


def last_line(text: str) -> str:
    """helm's error as one line: from its last "Error:" line to the end (a schema error lists
    each bad value on a line of its own), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    starts = [index for index, line in enumerate(lines) if line.startswith("Error:")]
    return " ".join(lines[starts[-1]:] if starts else lines[-1:])[:1000] or "no output"


@dataclass
class Helm:
    """helm for one cluster context; `binary` found by find_helm unless given."""

    kube_context: str | None = None
    binary: str = field(default_factory=find_helm)

    def _run(self, args: Sequence[str], what: str) -> subprocess.CompletedProcess:
        argv = [self.binary, *args, *(["--kube-context", self.kube_context] if self.kube_context else [])]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HelmError(f"helm {what} did not finish within {TIMEOUT_SECONDS:.0f}s") from None
        except OSError as exc:
            raise HelmError(f"helm {what}: cannot run {self.binary}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            line = last_line(done.stderr or done.stdout)
            if "not found" in line and what == "uninstall":
                raise ReleaseNotFound(line)
            raise HelmError(f"helm {what} failed: {line.removeprefix('Error: ')}")
        return done

    @staticmethod
    def install_args(release: str, chart: str, namespace: str, values_file: Path, values: Sequence[str] = (), sets: Sequence[str] = (),
                     dry_run: bool = False) -> list[str]:
        """`helm upgrade --install`: launch's values file first, then the user's -f files, then
        --set (later ones win, as helm merges them)."""
        args = ["upgrade", "--install", release, chart, "--namespace", namespace, "--create-namespace", "-f", str(values_file)]
        for path in values:
            args += ["-f", str(path)]
        for assignment in sets:
            args += ["--set", assignment]
        if dry_run:
            args.append("--dry-run=client")
        return args

    def upgrade_install(self, *args, **kwargs) -> str:
        """Install or upgrade; helm's output (with --dry-run: the rendered manifests)."""
        return self._run(self.install_args(*args, **kwargs), "upgrade --install").stdout

    def uninstall(self, release: str, namespace: str) -> str:
        return self._run(["uninstall", release, "--namespace", namespace], "uninstall").stdout
