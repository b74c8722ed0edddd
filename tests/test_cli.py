"""The ``dultra`` command line: generate (ids and chat-templated text), demo."""

import json
import shutil

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dultra_jax.cli import main

CHAT = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("tok") / "model"
    shutil.copytree(tiny_dir, d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(["what is two plus two? the answer is four."] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT).save_pretrained(str(d))
    return d


def test_generate_with_ids_json(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt-ids", "1,2,3,4", "--gen-length", "16",
                 "--block-length", "8", "--dtype", "fp32", "--strategy", "threshold", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["generated_ids"]) == 16 and 1 <= out["nfe"] <= 16
    assert out["tpf"] == pytest.approx(out["effective_tokens"] / out["nfe"])


def test_generate_planner_temperature_reaches_the_decoder(tiny_dir, tiny_model, capsys):
    """--planner-temperature (the original's sweep knob) decodes as generate(planner_temperature=...); the
    evaluation settings carry it into their decode arguments and label."""
    from dultra_jax.decoding import generate
    from dultra_jax.eval import EvalSettings

    assert main(["generate", "--model", str(tiny_dir), "--prompt-ids", "1,2,3,4", "--gen-length", "16",
                 "--block-length", "8", "--dtype", "fp32", "--planner-temperature", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = generate(tiny_model, [[1, 2, 3, 4]], gen_length=16, block_length=8, rng=0, planner_temperature=0.3)
    assert out["generated_ids"] == want.tokens[0, 4:].tolist() and out["nfe"] == int(want.nfe[0])
    s = EvalSettings.create(planner_temperature=0.3, reveal="topk")
    assert s.decode.planner_temperature == 0.3 and "pt=0.3" in s.label
    with pytest.raises(ValueError, match="planner_temperature"):
        EvalSettings.create(planner_temperature=0.0)


def test_generate_with_chat_template(tiny_with_tokenizer, capfd, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    assert main(["generate", "--model", str(tiny_with_tokenizer), "--prompt", "what is two plus two?",
                 "--gen-length", "16", "--block-length", "8", "--dtype", "fp32"]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert lines[-1].startswith("NFE ") and "TPF" in lines[-1]
    # transformers' advice (no PyTorch; "a model of type llada ...") does not apply to a tokenizer: kept quiet
    assert "[transformers]" not in err and "model of type" not in err, err


def test_generate_errors(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt-ids", "1,2", "--gen-length", "30",
                 "--block-length", "8"]) == 2
    assert "multiple of block_length" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt-ids", "a,b"]) == 2


def test_inspect_runs(tmp_path, capsys):
    assert main(["inspect", "--out", str(tmp_path / "inspect")]) == 0
    summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
    assert summary["params"] == 180737 and summary["converted_vs_hf_max_abs_logit_diff"] == 0.0
