"""The decoding engine (slots fed from a queue): each request equals its prompt decoded alone, whatever shares
the batch; cancel, streaming prefixes, and bounded compiles."""

import numpy as np
import pytest

from dultra_jax.decoding import generate, pad_prompts
from dultra_jax.decoding.engine import DecodeEngine, _segment, bucket_width
from dultra_jax.decoding.loop import decode_config

KW = dict(gen_length=16, block_length=8, strategy="planner", temperature=0.7)


def _prompts(n, seed=0, lo=3, hi=15):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 290, size=int(k)) for k in rng.integers(lo, hi, n)]


def _alone(model, prompt, seed, **kw):
    """The prompt decoded alone (batch 1), left-padded (padding-aware) to its bucket so tests compile once."""
    ids, mask = pad_prompts([prompt], model.cfg.pad_token_id, bucket_width(len(prompt)))
    one = generate(model, ids, attention_mask=mask, row_seeds=[seed], rng=0, pad_aware=True, **kw)
    return np.concatenate([prompt, np.asarray(one.generated[0])]), int(one.nfe[0])


def test_engine_requests_equal_each_prompt_alone_with_cancel_and_streaming(tiny_model):
    prompts = _prompts(5)
    before = _segment._cache_size()
    # max_iterations=16 is the planner's own cap at G=16 (same results): a config no other test compiles
    eng = DecodeEngine(tiny_model, decode_config(**KW, max_iterations=16), slots=2, segment=3)
    handles = [eng.submit(p, seed=10 + i) for i, p in enumerate(prompts)]
    assert (eng.queued, eng.busy, eng.slots) == (5, 0, 2)
    eng.cancel(handles[3])  # queued: leaves at once
    assert eng.queued == 4
    out, prefixes = [], {}
    while eng.step():
        assert eng.busy <= 2
        for h in handles:
            c = eng.committed(h)
            if c is not None:
                prev = prefixes.get(h, np.zeros(0, np.int32))
                np.testing.assert_array_equal(c[:len(prev)], prev)  # a prefix only grows
                assert not np.any(c == tiny_model.cfg.mask_token_id)
                prefixes[h] = c
        out += eng.harvest()
    out += eng.harvest()
    assert not eng.step() and eng.queued == eng.busy == 0
    got = {f.handle: f for f in out}
    assert sorted(got) == handles and got[handles[3]].cancelled and got[handles[3]].nfe == 0
    for i, h in enumerate(handles):
        if i == 3:
            continue
        tokens, nfe = _alone(tiny_model, prompts[i], 10 + i, **KW)
        np.testing.assert_array_equal(got[h].tokens, tokens)
        assert got[h].nfe == nfe and got[h].iterations >= nfe and not got[h].cancelled
        seen = prefixes.get(h, np.zeros(0, np.int32))
        np.testing.assert_array_equal(seen, tokens[len(prompts[i]):][:len(seen)])
    assert any(len(c) > 0 for c in prefixes.values())  # something streamed before its request finished
    # all prompts fit the 16 width: one compiled segment for 5 prompts, 2 slots and many steps
    assert eng.widths_used == {16} and _segment._cache_size() - before == 1


def test_engine_cancels_a_running_request_and_widens_for_long_prompts(tiny_model):
    short, long_ = _prompts(3, seed=1), _prompts(1, seed=2, lo=20, hi=21)
    before = _segment._cache_size()
    eng = DecodeEngine(tiny_model, decode_config(**KW, max_iterations=17), slots=2, segment=2)
    hs = [eng.submit(p) for p in short]
    assert eng.step()  # two running, bounded segment of 2 iterations
    eng.cancel(hs[0])
    hl = eng.submit(long_[0])
    out = eng.run()
    got = {f.handle: f for f in out}
    assert got[hs[0]].cancelled and 0 < got[hs[0]].nfe <= 2
    assert got[hl].width == 24 and eng.widths_used == {16, 24}
    assert _segment._cache_size() - before == 2  # one compile per width, not per step or admission
    for h, p in ((hs[1], short[1]), (hs[2], short[2]), (hl, long_[0])):
        tokens, nfe = _alone(tiny_model, p, h, **KW)
        np.testing.assert_array_equal(got[h].tokens, tokens)
        assert got[h].nfe == nfe


def test_width_admission_keeps_long_prompts_together_and_does_not_starve_them(tiny_model):
    """admission="width": a free slot takes the widest queued prompt that fits the batch's width (else the
    narrowest), the queue's head once passed over 2 x slots times; every result stays its prompt's alone (same
    programs as the test above)."""
    short, long_ = _prompts(6, seed=1), _prompts(1, seed=2, lo=20, hi=21)
    eng = DecodeEngine(tiny_model, decode_config(**KW, max_iterations=17), slots=2, segment=2, admission="width")
    hs = [eng.submit(p) for p in short[:1] + long_ + short[1:]]  # s0, L, s1..s5
    order, out = [], []
    while eng.step():
        order += [h for h in eng.running() if h not in order]
        out += eng.harvest()
    got = {f.handle: f for f in out + eng.harvest()}
    later_first = [h for h in order[:order.index(hs[1])] if h > hs[1]]
    assert 1 <= len(later_first) <= 4  # L let s1.. pass, at most 2 x slots of them
    assert got[hs[1]].width == 24 and sum(got[h].width == 16 for h in hs) >= 2
    for h, p in zip(hs, short[:1] + long_ + short[1:], strict=True):
        tokens, nfe = _alone(tiny_model, p, h, **KW)
        np.testing.assert_array_equal(got[h].tokens, tokens)
        assert got[h].nfe == nfe
    # the rule alone (host bookkeeping, nothing decoded): a short row in a slot, then L and six short prompts
    eng = DecodeEngine(tiny_model, decode_config(**KW, max_iterations=17), slots=2, admission="width")
    hs = [eng.submit(p) for p in short[:1] + long_ + short[1:] + short[:1]]
    eng._slot[0] = eng._queue.popleft()
    picked = [eng._next_request().handle for _ in range(len(hs) - 1)]
    assert picked == [hs[2], hs[3], hs[4], hs[5], hs[1], hs[6], hs[7]]  # L's 4th pass puts it first
    # a long row in a slot: the other long prompt joins first; an empty batch: the narrowest first
    hs = [eng.submit(p) for p in long_ + short[1:2] + long_ + short[2:3]]
    eng._slot[0] = eng._queue.popleft()
    assert [eng._next_request().handle for _ in range(3)] == [hs[2], hs[1], hs[3]]
    eng._slot[0] = None
    hs = [eng.submit(p) for p in long_ + short[1:2]]
    assert [eng._next_request().handle for _ in range(2)] == [hs[1], hs[0]]
    with pytest.raises(ValueError, match="admission"):
        DecodeEngine(tiny_model, decode_config(**KW), slots=2, admission="sorted")


def test_engine_refuses_what_it_cannot_do(tiny_model):
    with pytest.raises(ValueError, match="slots"):
        DecodeEngine(tiny_model, decode_config(**KW), slots=0)
    with pytest.raises(ValueError, match="trajectories"):
        DecodeEngine(tiny_model, decode_config(**KW, return_trajectory=True), slots=2)
    eng = DecodeEngine(tiny_model, decode_config(**KW), slots=2)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.submit([])
    with pytest.raises(ValueError, match="MASK id"):
        eng.submit([tiny_model.cfg.mask_token_id])


@pytest.mark.parametrize("cache, kw", [
    ("dual", dict(strategy="planner", temperature=0.7)),
    ("prefix", dict(strategy="planner", reveal="topk")),
    ("dual", dict(strategy="threshold", threshold=0.5, early_stop=True, stop_id=131)),
    ("prefix", dict(strategy="threshold", threshold=0.5)),
])
def test_per_row_cache_rows_equal_each_prompt_alone(tiny_model, cache, kw):
    """Continuous batching with a per-row KV cache (3 prompts, 2 slots: a refill; one refresh row per iteration,
    so rows also wait for their refresh): each prompt's tokens, NFE and FLOP-weighted forwards are those of it
    decoded alone with the same cache (sync, batch 1), with its own row seed."""
    prompts, seeds = _prompts(3, seed=4), [5, 0, 9]
    common = dict(gen_length=16, block_length=8, cache=cache, **kw)
    eng = DecodeEngine(tiny_model, decode_config(**common, refresh_rows=1), slots=2)
    handles = [eng.submit(p, seed=s) for p, s in zip(prompts, seeds, strict=True)]
    got = {f.handle: f for f in eng.run()}
    waited = 0
    for h, p, s in zip(handles, prompts, seeds, strict=True):
        ids, mask = pad_prompts([p], tiny_model.cfg.pad_token_id, 16)
        one = generate(tiny_model, ids, attention_mask=mask, row_seeds=[s], rng=0, pad_aware=True, **common)
        np.testing.assert_array_equal(got[h].tokens[len(p):], np.asarray(one.generated[0]))
        assert got[h].nfe == int(one.nfe[0])
        assert got[h].equivalent_forwards == pytest.approx(float(one.equivalent_forwards[0]), abs=1e-4)
        waited += got[h].iterations - got[h].nfe
    assert waited > 0  # both first rows start their first block together: one waits for its refresh


def test_per_row_cache_survives_the_batch_widening_and_narrowing(tiny_model):
    """A long prompt joins running short rows with the dual cache: the canvas and every row's cached K/V are
    re-padded to the wider prompt width and back (the cache's canvas axis, not its heads axis); each prompt
    still decodes as alone with the same cache."""
    short, long_ = _prompts(4, seed=1), _prompts(1, seed=2, lo=20, hi=21)
    prompts = short[:2] + long_ + short[2:]  # runs at 16, widens to 24 for the long one, narrows after it
    common = dict(KW, cache="dual")
    eng = DecodeEngine(tiny_model, decode_config(**common), slots=2, segment=2)
    handles = [eng.submit(p, seed=i) for i, p in enumerate(prompts)]
    got = {f.handle: f for f in eng.run()}
    assert eng.widths_used == {16, 24}
    for h, p in zip(handles, prompts, strict=True):
        tokens, nfe = _alone(tiny_model, p, h, **common)
        np.testing.assert_array_equal(got[h].tokens, tokens)
        assert got[h].nfe == nfe


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_engine_on_a_mesh_equals_one_device_per_prompt(tiny_model, cache):
    """Slots split over 4 fake CPU devices (data=4), with a per-row cache (prefix: one window width for every
    block, layers.WindowStart): each prompt as decoded alone."""
    import jax

    from dultra_jax.decoding import generate_many
    from dultra_jax.parallel import ShardingPlan

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices; tests/conftest.py sets them up")
    plan = ShardingPlan.create("data=4,fsdp=1,tensor=1", devices=jax.devices()[:4])
    prompts, seeds = _prompts(3, seed=4), [5, 0, 9]
    common = dict(gen_length=16, block_length=8, cache=cache, strategy="planner", temperature=0.7)
    many = generate_many(tiny_model, prompts, slots=2, row_seeds=seeds, plan=plan, **common)  # 2 -> 4 slots
    for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        ids, mask = pad_prompts([p], tiny_model.cfg.pad_token_id, 16)
        one = generate(tiny_model, ids, attention_mask=mask, row_seeds=[s], rng=0, pad_aware=True, **common)
        np.testing.assert_array_equal(many.generated(i), np.asarray(one.generated[0]))
        assert int(many.nfe[i]) == int(one.nfe[0])
    with pytest.raises(ValueError, match="multiple of the mesh's 4 batch shards"):
        DecodeEngine(tiny_model, decode_config(**common), slots=2, plan=plan)
