"""TextModel: text / chat / ids in, Completion out, equal to generate() of each prompt alone."""

import numpy as np
import pytest

SETTINGS = dict(gen_length=16, block_length=8)


@pytest.fixture(scope="module")
def tm(tiny_text_dir):
    from dultra_jax.text import TextModel

    return TextModel.load(tiny_text_dir, dtype="fp32", slots=2, **SETTINGS)


def test_load_returns_tokenizer(tm, tiny_dir):
    import dultra_jax
    from dultra_jax.checkpoints import CheckpointError

    model, tok = dultra_jax.load(tm.tokenizer.name_or_path, dtype="fp32", tokenizer=True)
    assert tok.eos_token_id == model.cfg.eos_token_id
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        dultra_jax.load(tiny_dir, tokenizer=True)


def test_encode_forms(tm):
    chat = tm.encode([{"role": "user", "content": "hi"}])
    assert chat[0] == tm.tokenizer.bos_token_id and chat == tm.encode("hi", chat=True)
    assert tm.encode("hi") != chat
    assert tm.encode([5, 6]) == [5, 6]
    for bad, msg in (([], "empty prompt"), ([{"role": "user"}], "string 'role'"), ([1.5], "list of int"),
                     ([299], "MASK"), ([10_000], r"\[0, 300\)")):
        with pytest.raises(ValueError, match=msg):
            tm.encode(bad)


def test_complete_equals_generate_alone(tm):
    from dultra_jax.decoding import generate

    text = "hello world"
    ids = list(range(5, 5 + len(tm.encode(text))))  # same length: generate compiles once
    prompts, seeds = [text, ids, text], [0, 3, 3]
    out = tm.complete(prompts, seeds=seeds)
    ref = generate(tm.model, [tm.encode(p) for p in prompts], row_seeds=seeds, **SETTINGS)  # rows are independent
    for i, c in enumerate(out):
        gen = np.asarray(ref.generated[i])
        assert c.nfe == int(ref.nfe[i]) and c.token_ids == gen[: len(c.token_ids)].tolist()
        assert c == tm.finish(gen, int(ref.nfe[i]))
        assert c.finish_reason in ("stop", "length") and c.tokens_per_forward > 0
    assert out[0].token_ids != out[2].token_ids  # the seed matters
    for k in range(len(out[0].token_ids) + 1):  # streamed prefixes only ever grow the final text
        assert out[0].text.startswith(tm.partial_text(out[0].token_ids[:k], stop=["@@"]))


def test_stop_strings_and_errors(tm):
    [full] = tm.complete(["hello"])
    cut_at = full.text[3:5]
    [c] = tm.complete(["hello"], stop=[cut_at])
    assert c.text == full.text[: full.text.find(cut_at)] and c.finish_reason == "stop"
    assert len(c.token_ids) <= len(full.token_ids)
    with pytest.raises(ValueError, match="unknown decoding option"):
        tm.complete(["x"], temprature=1.0)
    with pytest.raises(ValueError, match="list of prompts"):
        tm.complete("x")
    with pytest.raises(ValueError, match="got text"):
        from dultra_jax.decoding import generate

        generate(tm.model, ["hello"], **SETTINGS)
