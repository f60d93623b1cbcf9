"""Regenerate the vendored KubeRay schemas from KubeRay's CRD files.

    python infra/kuberay/schemas/extract.py PATH/TO/ray-operator/config/crd/bases

reads ``ray.io_rayjobs.yaml`` and ``ray.io_rayclusters.yaml`` there, checks their sha256 against
the ones recorded below (the files of KubeRay v1.7.0), and writes, beside this script, the
``openAPIV3Schema`` of each CRD's ``v1`` version, unchanged, as gzip-compressed JSON (keys sorted,
gzip timestamp 0, so the output is byte-for-byte repeatable). The conversion from OpenAPI v3 to
JSON Schema is not done here: tests/test_infra.py does it, where it can be read and tested.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCES = {  # CRD file -> (sha256 of KubeRay v1.7.0's file, vendored output)
    "ray.io_rayjobs.yaml": ("01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5", "rayjob.v1.json.gz"),
    "ray.io_rayclusters.yaml": ("c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1", "raycluster.v1.json.gz"),
}


def v1_schema(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def main(crd_dir: str) -> None:
    for name, (sha, out) in SOURCES.items():
        raw = (Path(crd_dir) / name).read_bytes()
        got = hashlib.sha256(raw).hexdigest()
        if got != sha:
            sys.exit(f"{name}: sha256 {got} is not KubeRay v1.7.0's {sha}; update SOURCES and the README deliberately")
        text = json.dumps(v1_schema(yaml.safe_load(raw)), sort_keys=True, indent=1) + "\n"
        with open(HERE / out, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(text.encode())
        print(f"{out}: {len(text)} bytes of JSON")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
