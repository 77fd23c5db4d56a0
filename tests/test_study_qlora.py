"""The QLoRA study on tiny random models: the rank sweep, the 4-bit reference without adapter, the declared
tests and the cost table (the smoke profile's settings)."""

from __future__ import annotations

import pytest

from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import qlora

TINY = qlora.Params(tiny=True, seeds=(0, 1), ranks=(2, 4), lrs=(3e-3,), epochs=1, patience=1, cost_batch_size=4,
                    cost_seq_len=16, n_bootstrap=500, torch_threads=1)


@pytest.fixture(scope="module")
def result():
    return qlora.run(TINY)


def test_every_adapter_and_reference_has_an_interval(result):
    m = result.metrics
    for task in TINY.tasks:
        for key in ("full", "nf4_no_adapter", "lora_r2", "lora_r4", "qlora_r2", "qlora_r4"):
            rec = m[f"accuracy/minilm/{task}/{key}"]
            assert rec["ci_low"] <= rec["mean"] <= rec["ci_high"]
        for method in TINY.methods:
            sweep = m[f"rank_sweep/minilm/{task}/{method}"]
            assert sweep["mean"] in TINY.ranks and sweep["verdict"] in ("plateau", "grid edge")


def test_tests_sit_in_their_declared_families(result):
    tests = result.tables["tests"]
    assert set(tests["family"]) == {"qlora_vs_lora", "adapters_vs_full", "nf4_storage"}
    assert (tests["family"] == "qlora_vs_lora").sum() == len(TINY.ranks)
    assert not tests["name"].duplicated().any()


def test_learning_rates_are_chosen_per_method_and_rank(result):
    lr = result.tables["lr_search"]
    assert lr.groupby(["task", "method", "rank"])["chosen"].sum().eq(1).all()


def test_cost_says_how_memory_was_measured(result):
    cost = result.tables["cost"]
    assert set(cost["method"]) == {"lora", "qlora"}
    assert (cost["memory_kind"] == "torch CPU allocation trace").all()
    assert (cost["peak_train_mib"] > cost["weight_mib"]).all()
    q, f = (cost[cost["method"] == m].set_index("rank")["weight_bytes"] for m in ("qlora", "lora"))
    assert (q < f).all(), "4-bit storage must take fewer weight bytes"


def test_bad_parameters_fail_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="a sweep"):
        qlora.Params(ranks=(8,)).validate()
    with pytest.raises(LayerwiseError, match="at least 2 epochs"):
        qlora.Params(epochs=1).validate()
    with pytest.raises(LayerwiseError, match="choose from lora, qlora"):
        qlora.Params(methods=("full",)).validate()
