"""Importance methods on tiny random models with answers that can be checked by hand.

- A block that is the identity (a BERT block replaced by an identity module; a LLaMA block with all weights
  zero) scores exactly zero under every method whose definition says so, and costs nothing to drop.
- A planted critical block (the one block of a LLaMA trained on a copy-with-lag task, the others zero)
  ranks first under ablation, Fisher and SHAP.
- Shapley values add up to v(all) - v(none), exactly and under permutation sampling.
- The hook-based per-example gradients equal a loop over single examples; cached ablation equals the
  naive one bit for bit; damage from skipping equals the loss of the model built by ``layers.drop_blocks``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from analysis_kit import importance as imp
from analysis_kit import layers

VOCAB = 50


def _bert(n_layers: int = 4, seed: int = 0, init: float = 0.2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                     initializer_range=init)
    return BertForSequenceClassification(cfg).eval()


def _llama(n_layers: int = 3, seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _cls_batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches with class labels (the first row of each is padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, width in ((6, 9), (5, 7)):
        ids = torch.randint(1, VOCAB, (rows, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, width - 3:] = 0
        ids[0, width - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=g)})
    return out


def _lm_batches(seed: int = 2, vocab: int = VOCAB) -> list[dict[str, torch.Tensor]]:
    out = []
    for b in _cls_batches(seed):
        ids = b["input_ids"] % vocab
        ids[b["attention_mask"] == 0] = 0
        out.append({"input_ids": ids, "attention_mask": b["attention_mask"],
                    "labels": ids.masked_fill(b["attention_mask"] == 0, -100)})
    return out


class _IdentityBlock(nn.Module):
    """Stands in for a BERT layer and returns its input (as the tuple BERT layers return)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states,)


def _zero_block(model: nn.Module, i: int) -> None:
    with torch.no_grad():
        for p in layers.get_blocks(model)[i].parameters():
            p.zero_()


# --------------------------------------------------------------------------------------------------
# identity blocks


def test_identity_bert_block_scores_zero_everywhere():
    model = _bert()
    layers.get_blocks(model)[1] = _IdentityBlock()
    df = imp.compute_all(model, _cls_batches(), seed=0, options={"conductance": {"n_steps": 4}})
    at = df[df["layer"] == 1].set_index("method")["score"]
    for method in ("fisher", "gradient", "ablation", "block_influence", "angular", "activation", "mutual_info",
                   "conductance", "shap"):
        assert at[method] == pytest.approx(0.0, abs=1e-6), method
    others = df[(df["layer"] != 1) & df["method"].isin(["block_influence", "fisher"])]
    assert (others["score"] > 0).all()  # the real blocks do change the stream and have gradients
    assert set(imp.METHODS) == set(df["method"])
    assert {"method", "layer", "score", "seed", "seconds", "n_forward", "n_backward"} <= set(df.columns)


def test_zero_llama_block_is_free_to_drop_and_has_no_influence():
    model = _llama()
    _zero_block(model, 1)  # o_proj and down_proj are zero: the block adds nothing to the residual stream
    batches = _lm_batches()
    bi = imp.compute("block_influence", model, batches)
    assert bi.loc[bi["layer"] == 1, "score"].item() == pytest.approx(0.0, abs=1e-6)
    assert (bi.loc[bi["layer"] != 1, "score"] > 1e-3).all()
    dmg = imp.ablation_damage(model, batches, {1})
    assert dmg["d_loss"] == 0.0 and dmg["d_accuracy"] == 0.0
    runs = imp.angular_runs(model, batches)
    ang = imp.compute("angular", model, batches)
    one = runs[runs["n"] == 1].sort_values("start")["distance"].to_numpy()
    np.testing.assert_allclose(one, ang["score"].to_numpy(), atol=1e-12)
    assert imp.best_run(runs, 1) == (1,)


# --------------------------------------------------------------------------------------------------
# a planted critical block


@pytest.fixture(scope="module")
def planted():
    """A 4-block LLaMA whose only non-zero block (2) was trained to predict the token two positions back,
    which needs attention: with that block skipped the model can only guess."""
    vocab, n_layers, critical = 12, 4, 2
    model = _llama(n_layers, seed=3, vocab=vocab)
    for i in range(n_layers):
        if i != critical:
            _zero_block(model, i)
    g = torch.Generator().manual_seed(0)

    def sample(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (n, 2), generator=g).repeat(1, 6)  # a b a b ...: x_t = x_{t-2}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    trainable = [p for i, b in enumerate(layers.get_blocks(model)) if i == critical for p in b.parameters()]
    trainable += [*model.model.embed_tokens.parameters(), *model.model.norm.parameters(), *model.lm_head.parameters()]
    opt = torch.optim.Adam(trainable, lr=2e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(250):
        batch = sample(32)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, [sample(8), sample(8)], critical


def test_planted_block_ranks_first(planted):
    model, batches, critical = planted
    df = imp.compute_all(model, batches, methods=["ablation", "fisher", "shap"], seed=0)
    for method, g in df.groupby("method"):
        ranked = g.sort_values("score", ascending=False)["layer"].tolist()
        assert ranked[0] == critical, (method, g[["layer", "score"]])
    zero = df[(df["layer"] != critical)]
    assert (zero["score"].abs() < 1e-9).all()  # zero blocks: no damage, no gradient, null players
    abl = df[(df["method"] == "ablation") & (df["layer"] == critical)]
    assert abl["score"].item() > 0.5  # skipping the trained block costs real loss


# --------------------------------------------------------------------------------------------------
# Shapley values


def _game_values(model: nn.Module, batches: list[dict], value: str) -> np.ndarray:
    """v(S) for every subset S of kept blocks, indexed by the bitmask sum(2**i for i in S): the whole game."""
    tr = imp.trace(model, batches)
    keeps = [tuple(bool(m >> i & 1) for i in range(tr.n_blocks)) for m in range(2**tr.n_blocks)]
    nll, correct = imp._evaluate_keeps(model, tr, keeps)
    return imp._value(tr, nll, correct, value)


def _brute_shapley(values: np.ndarray, n: int) -> np.ndarray:
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            for s in itertools.combinations(others, r):
                m = sum(1 << j for j in s)
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                phi[i] += w * (values[m | (1 << i)] - values[m])
    return phi


def test_exact_shapley_sums_to_v_all_minus_v_none_and_matches_the_formula():
    model = _bert(n_layers=3, init=0.5)
    batches = _cls_batches()
    values = _game_values(model, batches, "loss")
    assert values.shape == (8,)
    full = imp.trace(model, batches)
    assert values[-1] == pytest.approx(-full.loss, rel=1e-6)
    phi = imp._shap_exact(values, 3)
    np.testing.assert_allclose(phi, _brute_shapley(values, 3), atol=1e-9)
    df = imp.compute("shap", model, batches, value="loss")
    np.testing.assert_allclose(df["score"].to_numpy(), phi, atol=1e-9)
    assert df["score"].sum() == pytest.approx(values[-1] - values[0], abs=1e-9)
    assert (df["v_all"] - df["v_none"]).iloc[0] == pytest.approx(values[-1] - values[0], abs=1e-9)


def test_permutation_shapley_is_efficient_and_has_standard_errors():
    model = _llama(n_layers=4, seed=5)
    batches = _lm_batches()
    df = imp.compute("shap", model, batches, exact_max_blocks=2, n_permutations=6, seed=0)
    assert df["estimator"].iloc[0].startswith("antithetic permutation")
    assert df["score"].sum() == pytest.approx(df["v_all"].iloc[0] - df["v_none"].iloc[0], abs=1e-6)
    assert np.isfinite(df["se"]).all() and (df["se"] >= 0).all()
    values = _game_values(model, batches, "loss")
    exact = _brute_shapley(values, 4)
    assert np.abs(df["score"].to_numpy() - exact).max() < 4 * df["se"].max() + 1e-6  # sampling error, not bias


# --------------------------------------------------------------------------------------------------
# gradients, ablation engine, conductance


def _loop_grads(model: nn.Module, batches: list[dict], lm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example squared parameter-gradient norms and output-gradient norms, one unpadded example at a time."""
    blocks = layers.get_blocks(model)
    sq, out = [], []
    for b in batches:
        for j in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][j:j + 1, b["attention_mask"][j].bool()]
            h0 = layers.embed(model, {"input_ids": ids}).detach().requires_grad_(True)
            outs = layers.run_blocks(model, {"input_ids": ids}, hidden=h0, return_all=True)
            logits = layers.classify(model, outs[-1], None)
            loss = (F.cross_entropy(logits[0, :-1], ids[0, 1:]) if lm
                    else F.cross_entropy(logits, b["labels"][j:j + 1]))
            params = [list(blk.parameters()) for blk in blocks]
            grads = torch.autograd.grad(loss, sum(params, []) + outs)
            row, k = [], 0
            for ps in params:
                row.append(sum(float((g**2).sum()) for g in grads[k:k + len(ps)]))
                k += len(ps)
            sq.append(row)
            out.append([float(g.norm()) for g in grads[k:]])
    return np.array(sq), np.array(out)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_per_example_gradients_equal_a_loop_over_examples(kind):
    model, batches = (_bert(3), _cls_batches()) if kind == "bert" else (_llama(3), _lm_batches())
    fisher = imp.compute("fisher", model, batches)
    grad = imp.compute("gradient", model, batches)
    sq, out = _loop_grads(model, batches, lm=kind == "llama")
    np.testing.assert_allclose(fisher["score"].to_numpy(), sq.mean(0), rtol=1e-4)
    np.testing.assert_allclose(grad["score"].to_numpy(), np.sqrt(sq).mean(0), rtol=1e-4)
    np.testing.assert_allclose(grad["output_grad"].to_numpy(), out.mean(0), rtol=1e-4)
    counts = [sum(p.numel() for p in b.parameters()) for b in layers.get_blocks(model)]
    np.testing.assert_allclose(fisher["per_param"], fisher["score"] / np.array(counts))
    assert [len(v) for v in fisher["per_batch"]] == [2] * len(counts)


def test_cached_ablation_is_identical_to_naive_and_matches_dropped_models():
    model = _bert(4)
    batches = _cls_batches()
    fast = imp.compute("ablation", model, batches)["score"].to_numpy()
    np.testing.assert_array_equal(fast, imp.naive_ablation(model, batches))
    bench = imp.bench_ablation(model, batches, repeats=1)
    assert bench["identical"] and bench["n_blocks"] == 4
    for drop in ({1}, {0, 3}, {1, 2}):
        got = imp.ablation_damage(model, batches, drop)
        small = layers.drop_blocks(model, drop).eval()
        nll = n = 0.0
        with torch.no_grad():
            for b in batches:
                logits = small(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                nll += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                n += len(b["labels"])
        assert got["loss"] == pytest.approx(nll / n, abs=1e-5)


def test_conductance_is_complete_on_tuple_returning_blocks():
    model = _bert(2, init=0.3)
    batches = _cls_batches()[:1]
    df = imp.compute("conductance", model, batches, n_steps=64)
    assert df["baseline"].iloc[0] == "pad-token embeddings"
    assert (df["gap"] < 0.01).all()  # the (input, update) cut is complete: the trapezoid integral sums to F(x) - F(b)
    assert (df["signed"] + df["via_input"]).to_numpy() == pytest.approx(df["total"].to_numpy(), abs=0.02)
    small = imp.compute("conductance", model, batches, n_steps=4, internal_batch_size=4, max_examples=3)
    assert small["n_examples"].iloc[0] == 3


def test_adaptive_conductance_bisects_until_every_block_is_complete():
    """Two uniform intervals leave a large gap; bisecting where the local error is closes it to the tolerance
    with a few more points, and ``tolerance=None`` keeps the uniform grid (captum's)."""
    model, batches = _bert(3, init=0.4), _cls_batches()[:1]
    uniform = imp.compute("conductance", model, batches, n_steps=2, tolerance=None)
    adaptive = imp.compute("conductance", model, batches, n_steps=2, tolerance=0.01, max_points=400)
    assert uniform["n_points"].iloc[0] == 3 and uniform["gap_max"].max() > 0.05
    assert adaptive["gap_max"].max() <= 0.01 and 3 < adaptive["n_points"].iloc[0] < 400
    assert adaptive["gap_uniform"].to_numpy() == pytest.approx(uniform["gap"].to_numpy())  # before bisecting
    fine = imp.compute("conductance", model, batches, n_steps=256, tolerance=None)
    assert adaptive["score"].to_numpy() == pytest.approx(fine["score"].to_numpy(), rel=0.02, abs=1e-5)
    capped = imp.compute("conductance", model, batches, n_steps=2, tolerance=1e-9, max_points=5)
    assert capped["n_points"].iloc[0] == 5  # the budget is a hard cap: the gap is then reported, not hidden
    with pytest.raises(imp.ImportanceError, match="max_points must exceed"):
        imp.compute("conductance", model, batches, n_steps=8, tolerance=0.02, max_points=9)


def test_conductance_matches_captum_per_block():
    """The one-pass trapezoid integral and captum's LayerConductance (one block at a time, fine Riemann grid)
    converge to the same per-block conductance of the block's update."""
    from captum.attr import LayerConductance

    model = _bert(2, init=0.3)
    batch = imp.prepare_batches(model, _cls_batches()[:1])[0]
    batch = {k: v[:2] for k, v in batch.items()}
    ours = imp.compute("conductance", model, [batch], n_steps=64)
    tr = imp.trace(model, [batch])
    taps = torch.nn.ModuleList(imp._Tap() for _ in range(2))

    def forward(h0, mask):
        h = h0
        for i in range(2):
            a, u = taps[i](h, layers.block_forward(model, i, h, mask) - h)
            h = a + u
        return torch.softmax(layers.classify(model, h, mask).float(), -1)

    h0, mask = tr.hidden[0][0], batch["attention_mask"]
    base = imp._baseline_embedding(model, batch, "pad")
    target = forward(h0, mask).argmax(-1)
    for i in range(2):
        (_, c_upd) = LayerConductance(forward, taps[i]).attribute(
            h0, baselines=base, target=target, additional_forward_args=(mask,), n_steps=400,
            method="riemann_trapezoid")
        captum = float(c_upd.flatten(1).sum(1).abs().mean())
        assert ours["score"].iloc[i] == pytest.approx(captum, rel=0.03, abs=1e-4)


def test_conductance_and_mutual_info_run_on_a_causal_lm():
    model = _llama(2)
    batches = _lm_batches()
    df = imp.compute_all(model, batches, methods=["conductance", "mutual_info"],
                         options={"conductance": {"n_steps": 4}})
    assert np.isfinite(df["score"]).all()
    mi = df[df["method"] == "mutual_info"]
    assert mi["estimator"].iloc[0].startswith("logit lens")
    full = imp.trace(model, batches)  # the lens on the last block's output is the model itself
    assert mi["mi_out"].iloc[-1] == pytest.approx(mi["h_y"].iloc[0] - full.loss, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# validation helpers


def test_topk_oracle_and_random_draws():
    model = _bert(4, init=0.4)
    batches = _cls_batches()
    scores = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 4, "layer": list(range(4)) * 2,
                           "score": [4, 3, 2, 1, 1, 2, 3, 4.0]})
    assert imp.choose(scores, 2) == {"a": (2, 3), "b": (0, 1)}
    tr = imp.trace(model, batches)
    runs = imp.angular_runs(model, batches, trace=tr)
    top = imp.topk_damage(model, batches, scores, ks=[1, 2], n_random=20, seed=0, runs=runs, trace=tr)
    assert set(top["method"]) == {"a", "b", "angular_run", "random"}
    assert (top[top["method"] == "random"].groupby("k").size() == 20).all()
    oracle = imp.oracle_subsets(model, batches, trace=tr)
    assert len(oracle) == 4 + 6 and oracle["best"].sum() == 2
    best = oracle[oracle["best"]].set_index("k")["d_loss"]
    for _, row in top.iterrows():
        assert row["d_loss"] >= best[row["k"]] - 1e-12  # nothing beats the exhaustive optimum
    vs = imp.versus_random(top)
    assert set(vs["method"]) == {"a", "b", "angular_run"}
    assert vs["random_at_least_as_good"].between(0, 1).all()
    with pytest.raises(imp.ImportanceError, match="too large"):
        imp.oracle_subsets(_bert(9), batches)
    with pytest.raises(imp.ImportanceError, match="ks="):
        imp.topk_damage(model, batches, scores, ks=[4])


def test_rank_agreement_and_spearman_against_damage():
    scores = pd.DataFrame({"seed": [0] * 12 + [1] * 12, "method": (["x"] * 4 + ["y"] * 4 + ["z"] * 4) * 2,
                           "layer": list(range(4)) * 6,
                           "score": [1, 2, 3, 4, 10, 20, 30, 40, 4, 3, 2, 1] * 2})
    km = imp.kendall_matrix(scores, n_resamples=200).set_index(["method_a", "method_b"])
    assert km.loc[("x", "y"), "tau"] == pytest.approx(1.0)
    assert km.loc[("x", "z"), "tau"] == pytest.approx(-1.0)
    assert km.loc[("x", "x"), "ci_low"] == pytest.approx(1.0)
    single = pd.DataFrame({"seed": [0] * 4 + [1] * 4, "layer": list(range(4)) * 2, "d_loss": [0.1, 0.2, 0.3, 0.4] * 2})
    rho = imp.spearman_vs_damage(scores, single).set_index(["seed", "method"])["rho"]
    assert rho[(0, "x")] == pytest.approx(1.0) and rho[(1, "z")] == pytest.approx(-1.0)


def test_fisher_uncertainty_is_the_law_of_total_variance():
    fisher = pd.DataFrame({"seed": [0, 1], "layer": [0, 0], "per_batch": [[1.0, 3.0], [5.0, 7.0]]})
    out = imp.fisher_uncertainty(fisher).iloc[0]
    # within: mean of var{1,3}=1 and var{5,7}=1 -> 1; between: var{2,6} = 4; total var{1,3,5,7} = 5
    assert (out["var_within_seed"], out["var_between_seed"], out["var_total"]) == pytest.approx((1.0, 4.0, 5.0))
    assert out["share_between_seed"] == pytest.approx(0.8)
    with pytest.raises(imp.ImportanceError, match=">= 2 seeds"):
        imp.fisher_uncertainty(fisher.iloc[:1])


def test_entropy_vs_disagreement_matches_by_id():
    ratings = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "sd": [0.5, 1.0, 1.5, 2.0, 2.5]})
    res = imp.entropy_vs_disagreement([0.1, 0.3, 0.2, 0.5], ["a", "c", "b", "e"], ratings, n_resamples=200)
    assert res["n"] == 4 and res["rho"] == pytest.approx(1.0)


def test_cost_table_counts_shared_passes_once():
    model = _bert(2)
    df = imp.compute_all(model, _cls_batches(), methods=["fisher", "gradient", "ablation", "block_influence"])
    cost = imp.cost_table(df)
    assert sorted(cost["method"]) == sorted(["fisher", "gradient", "ablation", "block_influence",
                                              "shared: gradients", "shared: trace"])
    abl = cost.set_index("method").loc["ablation"]
    assert abl["n_forward"] == pytest.approx(1 + 0.5)  # the trace + 1 of 2 blocks re-run when block 0 is skipped


def test_trace_from_the_gradient_pass_matches_a_plain_forward():
    model = _bert(3)
    batches = _cls_batches()
    both = imp.compute_all(model, batches, methods=["fisher", "block_influence", "ablation"])
    alone = imp.compute("block_influence", model, batches)
    bi = both[both["method"] == "block_influence"]["score"].to_numpy()
    np.testing.assert_allclose(bi, alone["score"].to_numpy(), rtol=1e-5, atol=1e-7)
    cost = imp.cost_table(both).set_index("method")
    assert cost.loc["shared: trace", "seconds"] == 0.0 and cost.loc["shared: trace", "n_forward"] == 0.0
    other = imp.trace(model, _cls_batches(seed=7))
    with pytest.raises(imp.ImportanceError, match="other batches"):
        imp.compute("angular", model, batches, trace=other)


# --------------------------------------------------------------------------------------------------
# errors before compute


def test_bad_inputs_fail_early_with_a_fix():
    model = _bert(2)
    with pytest.raises(imp.ImportanceError, match="choose from"):
        imp.compute("saliency", model, _cls_batches())
    with pytest.raises(imp.ImportanceError, match="empty"):
        imp.compute("fisher", model, [])
    with pytest.raises(imp.ImportanceError, match="lm_batches"):
        imp.compute("ablation", _llama(2), _cls_batches())
    with pytest.raises(imp.ImportanceError, match="regression"):
        reg = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, num_labels=1))
        imp.compute("fisher", reg, _cls_batches())
    with pytest.raises(imp.ImportanceError, match="no option"):
        imp.compute("fisher", model, _cls_batches(), n_steps=3)
    with pytest.raises(imp.ImportanceError, match="outside"):
        imp.ablation_damage(model, _cls_batches(), {5})


# --------------------------------------------------------------------------------------------------
# the literature's protocols, the streamed ground truth and the oracle search


def test_shortgpt_block_influence_differs_from_ours_only_on_a_decoders_last_block():
    model, batches = _llama(3), _lm_batches()
    with torch.no_grad():  # a trained RMSNorm has per-channel weights (all ones would leave cosines unchanged)
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))
    df = imp.compute_all(model, batches, methods=["block_influence", "bi_shortgpt"])
    ours = df[df["method"] == "block_influence"]["score"].to_numpy()
    theirs = df[df["method"] == "bi_shortgpt"]["score"].to_numpy()
    assert theirs[:-1] == pytest.approx(ours[:-1], abs=1e-12)
    assert abs(theirs[-1] - ours[-1]) > 1e-6  # the final norm enters ShortGPT's last comparison
    bert = _bert(2, init=0.3)
    enc = imp.compute_all(bert, _cls_batches(), methods=["block_influence", "bi_shortgpt"])
    a, b = (enc[enc["method"] == m]["score"].to_numpy() for m in ("block_influence", "bi_shortgpt"))
    assert a == pytest.approx(b, abs=1e-12)  # post-norm encoder: no final norm, the two coincide


def test_gromov_angular_distance_reads_one_token():
    model, batches = _llama(3), _lm_batches()
    tr = imp.trace(model, batches)
    got = imp.compute("angular_gromov", model, batches, trace=tr)["score"].to_numpy()
    b, hs = tr.batches[0], tr.hidden[0]
    last = b["attention_mask"].sum(1) - 1  # right padding: the last real token
    rows = torch.arange(hs[0].shape[0])
    want = [float((torch.arccos(F.cosine_similarity(hs[i][rows, last].double(), hs[i + 1][rows, last].double(),
                                                    dim=-1).clamp(-1, 1)) / math.pi).mean()) for i in range(3)]
    if len(tr.batches) == 1:
        assert got == pytest.approx(want, abs=1e-9)
    runs = imp.angular_runs(model, batches, trace=tr, token="read")
    assert runs[runs["n"] == 1]["distance"].to_numpy() == pytest.approx(got, abs=1e-9)
    with pytest.raises(imp.ImportanceError, match="token"):
        imp.angular_runs(model, batches, trace=tr, token="first")


def test_single_block_angular_scores_are_the_n1_runs_with_per_example_errors():
    """``angular`` and ``angular_gromov`` are ``angular_runs``' n = 1 rows: mean over tokens (or read-out
    tokens) and the standard error of per-example means, the same from a trace over its memory budget."""
    model, batches = _llama(3), _lm_batches()
    full = imp.trace(model, batches)
    lean = imp.trace(model, batches, budget_bytes=0)
    assert full.complete and not lean.complete
    for method, token in (("angular", "all"), ("angular_gromov", "read")):
        got = imp.compute(method, model, batches, trace=full)
        again = imp.compute(method, model, batches, trace=lean)
        np.testing.assert_allclose(again[["score", "se"]].to_numpy(), got[["score", "se"]].to_numpy(), atol=1e-12)
        per_ex, dist_all = [], []
        for b, hs in zip(full.batches, full.hidden, strict=True):
            mask = b["attention_mask"].bool()
            if token == "all":
                rows = [torch.stack([torch.arccos(F.cosine_similarity(hs[i][r][mask[r]].double(),
                                                                      hs[i + 1][r][mask[r]].double(), dim=-1,
                                                                      eps=1e-12).clamp(-1, 1)) / math.pi
                                     for i in range(3)], 1) for r in range(mask.shape[0])]
                dist_all.extend(rows)
                per_ex.extend(r.mean(0) for r in rows)
            else:
                last = mask.sum(1) - 1
                idx = torch.arange(mask.shape[0])
                d = torch.stack([torch.arccos(F.cosine_similarity(hs[i][idx, last].double(),
                                                                  hs[i + 1][idx, last].double(), dim=-1,
                                                                  eps=1e-12).clamp(-1, 1)) / math.pi
                                 for i in range(3)], 1)
                dist_all.extend(d)
                per_ex.extend(d)
        per_ex = torch.stack(per_ex).numpy()
        tokens = torch.cat([t.reshape(-1, 3) for t in dist_all]).numpy()
        np.testing.assert_allclose(got["score"].to_numpy(), tokens.mean(0), atol=1e-9)
        np.testing.assert_allclose(got["se"].to_numpy(), per_ex.std(0, ddof=1) / math.sqrt(len(per_ex)), atol=1e-9)


def test_streamed_per_example_damage_equals_the_traced_damage():
    model, batches = _bert(3, init=0.3), _cls_batches()
    sets = [{0}, {2}, {0, 1}, {1, 2}]
    ref = imp.damage(model, batches, sets)
    got = imp.per_example_damage(model, batches, sets)
    assert got.d_loss() == pytest.approx(ref["d_loss"].to_numpy(), abs=1e-6)
    assert got.index({2, 1}) == 3
    assert got.block_passes > 1  # the full pass plus the skipped sets' remaining blocks


def test_beam_oracle_is_exhaustive_on_small_stacks_and_a_beam_beyond():
    model, batches = _bert(4, init=0.3), _cls_batches()
    gt, best = imp.beam_oracle(model, batches, [1, 2], exhaustive_max=64)
    exhaustive = imp.oracle_subsets(model, batches, ks=[1, 2])
    for k in (1, 2):
        row = exhaustive[(exhaustive["k"] == k) & exhaustive["best"]].iloc[0]
        got = best[best["k"] == k].iloc[0]
        assert got["drop"] == row["drop"] and got["search"] == "exhaustive"
        assert got["d_loss"] == pytest.approx(row["d_loss"], abs=1e-6)
    assert len(gt.sets) == 4 + 6
    _, beam = imp.beam_oracle(model, batches, [2], width=1, exhaustive_max=4)
    assert beam["search"].iloc[0] == "beam (width 1)" and beam["n_evaluated"].iloc[0] == 3
    with pytest.raises(imp.ImportanceError, match="ks"):
        imp.beam_oracle(model, batches, [4])


# --------------------------------------------------------------------------------------------------
# memory: a trace over its budget


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_trace_over_its_memory_budget_recomputes_and_scores_the_same(kind):
    """Over its budget a trace keeps only each batch's embedding output and recomputes a batch's boundaries when
    a method reads them: every trace-reading method gives the same scores and intervals as from the complete
    trace, each at one more forward pass (counted in ``n_forward``), and the held memory is 1/(L+1)."""
    model, batches = (_bert(4), _cls_batches()) if kind == "bert" else (_llama(3), _lm_batches())
    full, lean = imp.trace(model, batches), imp.trace(model, batches, budget_bytes=0)
    assert full.complete and not lean.complete
    assert lean.held_bytes * (full.n_blocks + 1) == full.held_bytes
    np.testing.assert_array_equal(lean.nll, full.nll)
    methods = [m for m in imp.METHODS if "trace" in imp._REGISTRY[m].needs]
    options = {"conductance": {"n_steps": 4, "max_examples": 3}, "shap": {"exact_max_blocks": 0, "n_permutations": 4}}
    a = imp.compute_all(model, batches, methods, trace=full, options=options)
    b = imp.compute_all(model, batches, methods, trace=lean, options=options)
    for col in ("score", "se"):
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=1e-12, atol=1e-12,
                                   equal_nan=True, err_msg=col)
    extra = (b.groupby("method")["n_forward"].first() - a.groupby("method")["n_forward"].first())
    n = lean.n_examples  # one more pass for every method that reads boundaries; conductance reads 3 examples
    expected = {m: 0.0 if m == "shap" else 3 / n if m == "conductance" else 1.0 for m in methods}
    np.testing.assert_allclose(extra[methods].to_numpy(), [expected[m] for m in methods], rtol=1e-9)
    assert lean.recomputed == round(sum(expected.values()) * n)
    assert full.recomputed == 0


def test_trace_budget_is_decided_from_the_data_size():
    model, batches = _bert(2), _cls_batches()
    need = sum(b["input_ids"].numel() for b in batches) * 32 * 4 * 3  # tokens x width x float32 x (L + 1)
    assert imp.trace(model, batches, budget_bytes=need).complete
    assert not imp.trace(model, batches, budget_bytes=need - 1).complete
    grads = imp._grad_pass(model, imp.prepare_batches(model, batches), keep_trace=True, budget_bytes=need - 1)
    assert not grads.trace.complete and grads.trace.held_bytes * 3 == imp.trace(model, batches).held_bytes
