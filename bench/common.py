"""What every benchmark shares: peak memory of this process, the machine it ran on, and the JSON record of a run."""

import json
import resource
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """This CPU's model, its core count and whether torch can use AMX tiles (which make bf16 products cheap, the
    screened TopK's premise): every speed figure names the machine it came from."""
    import os
    import platform

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        import torch

        amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    except (ImportError, AttributeError):
        amx = "AMX unknown"
    return f"{model}, {os.cpu_count()} cores, {amx}"


def write_results(name: str, device: str, results: dict) -> Path:
    """bench/results/<name>-<device>.json (with the CPU it ran on), announced on stdout."""
    out = RESULTS / f"{name}-{device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), **results}, indent=2))
    print(f"\nwritten {out}")
    return out


def median_run(runs: list[dict], key: str = "vectors_per_s") -> dict:
    """The run with the median speed (its memory and other figures come with it), plus every
    round's speed under ``rounds``."""
    return {**sorted(runs, key=lambda r: r[key])[len(runs) // 2], "rounds": [r[key] for r in runs]}
