"""The kit on a CUDA device: each family's GPU path checked against its CPU result on tiny random models.

CI and most development machines have no GPU, so every test here is skipped there (the skip names why). On a
GPU machine run ``pytest tests/test_cuda.py`` (CONTRIBUTING, "Checking the GPU paths"). Tolerances allow for
float32 reduction order only; training runs are compared by what must hold on any device (finite losses, the
result on the requested device, the same decisions), because dropout draws from a different generator on GPU.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import word_tokenizer
from test_dynamic import WORDS, tiny_bert, toy_frame
from test_heal_recipes import CFG, frame, teacher
from test_heal_recipes import WORDS as HEAL_WORDS
from test_importance import _bert, _cls_batches, _llama, _lm_batches
from test_quantize import step_cost_check

from analysis_kit import dynamic as dy
from analysis_kit import heal, layers
from analysis_kit import importance as imp
from analysis_kit import quantize as q

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on CI)")
warnings.filterwarnings("ignore", category=FutureWarning)

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Cached 4-bit models go to a temporary cache, never the repository's."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in matrix products, so GPU and CPU differ by reduction order only."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------ importance


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_every_importance_method_scores_the_same_on_the_gpu(kind):
    """All registered methods, one shared trace and gradient pass, on CPU and on CUDA: the same scores."""
    make, batches = (_bert, _cls_batches) if kind == "classifier" else (_llama, _lm_batches)
    cpu = imp.compute_all(make(), batches(), seed=0)
    gpu = imp.compute_all(make().to(CUDA), batches(), seed=0)
    assert list(cpu["method"].unique()) == list(imp.METHODS)
    for method, want in cpu.groupby("method", sort=False):
        got = gpu[gpu["method"] == method]
        a, b = want["score"].to_numpy(float), got["score"].to_numpy(float)
        scale = max(float(np.abs(a).max()), 1e-12)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * scale, err_msg=f"{kind}/{method}")


def test_per_example_damage_is_the_same_on_the_gpu():
    drops = [(0,), (1, 2), (3,)]
    cpu = imp.per_example_damage(_bert(), _cls_batches(), drops)
    gpu = imp.per_example_damage(_bert().to(CUDA), _cls_batches(), drops)
    assert gpu.sets == cpu.sets
    for field in ("nll", "full_nll", "correct", "full_correct", "units"):
        np.testing.assert_allclose(np.asarray(getattr(gpu, field), float), np.asarray(getattr(cpu, field), float),
                                   rtol=1e-4, atol=1e-5, err_msg=field)


# -------------------------------------------------------------------------------------------- healing


@pytest.fixture(scope="module")
def heal_tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("heal_vocab"), HEAL_WORDS)


@pytest.mark.parametrize("recipe", heal.RECIPES)
def test_every_recipe_heals_on_the_gpu(heal_tokenizer, recipe):
    """Each recipe trains on CUDA with the same budget as on CPU and returns a plain model of k blocks."""
    tr, val = frame(48, 0), frame(24, 1)
    first_k = lambda k: layers.keep_blocks(teacher(heal_tokenizer, seed=5), range(k))  # noqa: E731
    runs = {dev: heal.heal_recipe(recipe, teacher(heal_tokenizer), (0, 2), heal_tokenizer, tr, val, CFG, seed=0,
                                  first_k=first_k, device=dev) for dev in ("cpu", "cuda")}
    (m_cpu, h_cpu, i_cpu), (m_gpu, h_gpu, i_gpu) = runs["cpu"], runs["cuda"]
    assert len(layers.get_blocks(m_gpu)) == len(layers.get_blocks(m_cpu)) == 2
    assert len(h_gpu) == len(h_cpu) and np.isfinite(h_gpu.select_dtypes("number").to_numpy(float)).all()
    assert i_gpu.get("steps") == i_cpu.get("steps"), (i_cpu, i_gpu)


# -------------------------------------------------------------------------------------- dynamic depth


@pytest.fixture(scope="module")
def exit_tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("exit_vocab"), WORDS)


def test_exit_predictions_and_runner_decisions_match_the_cpu(exit_tokenizer):
    """Exit logits on CUDA equal the CPU's; the lean runner on CUDA takes the simulated decisions."""
    model = tiny_bert(exit_tokenizer, seed=3)
    heads = dy.ExitHeads.from_model(model, seed=1).eval()
    texts = toy_frame(16, 3)["text"].tolist()
    cpu = dy.predict_exits(model, heads, exit_tokenizer, texts, max_length=32, device="cpu")
    gm, gh = copy.deepcopy(model).to(CUDA), copy.deepcopy(heads).to(CUDA)
    gpu = dy.predict_exits(gm, gh, exit_tokenizer, texts, max_length=32, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
    probs = dy.exit_probs(cpu)
    policy = dy.EntropyPolicy(float(np.median(dy.normalised_entropy(probs[:, :-1]))))
    want = dy.simulate(policy, probs)
    runner = dy.ExitRunner(gm, gh)
    for idx, batch in dy.encode_each(exit_tokenizer, texts, 32, 1):
        _, depth = runner(batch, policy)
        assert depth.tolist() == want[idx].tolist()
    batches = dy.encode_each(exit_tokenizer, texts, 32, 4)
    table = dy.time_configs({"entropy": lambda b, i: runner(b, policy)}, batches, repeats=2, device=CUDA)
    assert len(table) == len(batches) and (table["ms"] > 0).all()


def test_exit_training_runs_on_the_gpu(exit_tokenizer):
    splits = {"train": toy_frame(64, 0), "val": toy_frame(32, 1)}
    cfg = dy.ExitTrainConfig(mode="frozen", epochs=3, head_lr=1e-2, batch_size=16, max_length=32, patience=3)
    out, heads, hist = dy.train_exits(tiny_bert(exit_tokenizer), exit_tokenizer, splits["train"], splits["val"],
                                      cfg, seed=0, device="cuda")
    assert len(hist) == 3 and np.isfinite(hist.select_dtypes("number").to_numpy(float)).all()
    assert next(heads.parameters()).device.type in ("cuda", "cpu")


# --------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("in_features", [64, 100, 384])
def test_4bit_matmul_on_the_gpu_matches_nf4_expectation(in_features):
    """The same checks as on CPU (tests/test_quantize.py), through bitsandbytes' CUDA kernels."""
    r = q.matmul_check(in_features, 72, batch=48, device="cuda")
    assert r["kernel_error"] < 1e-3, r  # fp16/bf16 compute inside the CUDA kernel, not float32
    assert 0.07 < r["roundtrip_error"] < 0.12, r
    assert 0.6 * r["weight_error"] < r["output_error"] < 1.4 * r["weight_error"], r


def test_qlora_training_step_cost_reads_the_cuda_allocator():
    """tests/test_quantize.py's step-cost check on CUDA: measured on the GPU, by CUDA's allocator."""
    step_cost_check("cuda", "cuda allocator peak")
