"""Stage: save the compressed causal LM first (sharded safetensors in its dtype, :func:`factorlm.models.io.save`),
then add what is measured afterwards (file sizes, speed, the report picture) to the saved folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .. import models


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the ``*.safetensors`` weight files in ``folder`` (one file or shards)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def save_model(model: nn.Module, out, *, tokenizer, meta: dict[str, Any], overwrite: bool) -> Path:
    device = next(model.parameters()).device
    if device.type != "cpu":  # safetensors writes from CPU memory
        model = model.cpu()
    return models.save(model, out, tokenizer=tokenizer, overwrite=overwrite, meta=meta)


#: the files a multimodal wrapper's processor (images / video) loads from, copied from the source as they are
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def copy_processor_files(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy :data:`PROCESSOR_FILES` from a local source folder (what ``AutoProcessor`` needs besides
    the tokenizer); returns the names copied."""
    import shutil

    src, copied = Path(source), []
    if not src.is_dir():
        return copied
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (Path(out) / name).exists():
            shutil.copyfile(src / name, Path(out) / name)
            copied.append(name)
    return copied


def record(folder: Path, keys: list[str], value) -> None:
    """Add one fact known only after saving to ``factorlm.json`` (atomic replace)."""
    f = Path(folder) / models.loading.FACTORLM_JSON
    meta = json.loads(f.read_text())
    node = meta
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.chmod(tmp, f.stat().st_mode & 0o777)
    os.replace(tmp, f)


def add_png(folder: Path, log) -> None:
    """``report.png`` from the saved ``factorlm.json`` (a plotting failure costs the picture, never the model)."""
    dst = Path(folder) / "report.png"
    tmp = dst.with_name(".report.png.tmp.png")
    try:
        from ..plots import lm_report_png

        meta = json.loads((Path(folder) / models.loading.FACTORLM_JSON).read_text())
        lm_report_png(meta, tmp)
        os.replace(tmp, dst)
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        log(f"WARNING: could not draw {dst.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
