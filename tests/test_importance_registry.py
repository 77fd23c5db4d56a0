"""The importance-method family: a method is one ``ImportanceMethod`` class, registered, and ``compute`` and
``compute_all`` run it like the built-in ones (same tidy table, same option checks, same cost columns).

The toy method here lives in this file only, as a method from outside the package would; each test registers
it for its own duration, so the global registry is the same before and after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from analysis_kit import importance as imp

VOCAB = 50


def _bert(n_layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, width in ((4, 7), (3, 5)):
        ids = torch.randint(1, VOCAB, (rows, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, width - 2:] = 0
        ids[0, width - 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=g)})
    return out


class OutputNorm(imp.ImportanceMethod):
    """Toy method: ``scale`` times the mean norm of the block's output over non-padding tokens, from the trace."""

    name = "toy_output_norm"
    description = "scale * mean ||output|| of the block"
    needs = ("trace",)
    options = {"scale": 1.0}

    def score(self, passes: imp.Passes, seed: int, **options: Any) -> pd.DataFrame:
        tr = passes.trace
        rows = []
        for i in range(tr.n_blocks):
            norms = torch.cat([hs[i + 1][b["attention_mask"].bool()].norm(dim=-1)
                               for b, hs in zip(tr.batches, tr.hidden, strict=True)])
            rows.append({"layer": i, "score": options["scale"] * float(norms.mean()), "se": 0.0})
        return pd.DataFrame(rows)


def _expected_norms(model: BertForSequenceClassification, batches: list[dict]) -> np.ndarray:
    tr = imp.trace(model, batches)
    return np.array([float(torch.cat([hs[i + 1][b["attention_mask"].bool()].norm(dim=-1)
                                      for b, hs in zip(tr.batches, tr.hidden, strict=True)]).mean())
                     for i in range(tr.n_blocks)])


def test_registry_holds_the_methods_in_the_chapters_order():
    assert imp.METHODS == ("fisher", "gradient", "ablation", "block_influence", "angular", "bi_shortgpt",
                           "angular_gromov", "activation", "mutual_info", "conductance", "shap")
    assert imp.CHEAP_METHODS == imp.METHODS[:8]
    assert list(imp.SIGN_CONVENTION) == list(imp.METHODS) and all(imp.SIGN_CONVENTION.values())
    assert imp.available_methods() == imp.METHODS


def test_a_registered_toy_method_runs_like_a_built_in_one():
    model, batches = _bert(), _batches()
    with imp.registered(OutputNorm):
        assert imp.available_methods() == (*imp.METHODS, "toy_output_norm")
        toy = imp.compute("toy_output_norm", model, batches, seed=3)
        builtin = imp.compute("block_influence", model, batches, seed=3)
        assert list(toy.columns) == list(builtin.columns)  # the same tidy table
        np.testing.assert_allclose(toy["score"], _expected_norms(model, batches), rtol=1e-6)
        assert toy["layer"].tolist() == [0, 1, 2] and (toy["seed"] == 3).all()
        assert (toy["shared"] == "trace").all() and (toy["n_forward"] == 1.0).all() and (toy["n_backward"] == 0.0).all()

        both = imp.compute_all(model, batches, methods=["fisher", "toy_output_norm", "block_influence"],
                               options={"toy_output_norm": {"scale": 2.0}})
        assert list(dict.fromkeys(both["method"])) == ["fisher", "toy_output_norm", "block_influence"]
        got = both[both["method"] == "toy_output_norm"]["score"].to_numpy()
        np.testing.assert_allclose(got, 2.0 * toy["score"].to_numpy(), rtol=1e-5)  # trace from the gradient pass
        cost = imp.cost_table(both)
        assert sorted(cost["method"]) == sorted(["fisher", "toy_output_norm", "block_influence",
                                                  "shared: gradients", "shared: trace"])


def test_unknown_option_is_refused_naming_the_accepted_ones():
    model, batches = _bert(2), _batches()
    with imp.registered(OutputNorm):
        with pytest.raises(imp.ImportanceError, match=r"takes no option\(s\) \['n_steps'\]; it accepts \['scale'\]"):
            imp.compute("toy_output_norm", model, batches, n_steps=4)
        with pytest.raises(imp.ImportanceError, match=r"it accepts \['scale'\]"):
            imp.compute_all(model, batches, methods=["toy_output_norm"], options={"toy_output_norm": {"sclae": 2}})


def test_registry_is_unchanged_after_the_toy_method_and_refuses_bad_declarations():
    before = imp.available_methods()
    with imp.registered(OutputNorm):
        with pytest.raises(imp.ImportanceError, match="registered already"):
            imp.register(OutputNorm)
    assert imp.available_methods() == before
    with pytest.raises(imp.ImportanceError, match="choose from"):
        imp.compute("toy_output_norm", _bert(2), _batches())
    with pytest.raises(imp.ImportanceError, match="built-in"):
        imp.unregister("fisher")
    with pytest.raises(imp.ImportanceError, match="no importance method"):
        imp.unregister("toy_output_norm")

    class NeedsNothing(OutputNorm):
        name = "toy_needs_nothing"
        needs = ("subsets",)

    with pytest.raises(imp.ImportanceError, match="shared pass"):
        imp.register(NeedsNothing)

    class NoDescription(OutputNorm):
        name = "toy_no_description"
        description = ""

    with pytest.raises(imp.ImportanceError, match="description"):
        imp.register(NoDescription)
    assert imp.available_methods() == before
