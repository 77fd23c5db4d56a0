"""The offline-rendering check finds or installs Chromium, so `make test` passes on a fresh Debian machine."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_offline_html.py"


@pytest.fixture()
def check(monkeypatch):
    spec = importlib.util.spec_from_file_location("check_offline_html", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "CHROMIUM_CANDIDATES", ())
    return mod


def test_missing_chromium_is_installed_with_apt_when_root(check, monkeypatch, tmp_path):
    installed = tmp_path / "chromium"
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "install"]:
            installed.write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(check.os, "geteuid", lambda: 0)
    monkeypatch.setattr(check.shutil, "which", lambda name: str(installed) if name == "chromium" and installed.exists()
                        else "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(check.subprocess, "run", fake_run)
    assert check.chromium_path() == str(installed)
    assert calls == [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]]


def test_missing_chromium_without_root_names_the_command(check, monkeypatch):
    monkeypatch.setattr(check.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        check.chromium_path()
    message = str(stop.value.code)
    assert "apt-get install -y chromium" in message and "\n" not in message


def test_a_failed_apt_install_says_so_in_one_line(check, monkeypatch):
    monkeypatch.setattr(check.os, "geteuid", lambda: 0)
    monkeypatch.setattr(check.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(check.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package"))
    with pytest.raises(SystemExit) as stop:
        check.chromium_path()
    assert "failed (E: Unable to locate package)" in str(stop.value.code)
