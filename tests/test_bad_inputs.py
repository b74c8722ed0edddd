"""Every sub-command on bad input: a non-zero exit, ONE clear line on stderr (what is wrong, how to fix it), no
traceback, and every file that was there before byte-identical afterwards.

Each row is (id, setup, expect): ``setup(tmp)`` builds what the command needs under ``tmp`` and returns its argv;
``expect`` is a fragment the error line must contain (so a generic catch-all message does not pass). The CLI runs
in-process (``main(argv)``), which keeps the table fast.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dultra_jax.cli import main

TINY = Path(__file__).parent / "fixtures" / "lladou-tiny"
CFG = ["--config", str(Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml")]
BAD_UTF8 = b"\xff\xfe not utf-8 \xc3\x28\n"


def _model(tmp: Path, name: str = "model") -> Path:
    d = tmp / name
    shutil.copytree(TINY, d)
    return d


def _file(tmp: Path, name: str, data: bytes = b"not a directory\n") -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _completions(tmp: Path) -> Path:
    return _file(tmp, "completions.jsonl", b'{"index": 0, "completion": "#### 4"}\n')


def _gsm8k(tmp: Path) -> Path:
    return _file(tmp, "gsm8k.jsonl", json.dumps({"question": "2+2?", "answer": "so\n#### 4"}).encode() + b"\n")


def _eval_dir(tmp: Path, *, run: dict | None = None, summary: bytes | None = None) -> Path:
    out = tmp / "out"
    out.mkdir()
    _file(out, "samples.jsonl", b"".join(
        json.dumps({"seed": 0, "id": str(i), "correct": True}).encode() + b"\n" for i in range(32)))
    if run is not None:
        _file(out, "run.json", json.dumps(run).encode())
    if summary is not None:
        _file(out, "summary.json", summary)
    return out


def _train(tmp: Path, *overrides: str, config: list[str] = CFG) -> list[str]:
    return ["train", *config, "--output-dir", str(tmp / "run"), *overrides]


def _eval(tmp: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["eval", "--model", str(TINY), "--task", "synthetic-addition", "--limit", "2", "--gen-length", "8",
            "--block-length", "8", "--dtype", "fp32", "--out", str(out or tmp / "out"), *extra]


ROWS = [
    # convert
    ("convert-into-parent-of-src", lambda t: ["convert", str(_model(t / "par", "src")), str(t / "par"), "--overwrite"],
     "contains the source"),
    ("convert-overwrite-foreign-dir", lambda t: (_file(t / "mine", "notes.txt"), ["convert", str(TINY), str(t / "mine"),
                                                                                    "--overwrite"])[1],
     "not a checkpoint"),
    ("convert-missing-src", lambda t: ["convert", str(t / "nope"), str(t / "out")], "nope"),
    ("convert-non-utf8-config", lambda t: (_file(_model(t), "config.json", BAD_UTF8),
                                           ["convert", str(t / "model"), str(t / "out")])[1], "UTF-8"),
    ("convert-bad-dtype", lambda t: ["convert", str(TINY), str(t / "out"), "--dtype", "banana"], "banana"),
    ("convert-out-is-file", lambda t: ["convert", str(TINY), str(_file(t, "out")), "--overwrite"], "not a directory"),
    # train (validation lives in the config dataclasses)
    ("train-no-config", lambda t: ["train", "--output-dir", str(t / "run")], "gen_length"),
    ("train-micro-batches-0", lambda t: _train(t, "train.micro_batches=0"), "micro_batches"),
    ("train-batch-size-0", lambda t: _train(t, "train.batch_size=0"), "batch_size"),
    ("train-num-generations-0", lambda t: _train(t, "grpo.num_generations=0"), "num_generations"),
    ("train-negative-gen-length", lambda t: _train(t, "grpo.gen_length=-8"), "gen_length"),
    ("train-gen-length-not-multiple", lambda t: _train(t, "grpo.gen_length=12"), "multiple"),
    ("train-block-length-0", lambda t: _train(t, "grpo.block_length=0"), "block_length"),
    ("train-negative-temperature", lambda t: _train(t, "grpo.temperature=-1"), "temperature"),
    ("train-mesh-banana", lambda t: _train(t, "train.mesh=banana"), "mesh"),
    ("train-unknown-task", lambda t: _train(t, "task.name=banana"), "banana"),
    ("train-sequence-gen-length-0", lambda t: _train(t, "sequence.gen_length=0"), "gen_length"),
    ("train-eval-block-length-0", lambda t: _train(t, "eval.decode.block_length=0"), "block_length"),
    ("train-into-model-dir", lambda t: ["train", *CFG, "--output-dir", str(_model(t))], "model directory"),
    ("train-output-dir-is-file", lambda t: ["train", *CFG, "--output-dir", str(_file(t, "run"))], "not a directory"),
    ("train-non-utf8-yaml", lambda t: ["train", "--config", str(_file(t, "c.yaml", BAD_UTF8)),
                                       "--output-dir", str(t / "run")], "UTF-8"),
    ("train-missing-config", lambda t: ["train", "--config", str(t / "nope.yaml"), "--output-dir", str(t / "r")],
     "not found"),
    # eval
    ("eval-existing-out-no-resume", lambda t: (_eval_dir(t), _eval(t))[1], "--resume"),
    ("eval-resume-unrelated-summary", lambda t: (_eval_dir(t, summary=b'{"mine": 1}\n'), _eval(t, "--resume"))[1],
     "run.json"),
    ("eval-resume-different-settings", lambda t: (_eval_dir(t, run={"task": "synthetic-addition", "settings": {
        "gen_length": 16}}), _eval(t, "--resume"))[1], "gen_length"),
    ("eval-out-is-file", lambda t: _eval(t, out=_file(t, "out")), "not a directory"),
    ("eval-negative-gen-length", lambda t: _eval(t, "--gen-length", "-8"), "gen_length"),
    ("eval-missing-model", lambda t: ["eval", "--model", str(t / "nope"), "--task", "synthetic-addition", "--out",
                                      str(t / "out")], "nope"),
    ("eval-non-utf8-model-config", lambda t: (_file(_model(t), "config.json", BAD_UTF8),
                                              ["eval", "--model", str(t / "model"), "--task", "synthetic-addition",
                                               "--out", str(t / "o")])[1], "UTF-8"),
    ("eval-negative-temperature", lambda t: _eval(t, "--temperature", "-1"), "temperature"),
    # score
    ("score-existing-out", lambda t: (_file(t / "out", "summary.json", b'{"mine": 1}\n'),
                                      ["score", "--task", "gsm8k", "--completions-file", str(_completions(t)),
                                       "--data-file", str(_gsm8k(t)), "--out", str(t / "out")])[1], "--overwrite"),
    ("score-non-utf8-completions", lambda t: ["score", "--task", "gsm8k", "--completions-file",
                                              str(_file(t, "c.jsonl", BAD_UTF8)), "--data-file", str(_gsm8k(t)),
                                              "--out", str(t / "out")], "UTF-8"),
    ("score-out-is-file", lambda t: ["score", "--task", "gsm8k", "--completions-file", str(_completions(t)),
                                     "--data-file", str(_gsm8k(t)), "--out", str(_file(t, "out"))], "not a directory"),
    ("score-missing-completions", lambda t: ["score", "--task", "gsm8k", "--completions-file", str(t / "nope"),
                                             "--data-file", str(_gsm8k(t))], "not found"),
    # generate
    ("generate-non-utf8-prompt", lambda t: ["generate", "--model", str(TINY), "--prompt", "caf\udce9"], "UTF-8"),
    ("generate-gen-length-0", lambda t: ["generate", "--model", str(TINY), "--prompt-ids", "1,2", "--gen-length",
                                         "0"], "gen_length"),
    ("generate-negative-temperature", lambda t: ["generate", "--model", str(TINY), "--prompt-ids", "1,2",
                                                 "--temperature", "-1"], "temperature"),
    ("generate-non-utf8-config", lambda t: (_file(_model(t), "config.json", BAD_UTF8),
                                            ["generate", "--model", str(t / "model"), "--prompt-ids", "1"])[1],
     "UTF-8"),
    # plot, inspect, demo
    ("plot-out-is-file", lambda t: ["plot", "--summaries", str(_file(t, "s.json", b'{"label": "x", "accuracy": 0.5, '
                                                                     b'"mean_nfe": 3, "series": "x"}')),
                                    "--out", str(_file(t, "plots"))], "not a directory"),
    ("plot-missing-summaries", lambda t: ["plot", "--summaries", str(t / "nope"), "--out", str(t / "p")], "nope"),
    ("plot-non-utf8-summary", lambda t: ["plot", "--summaries", str(_file(t, "s.json", BAD_UTF8)), "--out",
                                         str(t / "p")], "UTF-8"),
    ("inspect-out-is-file", lambda t: ["inspect", "--out", str(_file(t, "ins"))], "not a directory"),
    ("demo-out-is-file", lambda t: ["demo", "--out", str(_file(t, "demo")), "--size", "small"], "not a directory"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_row(setup, tmp: Path, capsys) -> tuple[int, str, dict[str, str], dict[str, str]]:
    """(exit code, stderr, files before, files after); an exception escaping main() is a traceback."""
    tmp.mkdir(parents=True, exist_ok=True)
    argv = setup(tmp)
    before = _snapshot(tmp)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - exactly what this test is about
        rc, err = -1, f"Traceback (escaped main): {type(e).__name__}: {e}"
        return rc, err, before, _snapshot(tmp)
    return rc, capsys.readouterr().err, before, _snapshot(tmp)


def classify(rc: int, err: str, before: dict[str, str], after: dict[str, str]) -> str:
    lost = [k for k, v in before.items() if after.get(k) != v]
    if lost:
        return f"data lost ({lost[:3]})"
    if "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "accepted"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith(("error:", "dultra ", "interrupted")):
        return "unclear"
    return "clean"


@pytest.mark.parametrize("setup,expect", [pytest.param(s, e, id=i) for i, s, e in ROWS])
def test_bad_input(setup, expect, tmp_path, capsys):
    rc, err, before, after = run_row(setup, tmp_path, capsys)
    kind = classify(rc, err, before, after)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert kind == "clean", f"category={kind} rc={rc} stderr tail: {err[-600:]!r}"
    assert expect in last, f"category=vague: {last!r} does not mention {expect!r}"
    assert "internal error" not in last


def test_keyboard_interrupt_in_eval_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during decoding: exit 130, one line naming the kept rows and --resume, no traceback."""
    from dultra_jax.eval import harness

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "decode_prompts", interrupted)
    rc, err, _, _ = run_row(lambda t: _eval(t), tmp_path, capsys)
    assert rc == 130 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("interrupted") and "--resume" in lines[-1]


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from dultra_jax.config import ConfigError

    monkeypatch.setenv("DULTRA_DEBUG", "1")
    with pytest.raises(ConfigError, match="micro_batches"):
        main(["train", *CFG, "--output-dir", str(tmp_path / "r"), "train.micro_batches=0"])
    monkeypatch.delenv("DULTRA_DEBUG")
    with pytest.raises(ConfigError, match="micro_batches"):
        main(["--debug", "train", *CFG, "--output-dir", str(tmp_path / "r"), "train.micro_batches=0"])


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("dultra ")
    assert main(["train", *CFG, "--output-dir", "unused", "--print-config", "grpo.gen_length=32"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["grpo"]["gen_length"] == 32 and printed["train"]["micro_batches"] == 2
    assert not Path("unused").exists()


def test_files_get_the_umask_mode(tmp_path, converted_dir):
    """Atomic writes (mkstemp: 0600) end with the mode an ordinary write gives: 0o666 & ~umask."""
    import os
    import stat

    from dultra_jax.atomic import umask, write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    write_atomic(tmp_path / "b.json", b"{}")
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~umask()
    # a converted checkpoint: every file and directory (orbax's too), as the umask says
    for p in [converted_dir, *converted_dir.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask()
        assert stat.S_IMODE(p.stat().st_mode) == want, p




def test_sigint_in_training_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    """The README's claim: SIGINT (or SIGTERM) during training saves the finished step and exits 128 + signum. The
    trainer's side (checkpoint, handlers restored) is test_training's SIGTERM test; this is the command's side."""
    import signal

    from dultra_jax.training import trainer as trainer_mod

    class Interrupted:
        def __init__(self, cfg, out, **kw):
            self.primary = True

        def run(self):
            raise trainer_mod.TrainingInterrupted(signal.SIGINT, 2)

    monkeypatch.setattr(trainer_mod, "Trainer", Interrupted)
    assert main(["sft", *CFG, "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT after step 2" in err[0] and "resume" in err[0]
