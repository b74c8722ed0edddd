import os

# 8 fake CPU devices for the sharding tests. XLA reads this once, when the CPU backend starts, so it must be set
# before anything imports jax. Single-device code is unaffected: arrays still default to device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite is compile-bound (thousands of small programs, each run a few times): LLVM at optimisation level 0
# compiles them about a third faster (tests/test_kv_cache.py: 137 s -> 88 s on 2 cores). XLA's HLO passes (fusion,
# layout) are the same, only the machine code is less optimised (docs/testing.md). Set the flag yourself to override.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "lladou-tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def cpu8():
    """The 8 fake CPU devices the sharding tests run on. Missing devices fail the test (a skip would hide it): they
    are missing when XLA_FLAGS already set another device count before this file could set 8."""
    import jax

    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.fail(f"needs 8 CPU devices, found {len(devices)}: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} sets "
                    "another count; unset it or set --xla_force_host_platform_device_count=8", pytrace=False)
    return devices[:8]


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(TINY / "golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="session")
def tiny_model():
    import dultra_jax

    return dultra_jax.load(TINY, dtype="fp32")


@pytest.fixture(scope="session")
def char_model_dir(tmp_path_factory):
    """``char_model_dir(max_sequence_length)``: a copy of the lladou-tiny fixture (ids < 300, the char
    tokenizer's layout) with the built-in char tokenizer and room for ``max_sequence_length`` positions."""
    import json
    import shutil

    from dultra_jax.data import synthetic

    def make(max_sequence_length: int) -> Path:
        d = tmp_path_factory.mktemp("char-model") / "tiny-char"
        d.mkdir()
        cfg = json.loads((TINY / "config.json").read_text())
        cfg["max_sequence_length"] = max_sequence_length
        (d / "config.json").write_text(json.dumps(cfg))
        shutil.copy(TINY / "model.safetensors", d / "model.safetensors")
        synthetic.save_tokenizer(d)
        return d

    return make


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    from dultra_jax.checkpoints import convert

    out = tmp_path_factory.mktemp("converted") / "tiny"
    convert(TINY, out)
    return out


def _has_accelerator() -> bool:
    import jax

    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need an accelerator: skipped (with the reason) on CPU-only machines. ``real_weights`` tests
    skip themselves unless DULTRA_REAL_CHECKPOINT is set (tests/test_real_weights.py)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _has_accelerator():
        skip = pytest.mark.skip(reason="needs a GPU (jax found only the CPU backend)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint beside the tiny LLaDA tokenizer (its ids match the model's: 298 eos, 299 mask): a
    model with text in and text out (TextModel, dultra serve)."""
    import shutil

    d = tmp_path_factory.mktemp("tiny-text") / "lladou-tiny-text"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, d / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURES / "llada-tokenizer-tiny" / name, d / name)
    return d


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
    """One on-disk compilation cache for the whole run (and the subprocesses tests start): the suite builds the same
    programs many times over (three trainers per resume test, a model exported then evaluated, the same decode
    after each file's caches are cleared), and a program read back from disk costs a fraction of compiling it.
    Fresh per run, so nothing carries over between runs; DULTRA_TEST_COMPILATION_CACHE=0 turns it off."""
    if os.environ.get("DULTRA_TEST_COMPILATION_CACHE", "1") == "0":
        yield None
        return
    import jax

    cache = tmp_path_factory.mktemp("xla-cache")
    settings = {"jax_compilation_cache_dir": str(cache), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {name: getattr(jax.config, name) for name in settings}
    env_before = {name.upper(): os.environ.get(name.upper()) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # the CLI subprocesses the tests start
    try:  # the cache is set up once per process, at the first compile: start it over with these settings
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    yield cache
    for name, value in before.items():
        jax.config.update(name, value)
    for name, value in env_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache_per_file(request, _compilation_cache):
    """A test file of compile-only programs at 8B widths (each built once) sets ``USE_COMPILATION_CACHE = False``:
    writing those large programs to disk costs more than it could save (tests/test_configs.py 66 s -> 94 s)."""
    if _compilation_cache is None or getattr(request.module, "USE_COMPILATION_CACHE", True):
        yield
        return
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file. Every XLA:CPU executable keeps ~3 memory maps of JIT code
    alive while a cache holds it; one pytest process compiles thousands of programs, and past the kernel's
    ``vm.max_map_count`` (65530 by default) LLVM's next mmap fails and the process dies with a segfault inside
    ``backend_compile`` (seen at ~62% of the suite). Programs a later file needs are compiled again there."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
