"""One DecodeConfig: the commands' decode flags and the eval settings are derived from its fields."""

import dataclasses

import pytest

from dultra_jax.cli import build_parser
from dultra_jax.decoding import DecodeConfig
from dultra_jax.decoding.flags import DEFAULT_DECODE, HELP, decode_config_from_args
from dultra_jax.eval import EvalError, EvalSettings, sweep_settings


def _sub(name):
    return next(a for a in build_parser()._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_flags_are_the_fields(command):
    actions = {a.dest: a for a in _sub(command)._actions}
    field_names = {f.name for f in dataclasses.fields(DecodeConfig)}
    assert set(HELP) <= field_names  # help only for real fields
    for name in HELP:
        a = actions[name]
        assert a.default == getattr(DEFAULT_DECODE, name) and a.help.startswith(HELP[name])
    assert actions["strategy"].choices == ["planner", "threshold", "factor", "fixed"]
    assert actions["cache"].choices == ["none", "prefix", "dual"]


def test_parsed_flags_build_the_config_and_its_checks_apply():
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt-ids", "1", "--gen-length", "64",
                                      "--block-length", "16", "--strategy", "threshold", "--threshold", "0.5",
                                      "--early-stop"])
    cfg = decode_config_from_args(args)
    assert (cfg.gen_length, cfg.block_length, cfg.strategy, cfg.threshold, cfg.early_stop) == (64, 16, "threshold",
                                                                                               0.5, True)
    assert cfg.factor == DEFAULT_DECODE.factor
    bad = build_parser().parse_args(["generate", "--model", "m", "--gen-length", "60", "--block-length", "16"])
    with pytest.raises(ValueError, match="multiple of block_length"):
        decode_config_from_args(bad)


def test_eval_settings_nest_the_decode_config():
    s = EvalSettings.create(gen_length=16, block_length=8, factor=1.5, batch_size=3)
    assert s.decode == dataclasses.replace(DEFAULT_DECODE, gen_length=16, block_length=8, factor=1.5)
    assert EvalSettings.create(**s.to_dict()) == s  # to_dict (run.json, summary.json) reads back
    assert s.label == "planner-bernoulli f=1.5 b8"
    sweep = dict(sweep_settings(s, [0.5]))
    assert sweep["factor-f0.5"].decode.strategy == "factor" and sweep["planner-f0.5"].decode.factor == 0.5
    with pytest.raises(EvalError, match="temperature must be >= 0"):
        EvalSettings.create(temperature=-1.0)
    with pytest.raises(EvalError, match="sets \\['return_trajectory'\\] itself"):
        EvalSettings(decode=dataclasses.replace(DEFAULT_DECODE, return_trajectory=True))


def test_run_config_nests_the_decode_config():
    from dultra_jax.config import ConfigError
    from dultra_jax.training.config import load_run_config

    cfg = load_run_config(None, ["eval.decode.strategy=threshold", "eval.decode.threshold=0.5"])
    assert isinstance(cfg.eval.decode, DecodeConfig)
    assert (cfg.eval.decode.strategy, cfg.eval.decode.threshold, cfg.eval.decode.gen_length) == ("threshold", 0.5, 16)
    with pytest.raises(ConfigError, match="eval.decode.*multiple of block_length"):
        load_run_config(None, ["eval.decode.gen_length=10"])  # checked when the config is read, not mid-run
    with pytest.raises(ConfigError, match="unknown key.*'gen_length'.*'decode'"):
        load_run_config(None, ["eval.gen_length=16"])
