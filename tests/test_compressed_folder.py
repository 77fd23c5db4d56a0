"""A compressed model is a plain Hugging Face folder: `transformers` alone loads and runs it.

The loading side runs in a fresh Python process that never imports ``analysis_kit`` (and checks that
it did not), so nothing of ours can patch transformers behind the scenes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from analysis_kit import cli, compress

WORDS = ["good", "bad", "great", "awful", "the", "movie", "was", "not", "very", "fine"]
TEXTS = ["the movie was good", "not very fine", "awful"]

LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    texts = json.loads(sys.argv[1])
    results = {}
    for job in sys.argv[2:]:
        folder, kind = job.rsplit(":", 1)
        tok = AutoTokenizer.from_pretrained(folder)
        cls = {"cls": AutoModelForSequenceClassification, "bare": AutoModel}.get(kind, AutoModelForCausalLM)
        model = cls.from_pretrained(folder).eval()
        out = {"layers": model.config.num_hidden_layers, "class": type(model).__name__}
        with torch.no_grad():
            if kind == "bare":
                batch = tok(texts, padding=True, return_tensors="pt")
                out["hidden"] = model(**batch).last_hidden_state.tolist()
            elif kind == "cls":
                batch = tok(texts, padding=True, return_tensors="pt")
                out["logits"] = model(**batch).logits.tolist()
            else:
                ids = torch.tensor([[5, 6, 7]])
                gen = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
                ref = ids
                for _ in range(6):  # greedy decoding without the KV cache, as a reference
                    nxt = model(ref).logits[:, -1].argmax(-1, keepdim=True)
                    ref = torch.cat([ref, nxt], 1)
                out["generated"] = gen.tolist()
                out["reference"] = ref.tolist()
        results[folder] = out
    results["imported_analysis_kit"] = "analysis_kit" in sys.modules
    print(json.dumps(results))
""")


def run_loader(*jobs: tuple[str, str]) -> dict:
    """Load and run each (folder, kind) in one fresh process that never imports analysis_kit."""
    args = [f"{folder}:{kind}" for folder, kind in jobs]
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(TEXTS), *args], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("imported_analysis_kit") is False
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return word_tokenizer(folder, WORDS)


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0,
                     initializer_range=0.2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def encoder(classifier):
    """A bare encoder, as the project's MiniLM asset (sentence-transformers, architectures ["BertModel"])."""
    torch.manual_seed(2)
    return BertModel(classifier.config).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer, classifier, decoder, encoder):
    """Every compressed folder of this module (saved by compress.save_folder and by the CLI), then one
    subprocess that loads and runs all of them with transformers alone."""
    root = tmp_path_factory.mktemp("compressed")
    src = root / "src"
    classifier.save_pretrained(src)
    tokenizer.save_pretrained(src)
    compress.save_folder(compress.compact(classifier, (0, 2, 5)), tokenizer, root / "cls", {"kept": [0, 2, 5]})
    compress.save_folder(compress.compact(decoder, (0, 3, 4)), tokenizer, root / "dec", {"kept": [0, 3, 4]})
    (root / "calib.txt").write_text("\n".join(TEXTS * 4) + "\n")
    encoder.save_pretrained(root / "bare_src")
    tokenizer.save_pretrained(root / "bare_src")
    codes = {
        "greedy": cli.main(["compress", str(src), str(root / "greedy"), "--strategy", "greedy", "--ratio", "2",
                            "--texts", str(root / "calib.txt")]),
        "drop_last": cli.main(["compress", str(src), str(root / "drop_last"), "--strategy", "drop_last",
                               "--drop-fraction", "0.5"]),
        "importance": cli.main(["compress", str(src), str(root / "importance"), "--strategy", "importance",
                                "--method", "block_influence", "--keep", "2", "--texts", str(root / "calib.txt")]),
        "bare": cli.main(["compress", str(root / "bare_src"), str(root / "bare"), "--strategy", "greedy", "--keep", "3",
                          "--texts", str(root / "calib.txt")]),
    }
    loaded = run_loader((root / "cls", "cls"), (root / "dec", "lm"), (root / "greedy", "cls"), (root / "bare", "bare"))
    return root, codes, {k.rsplit("/", 1)[-1]: v for k, v in loaded.items()}


def test_compressed_classifier_loads_with_transformers_alone(built, classifier, tokenizer):
    root, _, loaded = built
    assert loaded["cls"]["layers"] == 3
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = compress.compact(classifier, (0, 2, 5))(**batch).logits.numpy()
        full = classifier(**batch).logits.numpy()
    np.testing.assert_allclose(np.array(loaded["cls"]["logits"]), expected, atol=1e-5)
    assert not np.allclose(expected, full, atol=1e-3)  # the blocks really are gone
    assert json.loads((root / "cls" / "compression.json").read_text())["kept"] == [0, 2, 5]


def test_compressed_decoder_generates_with_kv_cache(built, decoder):
    _, _, loaded = built
    assert loaded["dec"]["layers"] == 3
    assert loaded["dec"]["generated"] == loaded["dec"]["reference"]
    with torch.no_grad():
        ours = compress.compact(decoder, (0, 3, 4)).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6,
                                                             do_sample=False, pad_token_id=0)
    assert loaded["dec"]["generated"] == ours.tolist()


def test_cli_compress_command(built, tmp_path, capsys):
    root, codes, loaded = built
    assert codes == {"greedy": 0, "drop_last": 0, "importance": 0, "bare": 0}
    imp = json.loads((root / "importance" / "compression.json").read_text())
    assert imp["n_kept"] == 2 and imp["method"] == "block_influence"
    record = json.loads((root / "greedy" / "compression.json").read_text())
    assert record["n_kept"] == 3 and record["strategy"] == "greedy"
    assert loaded["greedy"]["layers"] == 3
    assert json.loads((root / "drop_last" / "compression.json").read_text())["kept"] == [0, 1, 2]
    # bad input: one clear line, exit code 2, nothing written
    code = cli.main(["compress", str(root / "src"), str(tmp_path / "x"), "--strategy", "angular", "--keep", "2"])
    assert code == 2
    assert "calibration texts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_compresses_a_bare_encoder_that_automodel_loads(built, encoder, tokenizer):
    root, _, loaded = built
    record = json.loads((root / "bare" / "compression.json").read_text())
    assert record["n_kept"] == 3 and record["strategy"] == "greedy"
    assert loaded["bare"]["class"] == "BertModel" and loaded["bare"]["layers"] == 3
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = compress.compact(encoder, record["kept"])(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(np.array(loaded["bare"]["hidden"]), expected, atol=1e-5)


def test_cli_compress_refuses_bad_inputs_before_loading(built, tmp_path, capsys, monkeypatch):
    root = built[0]

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(compress, "_load_any", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"the movie was good\n\x89PNG\r\n\x1a\n\xff\xfe\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    src, out = str(root / "src"), str(tmp_path / "out")
    cases = [(["--strategy", "greedy", "--keep", "2", "--texts", str(binary)], rf"--texts {binary}: line 2 is not UTF-8"),
             (["--strategy", "greedy", "--keep", "2", "--texts", str(blank)], "holds no text"),
             (["--keep", "2", "--device", "cuda"], "CUDA is not available"),
             (["--strategy", "greedy", "--keep", "2", "--method", "fisher", "--texts", str(root / "calib.txt")],
              "used only by strategy 'importance'; strategy 'greedy' ignores it"),
             (["--keep", "2", "--method", "fisher"], "strategy 'drop_last' ignores it")]
    for extra, match in cases:
        assert cli.main(["compress", src, out, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert re.search(match, err), err
    assert not (tmp_path / "out").exists()
