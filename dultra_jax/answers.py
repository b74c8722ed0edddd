"""Reading a dataset row's reference: the GSM8K final answer and the APPS test specification.

Both the task loaders (:mod:`dultra_jax.data.tasks`, which build :class:`~dultra_jax.data.Example` records) and
the scorers (:mod:`dultra_jax.rewards`) read these columns, so the parsing lives here, below both packages and
importing neither: ``data`` never imports ``rewards`` and the package graph has no cycle. Standard library only.
Extracting the *model's* answer from a completion is the scorers' business (:mod:`dultra_jax.rewards.math`).
"""

from __future__ import annotations

import json
from typing import Any


def extract_hash_answer(text: str) -> str | None:
    """GSM8K reference: the text after the first ``####`` (up to a second one), stripped; None without one."""
    if "####" not in text:
        return None
    return text.split("####")[1].strip()


def parse_apps_io(input_output: str | dict | None) -> dict[str, Any]:
    """APPS ``input_output`` -> {"fn_name": str | None, "inputs": [...], "outputs": [...]} (pairs only)."""
    if not input_output:
        return {"fn_name": None, "inputs": [], "outputs": []}
    try:
        io = json.loads(input_output) if isinstance(input_output, str) else dict(input_output)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"APPS input_output is not valid JSON: {e}") from e
    inputs, outputs = list(io.get("inputs", [])), list(io.get("outputs", []))
    n = min(len(inputs), len(outputs))
    return {"fn_name": io.get("fn_name"), "inputs": inputs[:n], "outputs": outputs[:n]}
