"""Wheels for an offline GPU machine that already has torch, torchvision, timm, accelerate and scikit-learn.

    python bench/gpu_wheels.py bench/wheels        # or: make gpu-wheels

Resolves what bench/gpu.py imports of the project's dependencies (pyproject.toml's, with the deepspeed
extra, less NOT_IMPORTED_BY_BENCH) and those five packages' own, both with pip's resolver
(`pip install --dry-run --report`), and builds a wheel of every package the first set has and the
second lacks (webdataset, iterative-stratification, omegaconf, pandas, deepspeed, transformers, ...
with their dependencies), at the same versions. Run it with the same Python
version as the GPU machine's (the compiled wheels are tagged for it). On the GPU machine:

    pip install --no-index --find-links bench/wheels bench/wheels/*.whl
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PRESENT_ON_GPU_MACHINE = ["torch", "torchvision", "timm", "accelerate", "scikit-learn"]
# Dependencies the benchmark never imports: W&B (tracking imports it only when logging.wandb is not
# "disabled", and the benchmark disables it), matplotlib (report figures and the W&B coupling image),
# pydicom (DICOM sources of `prepare`; the benchmark's synthetic set is PNG).
NOT_IMPORTED_BY_BENCH = {"wandb", "matplotlib", "pydicom"}


def bench_requirements() -> list[str]:
    """pyproject.toml's dependencies and deepspeed extra, with their version ranges, less NOT_IMPORTED_BY_BENCH."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["deepspeed"]
    return [r for r in requirements if re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() not in NOT_IMPORTED_BY_BENCH]


def closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: version} that pip would install for `requirements` into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), *requirements],
                       check=True, cwd=REPO)
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in items}


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench" / "wheels")
    needed = closure(bench_requirements())
    present = closure(PRESENT_ON_GPU_MACHINE)
    missing = sorted(f"{name}=={version}" for name, version in needed.items() if name not in present and name != "cxrdist")
    print(f"{len(missing)} packages the GPU machine lacks: {' '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *missing], check=True)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}")


if __name__ == "__main__":
    main()
