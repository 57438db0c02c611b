"""`runner fetch` offline: a folder in the hub's layout stands in for the hub (no download is possible here);
the hub path is the real huggingface_hub code, shown failing at once, in one line, without network."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from tasks.slake import Slake
from tests.test_own_data import slake_copy


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_fetch_from_a_mirror_records_checksums_and_the_copy_loads(tmp_path: Path) -> None:
    mirror = slake_copy(tmp_path / "mirror")
    (mirror / "KG.zip").write_bytes(b"a knowledge graph the task does not read")
    dest = tmp_path / "fetched"
    result = invoke("fetch", "slake", "--from", str(mirror), "--to", str(dest))
    assert result.exit_code == 0, result.output
    record = json.loads((dest / "FETCHED.json").read_text())
    assert record["repo_id"] == "BoKelvin/SLAKE" and record["repo_type"] == "dataset"
    assert sorted(record["sha256"]) == ["imgs.zip", "test.json", "train.json", "validation.json"]  # no KG.zip
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert f"trial.data={dest}" in result.output
    assert len(Slake(data=str(dest)).load_split("test").examples) == 12


@pytest.mark.parametrize("name", ["slake", "Salesforce/blip2-flan-t5-xl"])
def test_fetch_without_network_fails_at_once_in_one_line(tmp_path: Path, monkeypatch, name: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as with no network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    result = invoke("fetch", name, "--to", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: cannot reach the hub for ") and result.stderr.count("\n") == 1
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "FETCHED.json").exists()


@pytest.mark.parametrize("name, message", [("easy_vqa", "no hub dataset"), ("tiny", "ships with this package"),
                                           ("nonsense", "neither a task")])
def test_fetch_refuses_what_cannot_be_fetched(name: str, message: str) -> None:
    result = invoke("fetch", name)
    assert result.exit_code == 2 and message in result.stderr
