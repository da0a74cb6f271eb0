"""Validate rendered manifests with `kubernetes-validate --strict` against one Kubernetes version.
Kinds given with --skip-kinds (CustomResourceDefinitions' kinds, which have no offline schema) are
left out and listed, so a skip is never silent.

    python ci/validate_manifests.py --kube-version 1.30.0 --skip-kinds "PodMonitor ServiceMonitor PrometheusRule" rendered.yaml
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", required=True)
    parser.add_argument("--skip-kinds", default="", help="space-separated kinds not to validate")
    parser.add_argument("manifest", type=Path)
    args = parser.parse_args()
    skip = set(args.skip_kinds.split())
    documents = [doc for doc in yaml.safe_load_all(args.manifest.read_text()) if doc]
    kept = [doc for doc in documents if doc.get("kind") not in skip]
    for doc in documents:
        if doc.get("kind") in skip:
            print(f"      skipped (CRD, no offline schema): {doc['kind']}/{doc['metadata']['name']}")
    if not kept:
        print("no objects to validate", file=sys.stderr)
        return 1
    validator = Path(sys.executable).with_name("kubernetes-validate")
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, doc in enumerate(kept):
            path = Path(folder) / f"{number:03d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(doc))
            paths.append(str(path))
        result = subprocess.run([str(validator), "--strict", "--quiet", "-k", args.kube_version, *paths],
                                capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if output:
        print(output)
    print(f"      {len(kept)} objects validated against Kubernetes {args.kube_version}: "
          f"{'ok' if result.returncode == 0 else 'FAILED'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
