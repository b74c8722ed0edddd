"""A built-in synthetic task and tokenizer for the CPU demo and tests: small additions with checkable answers.

Nothing is downloaded: the tokenizer is a character-level ``PreTrainedTokenizerFast`` built here (token id =
the character's code for printable ASCII, LLaDA-style special tokens at the top of the tiny vocabulary), with a
LLaDA-like chat template, so the same prompt pipeline, decoding and rewards run on it as on the real model.
"""

from __future__ import annotations

import random
from pathlib import Path

from dultra_jax.data.tasks import Example

VOCAB_SIZE = 300
SPECIALS = {
    "<|start_header_id|>": 290, "<|end_header_id|>": 291, "<|eot_id|>": 292, "<|startoftext|>": 293,
    "<unk>": 294, "<|endoftext|>": 298, "<|mdm_mask|>": 299,
}
EOS_ID = SPECIALS["<|endoftext|>"]
MASK_ID = SPECIALS["<|mdm_mask|>"]
EOT_ID = SPECIALS["<|eot_id|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TASK_NAME = "synthetic-addition"

# A model of the tiny preset's shape: ids < 300, MASK 299, end-of-text 298.
MODEL_OVERRIDES = dict(vocab_size=VOCAB_SIZE, embedding_size=VOCAB_SIZE, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                       pad_token_id=EOS_ID)


def build_tokenizer():
    """Character-level tokenizer: printable ASCII and newline map to their codes; specials as above."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c for c in range(32, 127)}
    vocab["\n"] = 10
    vocab.update(SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>", unk_token="<unk>", additional_special_tokens=["<|eot_id|>",
                                                                                  "<|start_header_id|>",
                                                                                  "<|end_header_id|>"],
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def save_tokenizer(directory: str | Path) -> None:
    build_tokenizer().save_pretrained(str(directory))


def addition_examples(n: int, *, seed: int = 0, max_operand: int = 20, offset: int = 0) -> list[Example]:
    """``n`` problems "a+b=" (operands in [0, max_operand]) with the sum as the answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        q = f"{a}+{b}="
        out.append(Example(task=TASK_NAME, index=offset + i, id=f"add-{seed}-{i}", question=q,
                           messages=({"role": "user", "content": q},), answer=str(a + b)))
    return out


def answer_text(example: Example) -> str:
    """What the model is trained to produce (then end-of-turn and end-of-text padding)."""
    return str(example.answer)


def exact_answer(completions, examples) -> list[float]:
    """1.0 when the completion (up to end of turn / whitespace) is exactly the answer, else 0.0."""
    out = []
    for text, ex in zip(completions, examples, strict=True):
        got = text.split("<|eot_id|>")[0].strip()
        out.append(1.0 if got == str(ex.answer) else 0.0)
    return out
