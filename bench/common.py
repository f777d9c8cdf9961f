"""What every benchmark shares: peak memory of this process and the JSON record of a run."""

import json
import resource
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(name: str, device: str, results: dict) -> Path:
    """bench/results/<name>-<device>.json, announced on stdout."""
    out = RESULTS / f"{name}-{device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")
    return out


def median_run(runs: list[dict], key: str = "vectors_per_s") -> dict:
    """The run with the median speed (its memory and other figures come with it), plus every
    round's speed under ``rounds``."""
    return {**sorted(runs, key=lambda r: r[key])[len(runs) // 2], "rounds": [r[key] for r in runs]}
