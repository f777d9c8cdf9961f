"""Publishing an SAE to the Hugging Face hub: ``python -m helpers publish --sae DIR --repo-id NAME``.

The upload set is the SAE in SAELens' layout (``cfg.json``, ``sae_weights.safetensors``), its
records (``train.json``, ``metrics.jsonl``, ``spliced.json`` where they exist) and a model card
(``README.md``) written from them: layer, input convention, weights, data, vectors seen, FVU,
L0, dead fraction, the spliced-in evaluation, and how to load it with SAELens and with this
package. Everything is checked first (the SAE loads, random weights are refused unless asked
for, the hub answers and the token is accepted), then uploaded in one commit, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from helpers.files import CFG_FILE, METRICS, SPLICED, TRAIN_RECORD, WEIGHTS_FILE

UPLOADED = (CFG_FILE, WEIGHTS_FILE, TRAIN_RECORD, METRICS, SPLICED)  # never the checkpoint


class PublishError(RuntimeError):
    """The SAE cannot be published as asked; the message says why and what to do."""


def upload_set(sae_dir: Path) -> list[str]:
    """The files of ``sae_dir`` that are published (the model card is written beside them)."""
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (sae_dir / f).is_file()]
    if missing:
        raise PublishError(f"{sae_dir} is not an SAE directory: {', '.join(missing)} missing (train one with "
                           "`python -m helpers train`, which writes them)")
    return [f for f in UPLOADED if (sae_dir / f).is_file()]


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def _json(path: Path) -> dict:
    """A record of the SAE folder as a dict, or a PublishError naming the file and the fix."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PublishError(f"{path} is not readable JSON ({type(e).__name__}: {e}); restore it (train again, or "
                           "delete a record other than cfg.json to leave it out)") from e
    if not isinstance(data, dict):
        raise PublishError(f"{path} holds a JSON {type(data).__name__}, not the record of an SAE; restore it")
    return data


def check(sae_dir: Path, repo_id: str, allow_random: bool = False) -> list[str]:
    """Everything a publish checks before anything is written (a dry run too): the files, that the SAE loads (whole,
    finite), its records parse, random weights (refused unless allowed) and the repository's name. Returns the
    file names of the upload set."""
    from helpers.sae.model import TopKSAE

    names = upload_set(sae_dir)
    try:
        sae = TopKSAE.load(sae_dir)
    except Exception as e:
        raise PublishError(f"{sae_dir} does not load as an SAE ({e}); nothing was written") from e
    for name in (CFG_FILE, TRAIN_RECORD, SPLICED):
        if name in names:
            _json(sae_dir / name)
    if sae.metadata.get("random_weights") and not allow_random:
        raise PublishError(f"{sae_dir} was trained on a network with random weights: its features mean nothing about "
                           "InceptionV1. Nothing was written; pass --allow-random to publish it anyway (its card says so)")
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"--repo-id {repo_id!r} should be OWNER/NAME, one slash (e.g. your-name/inceptionv1-sae-mixed4c)")
    return names


def _fmt(value, digits: int = 4) -> str:
    return "not recorded" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def model_card(sae_dir: Path, repo_id: str) -> str:
    """The model card (``README.md``) of the SAE in ``sae_dir``, from its ``cfg.json`` and records."""
    cfg = _json(sae_dir / CFG_FILE)
    meta = cfg.get("metadata") or {}
    record = _json(sae_dir / TRAIN_RECORD) if (sae_dir / TRAIN_RECORD).is_file() else {}
    layer = meta.get("layer") or "unknown layer"
    scale = meta.get("input_scale")
    convention = {"lucent": "RGB in [0, 1] mapped by `x*255-117` (Lucent's `render_vis`)",
                  "unit": "RGB in [0, 1] as is (the paper author's harvest: Lucent's `forward` does no preprocessing)"
                  }.get(scale, "not recorded: check how the vectors were harvested")
    random = bool(meta.get("random_weights"))
    lines = [
        "---", "library_name: saelens", "tags: [sparse-autoencoder, interpretability, inceptionv1, topk-sae]", "---", "",
        f"# TopK SAE for InceptionV1 {layer}" + (" (RANDOM WEIGHTS: NOT A RESULT)" if random else ""), "",
        (f"**{meta.get('warning')}**\n" if random else "")
        + f"A TopK sparse autoencoder (k = {cfg.get('k')}, {cfg.get('d_sae')} latents on {cfg.get('d_in')} channels, "
          f"weights tied: {cfg.get('tied', 'full')}) on the output of InceptionV1's `{layer}` block (Lucid's "
          "`inception5h` via Lucent), trained with https://github.com/inception-sae/inception-sae.", "",
        "| | |", "|---|---|",
        f"| layer | `{layer}` |",
        f"| input convention | {convention} |",
        f"| network weights | `{meta.get('weights_id', 'not recorded')}` |",
        f"| data | `{meta.get('source', 'not recorded')}` |",
        f"| vectors seen | {_fmt(meta.get('vectors_seen'))} |",
        f"| held-out FVU | {_fmt(meta.get('final_fvu'))} ({meta.get('final_fvu_on', '')}) |",
        f"| L0 (latents per vector) | {cfg.get('k')} at most (TopK) |",
        f"| dead fraction | {_fmt(meta.get('dead_fraction'))} |",
        f"| branch slices | `{json.dumps(meta.get('branch_slices'))}` |",
    ]
    if record.get("config"):
        lines.append(f"| training config | `{json.dumps(record['config'], sort_keys=True)}` |")
    if (sae_dir / SPLICED).is_file():
        spliced = _json(sae_dir / SPLICED)
        rows = spliced.get("rows") or []
        lines += ["", "## Spliced in", "",
                  "The network run with the layer's output replaced by the SAE's reconstruction (all channels, or one "
                  f"branch alone), against the clean network on {spliced.get('images', '?')} images, with the layer zeroed and "
                  "replaced by its mean as floors:",
                  "", "| spliced in | top-1 agreement | KL | KL recovered |", "|---|---|---|---|"]
        lines += [f"| {r.get('spliced in')} | {_fmt(r.get('top-1 agreement'), 3)} | {_fmt(r.get('KL'), 3)} | "
                  f"{_fmt(r.get('KL recovered'), 3)} |" for r in rows if isinstance(r, dict)]
    lines += ["", "## Loading it", "", "With this package:", "", "```python",
              "from huggingface_hub import snapshot_download", "from helpers.sae.model import TopKSAE", "",
              f'sae = TopKSAE.load(snapshot_download("{repo_id}"))', "```", "",
              "With SAELens (the files are in its layout):", "", "```python",
              "from huggingface_hub import snapshot_download", "from sae_lens import SAE", "",
              f'sae = SAE.load_from_disk(snapshot_download("{repo_id}"))', "```", "",
              "The input convention above matters: encode activations harvested the same way.", ""]
    return "\n".join(lines)


def stage(sae_dir: Path, repo_id: str, out: Path, allow_random: bool = True) -> list[str]:
    """Check (``check``), then write the upload set and the model card into ``out``, a new or empty folder outside
    the SAE's; returns the file names."""
    sae_dir, out = Path(sae_dir), Path(out)
    names = check(sae_dir, repo_id, allow_random)
    if out.exists() and not out.is_dir():
        raise PublishError(f"{out} is a file; give a new or empty folder to write the upload set into")
    if out.resolve() == sae_dir.resolve() or sae_dir.resolve() in out.resolve().parents:
        raise PublishError(f"{out} is the SAE's own folder (or inside it); give a new or empty folder elsewhere")
    if out.is_dir() and any(out.iterdir()):
        raise PublishError(f"{out} is not empty; give a new or empty folder (nothing in it was changed)")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(sae_dir / name, out / name)
    (out / "README.md").write_text(model_card(sae_dir, repo_id))
    return sorted([*names, "README.md"])


def publish(sae_dir: str | Path, repo_id: str, *, private: bool = False, allow_random: bool = False,
            token: str | None = None) -> str:
    """Check, then upload ``sae_dir`` to the hub as ``repo_id`` in one commit; returns the commit's URL."""
    sae_dir = Path(sae_dir)
    names = check(sae_dir, repo_id, allow_random)
    layer = _json(sae_dir / CFG_FILE).get("metadata", {}).get("layer")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:  # offline, or no token: before anything is written
        raise PublishError(f"cannot publish to the Hugging Face hub ({type(e).__name__}: {e}). It needs internet and "
                           "a token with write access (`huggingface-cli login`, or HF_TOKEN); nothing was uploaded") from e
    with tempfile.TemporaryDirectory() as tmp:
        stage(sae_dir, repo_id, Path(tmp) / "upload", allow_random)
        tmp = str(Path(tmp) / "upload")
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=f"SAE for {layer}"
                                 f" ({', '.join(names)}, README.md)")
    return str(getattr(info, "commit_url", info))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers publish", description=__doc__.splitlines()[0])
    p.add_argument("--sae", required=True, help="the SAE directory (cfg.json and sae_weights.safetensors)")
    p.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hugging Face hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--allow-random", action="store_true", help="publish an SAE of a random-weight network")
    p.add_argument("--dry-run", metavar="DIR", help="only write the upload set and model card into DIR")
    a = p.parse_args(argv)
    try:
        if a.dry_run:
            files = stage(Path(a.sae), a.repo_id, Path(a.dry_run), a.allow_random)
            print(f"wrote {', '.join(files)} into {a.dry_run}")
        else:
            print(publish(a.sae, a.repo_id, private=a.private, allow_random=a.allow_random))
    except (PublishError, OSError) as e:  # OSError: a full disk, a folder without write permission
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
