"""The ledger: finished units travel between machines in ``results/units`` and come back as cache entries that
their consumers read exactly as if computed here (a restored healed arm without its weights included)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis_kit import cache, cli, ledger, runner
from analysis_kit.studies import compression as cp


def _entry(root, kind="qlora_runs", spec=None, value=1.0):
    """A finished cache entry of ``kind`` under cache root ``root`` (through ``cache.cached_dir`` itself)."""
    spec = spec or {"kind": kind, "run": value}

    def build(folder):
        if kind == "qlora_runs":
            cache.atomic_write_json(folder / "value.json", {"value": {"accuracy": value}})
        else:
            for name in ledger.PORTABLE[kind]:
                (folder / name).write_bytes(b"x")
            (folder / "model.safetensors").write_bytes(b"weights" * 1000)

    return cache.cached_dir(kind, spec, build)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_save_copies_only_the_files_consumers_read_and_never_rewrites(roots):
    arm = _entry(roots / "cache", "healed_arm", {"kind": "healed_arm", "params": {"tiny": False}})
    _entry(roots / "cache", "qlora_runs", {"kind": "qlora_runs", "run": 1})
    moved = ledger.save()
    assert moved.counts == {"healed_arm": 1, "qlora_runs": 1, "importance_unit": 0} and moved.bytes > 0
    saved = ledger.ledger_dir() / ledger.host_id() / "healed_arm" / arm.name
    assert saved == roots / "results" / "units" / ledger.host_id() / "healed_arm" / arm.name
    assert sorted(p.name for p in saved.iterdir()) == sorted([*ledger.PORTABLE["healed_arm"], "spec.json", "host.json"])
    assert json.loads((saved / "host.json").read_text()) == ledger.host()
    (saved / "arm.json").write_text("committed")
    assert sum(ledger.save().counts.values()) == 0
    assert (saved / "arm.json").read_text() == "committed", "a committed unit is never overwritten"
    assert ledger.status()[f"{ledger.host_id()}/healed_arm"]["entries"] == 1


def test_smoke_entries_and_unfinished_builds_stay_behind(roots):
    _entry(roots / "cache", "healed_arm", {"kind": "healed_arm", "params": {"tiny": True, "seed": 0}})
    (roots / "cache" / "healed_arm" / ("f" * 64)).mkdir()  # a build without its .complete marker
    assert sum(ledger.save().counts.values()) == 0
    assert ledger.save(include_tiny=True).counts["healed_arm"] == 1


def test_a_run_saves_the_units_it_finished_not_the_caches_leftovers_of_older_code(roots, capsys):
    import os
    import time

    old = _entry(roots / "cache", "qlora_runs", {"kind": "qlora_runs", "code": "before"})
    an_hour_ago = time.time() - 3600
    os.utime(old / ledger.COMPLETE, (an_hour_ago, an_hour_ago))
    started = time.time() - 1
    new = _entry(roots / "cache", "qlora_runs", {"kind": "qlora_runs", "code": "now"})
    runner._carry_units("save", since=started)
    saved = ledger.ledger_dir() / ledger.host_id() / "qlora_runs"
    assert sorted(p.name for p in saved.iterdir()) == [new.name]
    assert cli.main(["units", "save", "--since", "30"]) == 0 and "nothing" in capsys.readouterr().out
    assert cli.main(["units", "save"]) == 0 and "1 qlora_runs" in capsys.readouterr().out  # every finished entry
    assert cli.main(["units", "restore", "--since", "30"]) != 0 and "save only" in capsys.readouterr().err
    assert cli.main(["units", "save", "--since", "-5"]) != 0 and "positive number" in capsys.readouterr().err


def test_restore_makes_a_finished_entry_that_cached_dir_returns_without_building(roots, monkeypatch):
    spec = {"kind": "qlora_runs", "run": 7}
    _entry(roots / "cache", "qlora_runs", spec, value=0.91)
    ledger.save()
    monkeypatch.setenv("LAYERWISE_CACHE", str(roots / "fresh"))  # another machine: an empty cache
    (roots / "fresh" / "qlora_runs").mkdir(parents=True)
    leftover = roots / "fresh" / "qlora_runs" / cache.key_of(spec)
    leftover.mkdir()  # a killed build of the same entry on this machine
    assert ledger.restore().counts["qlora_runs"] == 1

    def never(_):
        raise AssertionError("a restored entry is not built again")

    assert cache.cached_json("qlora_runs", spec, never) == {"accuracy": 0.91}
    assert not (leftover / "host.json").exists()
    assert sum(ledger.restore().counts.values()) == 0


def test_units_from_another_kind_of_machine_are_computed_here_and_kept_apart(roots, monkeypatch):
    # the saving host is set too: on a Xeon host the real host would be the restoring one
    monkeypatch.setattr(ledger, "host", lambda: {"cpu": "AMD EPYC 7B13", "torch": "2.13.0+cpu"})
    _entry(roots / "cache", "qlora_runs")
    ledger.save()
    monkeypatch.setenv("LAYERWISE_CACHE", str(roots / "fresh"))
    monkeypatch.setattr(ledger, "host", lambda: {"cpu": "Intel(R) Xeon(R) Processor", "torch": "2.13.0+cpu"})
    assert ledger.host_id() == "intel-r-xeon-r-processor_torch-2.13.0-cpu"
    assert sum(ledger.restore().counts.values()) == 0 and not (roots / "fresh" / "qlora_runs").exists()
    _entry(roots / "fresh", "qlora_runs")  # the same unit computed here: this host's part of the ledger keeps it
    assert ledger.save().counts["qlora_runs"] == 1 and len(ledger.status()) == 2


def test_the_runner_restores_and_saves_unless_turned_off(roots, monkeypatch, capsys):
    _entry(roots / "cache", "qlora_runs")
    monkeypatch.setenv("LAYERWISE_LEDGER", "0")
    runner._carry_units("save")
    assert not ledger.ledger_dir().exists()
    monkeypatch.delenv("LAYERWISE_LEDGER")
    runner._carry_units("save")
    assert "saved to" in capsys.readouterr().out and ledger.status()[f"{ledger.host_id()}/qlora_runs"]["entries"] == 1


def test_a_restored_healed_arm_without_weights_gives_the_same_record(roots, monkeypatch):
    params = cp.Params(tiny=True, seeds=(0,), tasks=("amazon",), epochs=1, patience=1, torch_threads=1)
    ctx = cp._context(params, "minilm", "amazon", 0)
    first = cp.healed_arm(params, "minilm", "amazon", 0, (0,), "finetune", 1e-3, ctx)
    assert any(p.suffix == ".safetensors" for p in cp.Path(first["folder"]).iterdir())
    ledger.save(include_tiny=True)
    monkeypatch.setenv("LAYERWISE_CACHE", str(roots / "other"))
    assert ledger.restore().counts["healed_arm"] == 1
    # (the arm's key holds the code of _build_arm itself, so the tripwire sits in a helper it calls)
    monkeypatch.setattr(cp.train, "predict", lambda *a, **k: pytest.fail("the restored arm was healed again"))
    again = cp.healed_arm(params, "minilm", "amazon", 0, (0,), "finetune", 1e-3, ctx)
    assert again["folder"] != first["folder"] and not any(p.suffix == ".safetensors"
                                                          for p in cp.Path(again["folder"]).iterdir())
    for key in ("val_correct", "test_correct"):
        assert np.array_equal(first[key], again[key])
    assert again["history"].equals(first["history"])
    assert {k: v for k, v in again.items() if k not in ("folder", "history", "val_correct", "test_correct")} == \
        {k: v for k, v in first.items() if k not in ("folder", "history", "val_correct", "test_correct")}
    assert json.loads((cp.Path(again["folder"]) / "spec.json").read_text())["kind"] == "healed_arm"


def test_the_units_command_saves_restores_and_lists(roots, capsys):
    _entry(roots / "cache", "qlora_runs")
    assert cli.main(["units", "status"]) == 0 and "holds no unit" in capsys.readouterr().out
    assert cli.main(["units", "save"]) == 0 and "1 qlora_runs" in capsys.readouterr().out
    assert cli.main(["units", "status"]) == 0 and "qlora_runs" in capsys.readouterr().out
    assert cli.main(["units", "restore"]) == 0 and "nothing" in capsys.readouterr().out
