"""Packaging that fits the ecosystem: a torch range (the machine's pin lives in constraints.txt and the
Makefile), ``datasets`` as the optional ``hub`` extra with a one-line error naming it, and an SPDX
license string."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from factorlm.data import get_task, load_task_data
from factorlm.data import glue as glue_mod
from factorlm.errors import FactorLMError

ROOT = Path(__file__).resolve().parents[1]
MACHINE_TORCH = "2.13.0"


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _reqs(specs: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(s)).name.lower(): r for s in specs}


# ------------------------------------------------------------------------------------ pyproject


def test_torch_is_a_supported_range_not_a_pin(project):
    torch_req = _reqs(project["project"]["dependencies"])["torch"]
    ops = {s.operator for s in torch_req.specifier}
    assert not ops & {"==", "===", "~="}, f"torch must not be pinned in the package: {torch_req}"
    lower = [Version(s.version) for s in torch_req.specifier if s.operator == ">="]
    assert lower and lower[0] <= Version("2.2"), f"torch needs a lower bound (torch>=2.2), got {torch_req}"
    # the range admits this machine's torch and a newer (e.g. CUDA) build alike
    assert torch_req.specifier.contains(MACHINE_TORCH) and torch_req.specifier.contains("2.99.0")


def test_datasets_is_the_optional_hub_extra(project):
    assert "datasets" not in _reqs(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    assert "datasets" in _reqs(extras["hub"])
    assert "pytest" in _reqs(extras["test"])


def test_license_is_an_spdx_string(project):
    assert project["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    # the SPDX string form needs setuptools>=77 to build without a deprecation warning / error
    backend = _reqs(project["build-system"]["requires"])["setuptools"]
    assert not backend.specifier.contains("76.9"), f"build-system needs setuptools>=77, got {backend}"


def test_constraints_pin_torch_and_the_makefile_uses_them():
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = _reqs([ln for ln in lines if ln])
    assert str(pins["torch"].specifier) == f"=={MACHINE_TORCH}"
    installs = [ln.strip() for ln in (ROOT / "Makefile").read_text().splitlines() if "pip install" in ln]
    editable = [ln for ln in installs if re.search(r"-e\s+'?\.\[test\]", ln)]
    assert editable, f"no `pip install -e '.[test]'` in the Makefile: {installs}"
    assert all(re.search(r"(-c|--constraint)\s+constraints\.txt", ln) for ln in editable), editable
    assert any(f"torch=={MACHINE_TORCH}" in ln for ln in installs), "the Makefile installs the machine's torch first"


# ------------------------------------------------------------------ datasets missing / offline hub


def test_missing_datasets_names_the_hub_extra_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.delenv("FACTORLM_DATA_DIR", raising=False)
    with pytest.raises(FactorLMError) as ei:
        load_task_data(get_task("cola"), data_dir=str(tmp_path), include_train=False)
    msg = str(ei.value)
    assert "factorlm[hub]" in msg and "'datasets'" in msg
    assert "\n" not in msg
    assert str(tmp_path / "CoLA" / "dev.tsv") in msg  # still says which local file was looked for
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_broken_datasets_install_is_not_reported_as_missing(monkeypatch, tmp_path):
    def broken(config, split):
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(glue_mod, "_load_from_hub", broken)
    with pytest.raises(FactorLMError) as ei:
        load_task_data(get_task("cola"), data_dir=str(tmp_path), include_train=False)
    assert "pyarrow" in str(ei.value) and "factorlm[hub]" not in str(ei.value)


def test_hub_retry_warnings_are_kept_off_stderr(monkeypatch, tmp_path):
    """Offline, huggingface_hub logs a warning per retry; the user gets only our one line."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    http_log = logging.getLogger("huggingface_hub.utils._http")

    def load_dataset(name, config, split):
        http_log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD ...")
        logging.getLogger("datasets.load").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    handler = Collect(logging.DEBUG)
    for name in ("huggingface_hub", "datasets"):
        logging.getLogger(name).addHandler(handler)
    levels = {n: logging.getLogger(n).level for n in ("huggingface_hub", "datasets", "fsspec")}
    try:
        with pytest.raises(FactorLMError) as ei:
            load_task_data(get_task("cola"), data_dir=str(tmp_path), include_train=False)
        assert seen == []
        assert {n: logging.getLogger(n).level for n in levels} == levels  # restored afterwards
    finally:
        for name in ("huggingface_hub", "datasets"):
            logging.getLogger(name).removeHandler(handler)
    msg = str(ei.value)
    assert "\n" not in msg and "ConnectionError: Couldn't reach 'nyu-mll/glue'" in msg and "--data-dir" in msg


def test_cli_offline_missing_glue_file_is_one_error_line(tmp_path):
    """Real run, whether or not `datasets` is installed: exit 2 and one `factorlm: error:` line."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
        FACTORLM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
    )
    env.pop("FACTORLM_DATA_DIR", None)
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "factorlm", "compress", "--task", "cola", "--data-dir", str(tmp_path / "empty"),
         "--max-steps", "1", "--output", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("factorlm: error: GLUE cola train data not found"), proc.stderr
