"""``dultra serve`` with real clients on loopback: the openai client, raw HTTP for disconnects, lm-eval's
local-completions, and SIGTERM. One server subprocess for the module (the tiny checkpoint + tiny tokenizer);
answers are checked against ``generate`` of each prompt alone."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

SETTINGS = dict(gen_length=16, block_length=8)
SLOTS, MAX_QUEUE = 4, 20
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_text_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    cmd = [sys.executable, "-m", "dultra_jax.cli", "serve", "--model", str(tiny_text_dir), "--dtype", "fp32",
           "--gen-length", "16", "--block-length", "8", "--slots", str(SLOTS), "--max-queue", str(MAX_QUEUE),
           "--port", str(port), "--drain-s", "90", "--served-model-name", "tiny"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    yield proc, base, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tm(tiny_text_dir):
    from dultra_jax.text import TextModel

    return TextModel.load(tiny_text_dir, dtype="fp32", slots=SLOTS, **SETTINGS)


@pytest.fixture(scope="module")
def client(server, tm):  # tm first: the reference model loads while the server starts
    proc, base, log = server
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start in 180 s"
        time.sleep(0.5)
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def _refs(tm, prompts, seeds=None, **settings):
    """Each prompt's answer decoded alone (TextModel.complete equals generate() of the prompt alone:
    tests/test_text.py); padded to the slots so the test process compiles one program per settings."""
    n = len(prompts)
    pad = max(0, SLOTS - n)
    seeds = [0] * n if seeds is None else list(seeds)
    return tm.complete(list(prompts) + [prompts[-1]] * pad, seeds=seeds + [0] * pad, **settings)[:n]


def _metric(base, name) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def test_models_completions_chat_and_streams(client, tm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt, messages = [5, 6, 7, 8, 9, 10, 11, 12, 13], [{"role": "user", "content": "hi"}]
    assert len(tm.encode("hello world")) == len(prompt)
    ref_text, ref_ids = _refs(tm, ["hello world", prompt], [0, 7])
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=16)
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (ref_text.text, ref_text.finish_reason)
    u = r.usage.model_dump()
    assert u["prompt_tokens"] == 9 and u["completion_tokens"] == len(ref_text.token_ids)
    assert u["nfe"] == ref_text.nfe and u["tokens_per_forward"] == pytest.approx(ref_text.tokens_per_forward)
    r = client.completions.create(model="tiny", prompt=prompt, seed=7)  # token ids in, seed = the row seed
    assert r.choices[0].text == ref_ids.text
    [chat_ref] = _refs(tm, [messages])
    r = client.chat.completions.create(model="tiny", messages=messages)
    assert r.choices[0].message.content == chat_ref.text and r.usage.model_dump()["nfe"] == chat_ref.nfe
    # streams: the chunks concatenate to the non-streamed answer; usage comes last when asked for
    chunks = list(client.completions.create(model="tiny", prompt="hello world", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref_text.text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump()["nfe"] == ref_text.nfe
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref_text.finish_reason
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat_ref.text


def test_dllm_options_and_stop(client, tm):
    [ref] = _refs(tm, ["hello world"], strategy="threshold", threshold=0.5, block_length=4)
    r = client.completions.create(model="tiny", prompt="hello world",
                                  extra_body={"strategy": "threshold", "threshold": 0.5, "block_length": 4})
    assert r.choices[0].text == ref.text
    stop = ref.text[2:4]
    r = client.completions.create(model="tiny", prompt="hello world", stop=[stop],
                                  extra_body={"strategy": "threshold", "threshold": 0.5, "block_length": 4})
    assert r.choices[0].text == ref.text[: ref.text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_their_solo_answers(client, tm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 290, size=9).tolist() for _ in range(16)]
    seeds = list(range(16))
    refs = _refs(tm, prompts, seeds)
    out = [None] * 16

    def call(i):
        out[i] = client.completions.create(model="tiny", prompt=prompts[i], seed=seeds[i]).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == [r.text for r in refs]


def test_bad_requests_get_400_and_the_server_keeps_serving(client, server):
    base = server[1]
    cases = [({"thresh": 0.5}, "thresh: unknown field"), ({"threshold": 2.0}, "threshold must be in (0, 1]"),
             ({"logprobs": 1}, "no left-to-right token log-probabilities"), ({"n": 2}, "n must be 1"),
             ({"gen_length": 20, "block_length": 8}, "multiple of block_length"),
             ({"strategy": "beam"}, "strategy")]
    for extra, msg in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="hi", extra_body=extra)
        assert msg in e.value.body["message"] and e.value.body["code"] == 400
    with pytest.raises(openai.BadRequestError, match="max_sequence_length"):
        client.completions.create(model="tiny", prompt=list(range(250)))
    with pytest.raises(openai.BadRequestError, match="MASK"):
        client.completions.create(model="tiny", prompt=[1, 299])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="hi")
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="tiny", prompt="hi").choices[0].finish_reason in ("stop", "length")
    assert _metric(base, "dultra_requests_total") >= 1


def test_client_disconnect_mid_stream_cancels(client, server):
    base = server[1]
    before = _metric(base, "dultra_cancelled_total")
    # a request with new settings keeps the device thread compiling, so the stream below is still waiting (or,
    # with the engine, decoding) when its client goes away
    blocker = threading.Thread(target=lambda: client.completions.create(
        model="tiny", prompt="x", extra_body={"gen_length": 8, "block_length": 8}))
    blocker.start()
    time.sleep(0.5)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    blocker.join(120)
    deadline = time.monotonic() + 60
    while _metric(base, "dultra_cancelled_total") == before:
        assert time.monotonic() < deadline, "the disconnected request was never cancelled"
        time.sleep(0.2)
    health = httpx.get(f"{base}/health").json()
    assert health["busy"] == 0 and health["waiting"] == 0
    assert client.completions.create(model="tiny", prompt="hi").choices[0].text is not None


def test_full_queue_answers_429(client, server):
    base = server[1]
    burst = [[5 + i, 6, 7] for i in range(MAX_QUEUE)]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", client.completions.create(model="tiny", prompt=burst)))
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/health").json()["waiting"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:  # all of a request's prompts are queued, or none
        client.completions.create(model="tiny", prompt=burst)
    assert "max_queue" in e.value.body["message"] and e.value.body["code"] == 429
    t.join(120)
    assert len(result["r"].choices) == MAX_QUEUE and [c.index for c in result["r"].choices] == list(range(MAX_QUEUE))


def test_lm_eval_local_completions(server, client, tm, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = ROOT / "tests" / "fixtures" / "serve" / "tiny_qa.jsonl"
    (tmp_path / "tiny_qa.yaml").write_text(
        (ROOT / "tests" / "fixtures" / "serve" / "tiny_qa.yaml").read_text().replace("DATA_FILE", str(data)))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["dultra_tiny_qa"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"base_url={server[1]}/v1/completions,model=tiny,num_concurrent=1,max_retries=1,"
                   "tokenized_requests=True", limit=4, log_samples=True)
    res = out["results"]["dultra_tiny_qa"]
    assert 0.0 <= res["exact_match,none"] <= 1.0
    # each answer is what the server gives that prompt (lm-eval sends token ids; the server cuts at `until`)
    samples = out["samples"]["dultra_tiny_qa"]
    ids = [tm.tokenizer(f"Question: {s['doc']['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
           for s in samples]
    refs = _refs(tm, ids, [1234] * len(ids), stop=["\n\n", "Question:", tm.tokenizer.eos_token])  # lm-eval's seed
    assert [s["resps"] for s in samples] == [[[r.text]] for r in refs]


def test_sigterm_drains_in_flight_requests_and_exits_0(client, server, tm):
    proc, base, _ = server
    prompts = [[40 + i, 41, 42, 43, 44, 45, 46, 47, 48] for i in range(6)]
    over = dict(gen_length=8, block_length=4)  # new settings: the compile keeps all six in flight
    refs = _refs(tm, prompts, **over)
    out = [None] * 6

    def call(i):
        out[i] = client.completions.create(model="tiny", prompt=prompts[i], extra_body=over).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (h := httpx.get(f"{base}/health").json())["waiting"] + h["busy"] < 6:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    for t in threads:
        t.join(10)
    assert out == [r.text for r in refs]  # finished within the drain bound, not cut off
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health")
