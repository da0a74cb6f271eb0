"""The CUDA images (ci/images.sh --cuda: about 6 GB each, so `make test` builds none): what they
must hold. Not collected by `pytest tests` (its name is no test_*.py): ci/images.sh --cuda runs
it once the images are built, where a missing image fails."""

from __future__ import annotations

import subprocess

import pytest

from tests.images.test_images import TORCH_ROLES, TORCHVISION_MODELS, assert_starts_its_role, image, podman, run_in  # noqa: F401 (podman: the fixture)

CUDA = "-cuda"  # the tag suffix of the CUDA images (the chart's gpu.imageTagSuffix)


@pytest.fixture(scope="session")
def cuda_podman(podman) -> list[str]:  # noqa: F811 (the fixture imported above)
    """podman, where the -cuda images are built."""
    missing = [image(name, CUDA) for name in ("torch", *TORCH_ROLES) if subprocess.run([*podman, "image", "exists", image(name, CUDA)]).returncode != 0]
    assert not missing, f"the CUDA images are not built ({', '.join(missing)}): ci/images.sh --cuda"
    return podman


# torch's CUDA build with its libraries, and torchvision whole: its C++ operators load.
CUDA_BUILD = "import torch, torchvision.extension as e; assert torch.version.cuda and e._has_ops(), (torch.version.cuda, e._has_ops()); print('cuda')"


def test_cuda_image_carries_the_cuda_build_and_torchvision_whole(cuda_podman):
    result = run_in(cuda_podman, "torch", "-c", CUDA_BUILD, entrypoint="python", suffix=CUDA)
    assert result.returncode == 0 and result.stdout.strip() == "cuda", result.stdout + result.stderr
    result = run_in(cuda_podman, "torch", "-W", "error", "-c", TORCHVISION_MODELS, entrypoint="python", suffix=CUDA)
    assert result.returncode == 0 and result.stdout.strip() == "built", result.stdout + result.stderr


@pytest.mark.parametrize("name", TORCH_ROLES)
def test_cuda_role_images_start_their_role(cuda_podman, name):
    assert_starts_its_role(cuda_podman, name, CUDA)
