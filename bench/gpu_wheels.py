"""Wheels for an offline GPU machine that already has torch, torchvision, timm, accelerate and scikit-learn.

    python bench/gpu_wheels.py bench/wheels        # or: make gpu-wheels

Resolves what bench/gpu.py imports of the project's dependencies (pyproject.toml's, with the deepspeed
extra, less NOT_IMPORTED_BY_BENCH) and those five packages' own, both with pip's resolver
(`pip install --dry-run --report`), and builds a wheel of every package the first set has and the
second lacks (webdataset, iterative-stratification, omegaconf, pandas, deepspeed, transformers, ...
with their dependencies), at the same versions. Compiled wheels are tagged for one Python: with
`--python-version 3.12` (the lent H200's) binary wheels for that Python and manylinux x86_64 are
downloaded, and only packages published as source alone (DeepSpeed) are built here (they are pure
Python). On the GPU machine:

    pip install --no-index --find-links bench/wheels bench/wheels/*.whl
"""

from __future__ import annotations

import argparse
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
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in items}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


MANYLINUX = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def fetch_for_python(spec: str, dest: Path, python_version: str) -> None:
    """A binary wheel of `spec` for another Python (manylinux x86_64), or, for a package published as source only,
    a wheel built here (pure Python, so any Python takes it)."""
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", tag)]
    binary = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                             python_version, "--implementation", "cp", *platforms, "--dest", str(dest), spec], capture_output=True, text=True)
    if binary.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), spec], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=REPO / "bench" / "wheels")
    parser.add_argument("--python-version", default=None, help="the GPU machine's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--present-file", type=Path, default=None,
                        help="names of the packages the GPU machine already has, one per line (# comments), beyond "
                             f"{', '.join(PRESENT_ON_GPU_MACHINE)}: e.g. bench/h200-packages.txt")
    args = parser.parse_args()
    dest = args.dest
    needed = closure(bench_requirements())
    present = closure(PRESENT_ON_GPU_MACHINE)
    if args.present_file:
        # The names only: their dependencies as resolved here (newest versions) may not be what the machine's versions need.
        listed = {canonical(line) for line in args.present_file.read_text().splitlines() if line.strip() and not line.startswith("#")}
        present.update(dict.fromkeys(listed, "listed"))
    missing = sorted(f"{name}=={version}" for name, version in needed.items() if name not in present and name != "cxrdist")
    print(f"{len(missing)} packages the GPU machine lacks: {' '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    if args.python_version is None:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *missing], check=True)
    else:
        for spec in missing:
            fetch_for_python(spec, dest, args.python_version)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}")


if __name__ == "__main__":
    main()
