"""`analysis-kit analyze` and `analyze.Analyzer` on tiny random models of every supported family.

The compressed folders are loaded in a fresh Python process that never imports ``analysis_kit``, so
only ``transformers`` reads them; bad data and bad models must fail before any weights are loaded.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MPNetConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

from analysis_kit import analyze, cli, compress, importance, layers

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "the", "phone", "was", "very", "not", "screen"]
POSITIVE = ("good", "great", "fine")
TEXTS = ["the phone was good", "the screen was very awful", "not fine"]
N_BLOCKS = 4
FAST = {"calib_examples": 24, "calib_batch_size": 8, "latency_rounds": 1, "latency_batch": 2, "max_length": 16}
METHODS = ["block_influence", "ablation"]

LOADER = textwrap.dedent("""
    import inspect, json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    texts = json.loads(sys.argv[1])
    results = {}
    for job in sys.argv[2:]:
        folder, kind = job.rsplit(":", 1)
        tok = AutoTokenizer.from_pretrained(folder)
        cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
        model = cls.from_pretrained(folder).eval()
        out = {"layers": model.config.num_hidden_layers, "class": type(model).__name__}
        with torch.no_grad():
            batch = tok(texts, padding=True, return_tensors="pt")
            batch = {k: v for k, v in batch.items() if k in inspect.signature(model.forward).parameters}
            out["logits"] = model(**batch).logits.tolist()
            if kind == "lm":
                ids = torch.tensor([[5, 6, 7]])
                gen = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
                ref = ids
                for _ in range(5):  # greedy decoding without the KV cache, as a reference
                    ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
                out["generated"], out["reference"] = gen.tolist(), ref.tolist()
        results[job] = out
    results["imported_analysis_kit"] = "analysis_kit" in sys.modules
    print(json.dumps(results))
""")

_COMMON = {"hidden_size": 32, "num_hidden_layers": N_BLOCKS, "num_attention_heads": 4, "intermediate_size": 64,
           "pad_token_id": 0}
_DECODER = {"num_key_value_heads": 2, "max_position_embeddings": 64}


def make_config(family: str, vocab: int):
    """A tiny config (hidden 32, 4 blocks) of one family; Mistral/Qwen2 with a sliding window of 4 tokens."""
    if family == "bert":
        return BertConfig(vocab_size=vocab, **_COMMON, max_position_embeddings=64)
    if family == "roberta":
        return RobertaConfig(vocab_size=vocab, **_COMMON, max_position_embeddings=66)
    if family == "distilbert":
        return DistilBertConfig(vocab_size=vocab, dim=32, n_layers=N_BLOCKS, n_heads=4, hidden_dim=64, pad_token_id=0,
                                max_position_embeddings=64)
    if family == "mpnet":
        return MPNetConfig(vocab_size=vocab, **_COMMON, max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, **_COMMON, **_DECODER)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab, **_COMMON, **_DECODER, sliding_window=4)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab, **_COMMON, **_DECODER, use_sliding_window=True, sliding_window=4,
                           max_window_layers=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=N_BLOCKS, n_head=4, n_positions=64, pad_token_id=0)
    raise KeyError(family)


ENCODERS = ["bert", "roberta", "distilbert", "mpnet"]
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
JOBS = [(f, "cls") for f in ENCODERS + DECODERS] + [(f, "lm") for f in DECODERS]


def inputs(model, batch: dict) -> dict:
    """The tokenizer's output that ``model.forward`` accepts (MPNet takes no token_type_ids)."""
    return {k: v for k, v in batch.items() if k in inspect.signature(model.forward).parameters}


def save_model(folder: Path, tokenizer, family: str, head: str = "cls", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if head == "cls" else AutoModelForCausalLM
    model = cls.from_config(make_config(family, len(tokenizer))).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reviews(n: int = 48, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["good", "bad", "great", "awful", "fine", "poor"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        extra = " ".join(rng.choice(["the", "phone", "screen", "was", "very"], size=int(rng.integers(1, 6))))
        rows.append({"review": f"{extra} {w}", "stars": "positive" if w in POSITIVE else "negative",
                     "label": int(w in POSITIVE)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    reviews().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("bert"), tokenizer, "bert")


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer, csv_file):
    """Every family and head: importance, plan (keep 2 of 4), compress; then one transformers-only subprocess."""
    root = tmp_path_factory.mktemp("families")
    built = {}
    for family, head in JOBS:
        src = save_model(root / f"{family}-{head}", tokenizer, family, head)
        a = analyze.Analyzer(src, csv_file, root / f"out-{family}-{head}", text_column="review", device="cpu",
                             task="classification" if head == "cls" else "lm", **FAST)
        a.importance(METHODS)
        plan = a.plan(keep=2)
        small = a.compress()
        built[(family, head)] = (a, plan, small)
    jobs = [f"{a.out / 'model'}:{head}" for (family, head), (a, _, _) in built.items()]
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(TEXTS), *jobs], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded.pop("imported_analysis_kit") is False
    return built, {key: loaded[job] for key, job in zip(built, jobs, strict=True)}


@pytest.mark.parametrize("job", JOBS, ids=[f"{f}-{h}" for f, h in JOBS])
def test_compressed_folder_reloads_with_transformers_alone_and_matches(families, tokenizer, job):
    built, loaded = families
    a, plan, small = built[job]
    out = loaded[job]
    assert out["layers"] == 2 == len(plan.keep)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = small(**inputs(small, batch)).logits.numpy()
        again = compress.compact(a.model, plan.keep)(**inputs(small, batch)).logits.numpy()
    np.testing.assert_allclose(np.array(out["logits"]), ours, atol=1e-5)
    np.testing.assert_allclose(ours, again, atol=1e-6)  # the folder holds the kit's in-memory compact model
    record = json.loads((a.out / "model" / "compression.json").read_text())
    assert record["keep"] == list(plan.keep) and record["n_kept"] == 2
    assert (a.out / "model" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("family", DECODERS)
def test_compressed_decoder_generates_with_kv_cache(families, family):
    built, loaded = families
    out = loaded[(family, "lm")]
    assert out["generated"] == out["reference"]
    small = built[(family, "lm")][2]
    with torch.no_grad():
        ours = small.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, use_cache=True,
                              pad_token_id=0)
    assert out["generated"] == ours.tolist()


def test_importance_has_intervals_over_calibration_batches(families):
    a = families[0][("bert", "cls")][0]
    assert set(a.scores["method"]) == set(METHODS) and len(a.scores) == 2 * N_BLOCKS
    assert (a.scores["n"] == 3).all()  # 24 calibration examples in batches of 8
    assert a.scores["interval"].str.contains("over 3 calibration batches").all()
    assert (a.scores["ci_low"] <= a.scores["score"]).all() and (a.scores["score"] <= a.scores["ci_high"]).all()
    per_batch = a.batch_scores.groupby(["method", "layer"])["score"].mean().reset_index()
    merged = a.scores.merge(per_batch, on=["method", "layer"], suffixes=("", "_batches"))
    np.testing.assert_allclose(merged["score"], merged["score_batches"])


def _md_cells(md: str, first: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def check_report(out: Path) -> dict:
    record = json.loads((out / "report.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    svg = (out / "importance.svg").read_text()
    assert svg.lstrip().startswith("<svg") and svg in page
    assert "![importance of each block](importance.svg)" in md
    for name, m in record["metrics"].items():
        cells = _md_cells(md, name)
        interval = "–" if m["ci_low"] is None else f"[{analyze._fmt(m['ci_low'])}, {analyze._fmt(m['ci_high'])}]"
        assert cells[1:4] == [analyze._fmt(m["mean"]), interval, analyze._fmt(m["n"])], (name, cells)
        assert f"<td>{name}</td><td>{analyze._fmt(m['mean'])}</td>" in page
    for row in record["importance"]:
        cells = _md_cells(md, str(row["layer"]))
        assert any(c.startswith(analyze._fmt(row["score"])) for c in cells[2:])
    plan = record["plan"]
    assert _md_cells(md, "kept blocks")[1] == ", ".join(map(str, plan["keep"]))
    assert f"{plan['n_kept']} of {plan['n_blocks']} kept" in md
    return record


def test_cli_analyze_writes_report_and_resumes_after_an_interrupt(bert_dir, csv_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def command(keep: int) -> list[str]:
        return ["analyze", str(bert_dir), "--data", str(csv_file), "--out", str(out), "--text-column", "review",
                "--methods", "block_influence", "ablation", "--keep", str(keep), "--calib-examples", "24",
                "--device", "cpu", "--max-length", "16"]

    args = command(2)
    real_select = compress.select

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress, "select", interrupted)  # stop after the scores are in
    assert cli.main(args) == 130
    assert "Run the same command again to resume" in capsys.readouterr().err
    assert list((out / ".analyze" / "scores").rglob("*.json")) and not (out / "report.json").exists()

    def never(*a, **k):
        raise AssertionError("importance recomputed although its stage was cached")

    monkeypatch.setattr(compress, "select", real_select)
    monkeypatch.setattr(importance, "compute", never)
    assert cli.main(args) == 0
    assert "kept blocks" in capsys.readouterr().out
    record = check_report(out)
    assert record["run"]["stages"] == {"importance": "cached", "plan": "computed", "evaluate": "computed"}
    assert record["plan"]["n_kept"] == 2 and record["model"]["task"] == "classification"
    assert set(record["metrics"]) == {"accuracy/full", "accuracy/compressed", "retention", "latency_ms/full",
                                      "latency_ms/compressed", "speedup"}
    assert record["data"]["labels"] == {"0": 0, "1": 1}
    weights = out / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert cli.main(args) == 0  # everything cached: nothing recomputed, the model folder untouched
    again = json.loads((out / "report.json").read_text())
    assert set(again["run"]["stages"].values()) == {"cached"}
    assert again["metrics"] == record["metrics"] and weights.stat().st_mtime_ns == stamp
    assert cli.main(command(3)) == 0  # another size: only the plan onwards is redone
    third = json.loads((out / "report.json").read_text())
    assert third["plan"]["n_kept"] == 3 and third["run"]["stages"]["importance"] == "cached"


def test_lm_report_has_loss_perplexity_and_retention(tmp_path, tokenizer, csv_file):
    src = save_model(tmp_path / "llama", tokenizer, "llama", "lm")
    record = analyze.run(src, csv_file, tmp_path / "out", methods=["block_influence"], strategy="drop_last",
                         target_ratio=2.0, text_column="review", device="cpu", **FAST)
    check_report(tmp_path / "out")
    m = record["metrics"]
    assert record["model"]["task"] == "lm" and record["plan"]["keep"] == [0, 1]
    assert m["perplexity/full"]["mean"] == pytest.approx(np.exp(m["loss/full"]["mean"]))
    assert m["retention"]["mean"] == pytest.approx(np.exp(m["loss/full"]["mean"] - m["loss/compressed"]["mean"]))
    assert m["loss/full"]["n"] == record["evaluation"]["n_examples"] == record["data"]["n_held_out"]


@pytest.mark.parametrize("how", ["finetune", "distill", "lora"])
def test_healing_trains_the_compressed_model_and_is_cached(bert_dir, csv_file, tmp_path, how):
    a = analyze.Analyzer(bert_dir, csv_file, tmp_path / "out", text_column="review", device="cpu", **FAST)
    a.importance(["block_influence"])
    plan = a.plan(keep=2)
    healed = a.compress(heal=how, heal_steps=2)
    plain = compress.compact(a.model, plan.keep)
    trained, untrained = healed.state_dict(), plain.state_dict()
    assert trained.keys() == untrained.keys() and any(not torch.equal(trained[k], untrained[k]) for k in trained)
    assert a.stages.status["heal"] == "computed" and a._heal["steps"] == 2
    reloaded = AutoModelForSequenceClassification.from_pretrained(a.out / "model").eval()
    batch = a.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**batch).logits.numpy(), healed(**batch).logits.numpy(), atol=1e-5)
    again = a.compress(heal=how, heal_steps=2)
    assert a.stages.status["heal"] == "cached"
    assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items())


# ------------------------------------------------------------------------------------------ data formats


def test_data_formats_and_column_names(tmp_path, bert_dir):
    config, task = analyze.inspect_model(bert_dir)
    df = reviews(30)
    df[["review", "stars"]].to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    with open(tmp_path / "r.jsonl", "w", encoding="utf-8") as fh:
        for rec in df[["review", "label"]].to_dict("records"):
            fh.write(json.dumps(rec) + "\n")
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    tsv = analyze.load_data(tmp_path / "r.tsv", task, config, text_column="review", label_column="stars")
    jsonl = analyze.load_data(tmp_path / "r.jsonl", task, config, text_column="review")
    assert tsv.format == "tsv" and jsonl.format == "jsonl"
    assert tsv.label_ids == {"negative": 0, "positive": 1} and len(tsv.train) + len(tsv.held_out) == 30
    pd.testing.assert_frame_equal(tsv.held_out, jsonl.held_out)  # same rows, same seeded split
    frame = analyze.load_data(df, task, config, text_column="review")  # a DataFrame in memory
    assert frame.format == "dataframe"
    pd.testing.assert_frame_equal(frame.held_out, jsonl.held_out)
    amazon = analyze.load_data(Path(__file__).parent / "fixtures" / "amazon_reviews_2023_sample.jsonl", "lm",
                               held_out=0.4)
    assert amazon.format == "amazon2023" and len(amazon.train) + len(amazon.held_out) > 0


def test_datasets_folder():
    """A folder written by datasets' save_to_disk (the fixture of tests/test_data.py), read without `datasets`."""
    data = analyze.load_data(Path(__file__).parent / "fixtures" / "datasets_folder", "classification",
                             text_column="review", label_column="stars")
    assert data.format == "datasets" and len(data.train) + len(data.held_out) == 30


@pytest.fixture
def no_loading(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(analyze, "_load_model", never)
    monkeypatch.setattr(compress, "_load_any", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_bad_data_fails_before_the_model_loads(bert_dir, tmp_path, capsys, no_loading):
    good = reviews(40)
    good.to_csv(tmp_path / "ok.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("review,label\n")
    (tmp_path / "latin.csv").write_bytes(b"review,label\ngood phone,1\nbad phone,0\ncaf\xe9 phone,1\n")
    good.assign(label=1).to_csv(tmp_path / "one.csv", index=False)
    good.head(6).to_csv(tmp_path / "few.csv", index=False)
    good.assign(label=good["label"].map({0: "neg", 1: "pos"})).to_csv(tmp_path / "names.csv", index=False)
    (tmp_path / "bad.jsonl").write_text('{"review": "good", "label": 1}\n{"review": "bad", label: 0}\n')
    cases = [
        ("ok.csv", [], r"has no column\(s\) \['text'\]; its columns are \['review', 'stars', 'label'\]"),
        ("empty.csv", ["--text-column", "review"], "empty.csv is empty"),
        ("header.csv", ["--text-column", "review"], "header.csv holds no rows"),
        ("latin.csv", ["--text-column", "review"], "latin.csv: line 4 is not UTF-8 text"),
        ("one.csv", ["--text-column", "review"], "every row has the same label '1'"),
        ("few.csv", ["--text-column", "review"], "too few for a held-out split of 20%"),
        ("names.csv", ["--text-column", "review"], r"labels \['neg', 'pos'\] do not fit the model's head"),
        ("bad.jsonl", ["--text-column", "review"], "bad.jsonl:2: not valid JSON"),
        ("missing.csv", [], "does not exist"),
        ("ok.csv", ["--text-column", "review", "--device", "cuda"], "CUDA is not available"),
        ("ok.csv", ["--text-column", "review", "--methods", "magic"], r"unknown importance method\(s\) \['magic'\]"),
        ("ok.csv", ["--text-column", "review", "--keep", "9"], "cannot keep 9 of 4 blocks"),
        ("ok.csv", ["--text-column", "review", "--strategy", "best"], "unknown strategy 'best'"),
        ("ok.csv", ["--text-column", "review", "--task", "lm"], "--task lm does not fit"),
    ]
    for name, extra, match in cases:
        out = tmp_path / "out"
        assert cli.main(["analyze", str(bert_dir), "--data", str(tmp_path / name), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert re.search(match, err), (match, err)
        assert not out.exists()


def test_unsupported_architecture_is_refused_from_the_config_alone(tmp_path, csv_file, capsys, no_loading):
    folders = {"t5": T5Config(num_layers=2, d_model=32, num_heads=2, d_ff=64)}
    if "roberta" not in layers.SUPPORTED:
        folders["roberta"] = RobertaConfig(**_COMMON, vocab_size=30)
    for name, config in folders.items():
        config.architectures = ["SomethingForSequenceClassification"]
        config.save_pretrained(tmp_path / name)  # a config and no weights: nothing else may be read
        assert cli.main(["analyze", str(tmp_path / name), "--data", str(csv_file), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"holds a {name!r} model" in err and ", ".join(layers.SUPPORTED) in err, err
        assert not (tmp_path / "o").exists()


def test_output_folder_of_something_else_is_refused(bert_dir, csv_file, tmp_path, no_loading):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(analyze.AnalyzeError, match="not an analyze output folder"):
        analyze.Analyzer(bert_dir, csv_file, tmp_path / "mine", text_column="review")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_docstring_example_runs():
    import doctest

    result = doctest.testmod(analyze, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_one_run_at_a_time_per_output_folder(bert_dir, csv_file, tmp_path):
    first = analyze.Analyzer(bert_dir, csv_file, tmp_path / "out", text_column="review", device="cpu")
    first.load()
    second = analyze.Analyzer(bert_dir, csv_file, tmp_path / "out", text_column="review", device="cpu")
    with pytest.raises(analyze.AnalyzeError, match="another analyze run is writing to"):
        second.load()


def test_stages_are_redone_when_the_model_or_data_change(tmp_path, tokenizer, csv_file):
    src = save_model(tmp_path / "m", tokenizer, "bert")

    def status(data=csv_file) -> str:
        a = analyze.Analyzer(src, data, tmp_path / "out", text_column="review", device="cpu", **FAST)
        a.importance(["block_influence"])
        return a.stages.status["importance"]

    assert status() == "computed"
    assert status() == "cached"
    save_model(src, tokenizer, "bert", seed=1)  # new weights, same folder
    assert status() == "computed"
    other = tmp_path / "other.csv"
    reviews(seed=1).to_csv(other, index=False)
    assert status(other) == "computed"
    assert status(other) == "cached"


@pytest.mark.parametrize("family, head", [("bert", "cls"), ("llama", "lm")])
def test_scores_do_not_depend_on_how_a_calibration_batch_is_split_into_forward_passes(
        tmp_path, tokenizer, csv_file, monkeypatch, family, head):
    """Each calibration batch runs as length-sorted forward batches of at most ``MICRO_BATCH`` texts (less
    padding); every method must give the scores it gives on the batch as one padded forward pass."""
    monkeypatch.setattr(analyze, "MICRO_BATCH", 4)  # the tiny texts would fit one group of the default size
    src = save_model(tmp_path / "model", tokenizer, family, head)
    methods = ["block_influence", "angular", "ablation", "fisher"]
    task = "classification" if head == "cls" else "lm"
    scores, padded, split = {}, {}, analyze.MICRO_BATCH
    for micro in (split, 10**6):
        monkeypatch.setattr(analyze, "MICRO_BATCH", micro)
        monkeypatch.setattr(analyze, "PAD_SLACK", 1.25 if micro == split else float("inf"))
        a = analyze.Analyzer(src, csv_file, tmp_path / f"out{micro}", text_column="review", device="cpu",
                             task=task, **{**FAST, "calib_batch_size": 12})
        a.load()
        units = a._calib_batches()
        assert [sum(b["input_ids"].shape[0] for b in u) for u in units] == [12, 12]
        sizes = [b["input_ids"].shape[0] for u in units for b in u]
        assert max(sizes) <= micro and (micro == split or sizes == [12, 12])
        padded[micro] = sum(b["input_ids"].numel() for u in units for b in u)
        a.importance(methods)
        scores[micro] = a.batch_scores.sort_values(["method", "batch", "layer"])["score"].to_numpy()
    assert padded[split] < padded[10**6]  # the split saves padding on texts of mixed lengths
    np.testing.assert_allclose(scores[split], scores[10**6], rtol=1e-4, atol=1e-6)


def test_angular_plan_reads_the_runs_of_the_importance_trace(tmp_path, tokenizer, csv_file, monkeypatch):
    """``importance(["angular"])`` keeps every run's angular distance from its own trace; the angular strategy
    then reads them (no second pass over the calibration texts) and they equal ``compress.angular_distances``."""
    src = save_model(tmp_path / "model", tokenizer, "llama", "lm")
    a = analyze.Analyzer(src, csv_file, tmp_path / "out", text_column="review", device="cpu", task="lm", **FAST)
    a.importance(["angular"])
    expected = compress.angular_distances(a.model, a._encode(a._calibration(), 5), "cpu")
    runs = a._angular_runs()
    merged = expected.merge(runs, on=["start", "n"], suffixes=("", "_ours"))
    assert len(merged) == len(expected) == len(runs)
    np.testing.assert_allclose(merged["distance_ours"], merged["distance"], rtol=1e-4, atol=1e-6)

    def second_pass(*args, **kwargs):
        raise AssertionError("the angular strategy ran the model again")

    monkeypatch.setattr(compress, "angular_distances", second_pass)
    plan = a.plan(keep=2, strategy="angular")
    assert plan.keep == compress.keep_angular(a.model, None, 2, table=expected)


def test_length_groups_bound_the_padding():
    lengths = [81, 20, 18, 5, 19, 64, 21, 3, 17, 22, 60, 2]
    groups = analyze._length_groups(lengths, max_size=4, slack=1.25)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every text once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) <= 4 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 1.25 * real)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < 0.5 * len(lengths) * max(lengths)  # one padded batch would hold twice as much or more


def test_analyze_stages_are_keyed_by_every_module_that_computes_them():
    """A cached stage (scores, plan, healed model, evaluation) is reused only while the code that computed it is
    unchanged: the key holds every kit module analyze imports, directly or through another, except the declared
    file-keeping and rendering ones."""
    import ast

    package = Path(analyze.__file__).parent

    def imports(name: str) -> set[str]:
        tree = ast.parse((package / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        return {m for m in found if (package / f"{m}.py").is_file()}

    reached, todo = set(), ["analyze"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(imports(name))
    assert reached - set(analyze.KEY_EXEMPT) == set(analyze.KEY_MODULES)
    assert not set(analyze.KEY_MODULES) & set(analyze.KEY_EXEMPT)
    assert [m.__name__.rsplit(".", 1)[1] for m in analyze._key_modules()] == list(analyze.KEY_MODULES)
