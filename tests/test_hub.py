"""Hub ids (``org/name[@revision]``) for load, convert and every ``--model``, offline against a cache directory laid
out as the hub lays it out (models--org--name/{refs, snapshots, blobs}); no network is touched."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import dultra_jax
from dultra_jax.checkpoints import CheckpointError
from dultra_jax.checkpoints.hub import HUB_ALLOW_PATTERNS, parse_hub_id, resolve_model_path
from dultra_jax.cli import main

SHA = "0123456789abcdef0123456789abcdef01234567"
IDS = np.array([[5, 9, 17, 33, 2, 8]], np.int32)


def _hub_cache(root: Path, repo: str, src: Path, sha: str = SHA, refs: tuple[str, ...] = ("main",)) -> Path:
    """``root`` as an HF_HUB_CACHE holding ``repo`` at commit ``sha``: content-addressed blobs, snapshot symlinks."""
    storage = root / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / sha
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.suffix not in (".json", ".safetensors"):
            continue
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def offline_cache(tmp_path, tiny_dir, monkeypatch):
    cache = tmp_path / "hub-cache"
    snap = _hub_cache(cache, "org/tiny", tiny_dir, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache, snap


def _logits(model) -> np.ndarray:
    return np.asarray(model(IDS)[0])


def test_parse_hub_id():
    assert parse_hub_id("sengi/dUltra-math") == ("sengi/dUltra-math", None)
    assert parse_hub_id("GSAI-ML/LLaDA-8B-Instruct@v1.0") == ("GSAI-ML/LLaDA-8B-Instruct", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ("/abs/path", "./org/name", "a/b/c", "name", "org/", "../x", "org/na me", "~/x"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_load_a_hub_id_offline_from_the_cache(offline_cache, tiny_model):
    _, snap = offline_cache
    want = _logits(tiny_model)
    for ref in ("org/tiny", "org/tiny@main", "org/tiny@v1", f"org/tiny@{SHA}"):
        assert resolve_model_path(ref) == snap
    np.testing.assert_array_equal(_logits(dultra_jax.load("org/tiny", dtype="fp32")), want)


def test_hf_home_is_honoured(tmp_path, tiny_dir, monkeypatch):
    home = tmp_path / "hf-home"
    snap = _hub_cache(home / "hub", "org/tiny", tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_model_path("org/tiny") == snap


def test_a_local_directory_wins(offline_cache, tmp_path, tiny_dir, monkeypatch):
    local = tmp_path / "cwd" / "org" / "tiny"
    shutil.copytree(tiny_dir, local)
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_model_path("org/tiny") == Path("org/tiny")


def test_clear_errors_name_the_id(offline_cache, tmp_path):
    with pytest.raises(CheckpointError, match=r"'org/missing'.*HF_HUB_OFFLINE is set"):
        dultra_jax.load("org/missing")
    with pytest.raises(CheckpointError, match=r"'org/tiny@nope'"):
        resolve_model_path("org/tiny@nope")
    with pytest.raises(CheckpointError, match="directory not found"):
        dultra_jax.load(tmp_path / "absent" / "dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(tmp_path / "file")


def test_online_fetch_asks_only_for_the_files_we_read(monkeypatch, tmp_path, tiny_dir):
    """Without HF_HUB_OFFLINE the id goes to snapshot_download with the revision and our allow-list (stubbed:
    no network in tests)."""
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tiny_dir)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_path("sengi/dUltra-math@abc") == tiny_dir
    [(repo, kw)] = calls
    assert repo == "sengi/dUltra-math" and kw["revision"] == "abc" and kw["local_files_only"] is False
    assert kw["cache_dir"] == str(tmp_path / "c")
    patterns = set(kw["allow_patterns"])
    assert patterns == set(HUB_ALLOW_PATTERNS)
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".gguf", "*")) and p != "*.safetensors" for p in patterns)


def test_cli_convert_and_generate_take_hub_ids(offline_cache, tmp_path, capsys, tiny_model):
    out = tmp_path / "converted"
    assert main(["convert", "org/tiny", str(out)]) == 0
    np.testing.assert_array_equal(_logits(dultra_jax.load(out, dtype="fp32")), _logits(tiny_model))
    assert main(["generate", "--model", "org/tiny", "--prompt-ids", "1,2,3,4", "--gen-length", "8",
                 "--block-length", "8", "--dtype", "fp32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated_ids"]) == 8
    assert main(["generate", "--model", "org/missing", "--prompt-ids", "1,2"]) == 2
    assert "'org/missing'" in capsys.readouterr().err
    assert main(["eval", "--model", "org/missing", "--task", "synthetic-addition"]) == 2
    assert "'org/missing'" in capsys.readouterr().err
