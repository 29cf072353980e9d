"""Batch-invariant mode (ModelConfig.batch_invariant): a prompt's numbers never depend on
what else is in the batch. Gemma 3 is the model where the default mode does not hold it
(its kernels change path with the batch shape); SmolLM2 must hold it too."""

from __future__ import annotations

import threading

import pytest

import parallel_gen as pg
from parallel_gen.config import BATCH_INVARIANT_MIN_ROWS
from parallel_gen.errors import ParamError

from conftest import PROMPTS_16 as PROMPTS

LONG = "Background. " + " ".join(f"Fact {i}: the river {i} flows north into lake {i * 7 % 13}." for i in range(30))
GREEDY = dict(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)


def _numbers(completion):
    """Everything a greedy run computes for a prompt: tokens, their logprobs and the top-2."""
    out = completion.outputs[0]
    assert out.error is None, out.error
    return out.token_ids, [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in out.logprobs]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model_path(request, smollm2_path, gemma3_path):
    return smollm2_path if request.param == "smollm2" else gemma3_path


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_sixteen_prompts_batched_and_alone_are_bit_identical(model_path, flash_attn):
    kw = dict(n_ctx=256, flash_attn=flash_attn, batch_invariant=True)
    with pg.Model(model_path, n_parallel=16, **kw) as m:
        batched = pg.generate_parallel(m, PROMPTS, **GREEDY)
    assert batched.stats.failed == 0
    with pg.Model(model_path, n_parallel=1, **kw) as m:
        alone = [pg.generate_parallel(m, p, **GREEDY)[0] for p in PROMPTS]
        assert all(len(c.outputs[0].token_ids) == 48 for c in alone)
    same = [i for i, (a, b) in enumerate(zip(alone, batched)) if _numbers(a) == _numbers(b)]
    assert same == list(range(16))


def test_companions_slots_and_arrival_do_not_change_a_prompt(gemma3_path):
    """One prompt alone; beside a long companion; in the last slot; arriving while others
    are half-way through: the same tokens and logprobs, bit for bit."""
    probe = PROMPTS[5]
    with pg.Model(gemma3_path, n_parallel=4, n_ctx=512, batch_invariant=True) as m:
        alone = _numbers(pg.generate_parallel(m, probe, **GREEDY)[0])
        beside_long = pg.generate_parallel(m, [LONG, probe], **GREEDY)
        assert _numbers(beside_long[1]) == alone
        last_slot = pg.generate_parallel(m, [*PROMPTS[:3], probe], **GREEDY)
        assert _numbers(last_slot[3]) == alone

        late = {}
        with pg.stream_parallel(m, PROMPTS[6:9], max_tokens=40, temperature=0, ignore_eos=True) as events:
            for k, _ in enumerate(events):
                if k == 30:  # the companions are running: the probe arrives mid-run
                    t = threading.Thread(target=lambda: late.update(r=pg.generate_parallel(m, probe, **GREEDY)))
                    t.start()
            t.join()
        assert _numbers(late["r"][0]) == alone


def test_scores_alone_and_among_twenty_texts(gemma3_path):
    texts = [f"Review {i}: " + ("I loved it, wonderful acting." if i % 2 else "Dull, far too long.") for i in range(20)]
    labels = ["positive", "negative", "mixed"]
    with pg.Model(gemma3_path, n_parallel=8, n_ctx=256, batch_invariant=True) as m:
        together = pg.classify(m, texts, labels)
        alone = [pg.classify(m, t, labels)[0] for t in texts[:4]]
    for a, b in zip(alone, together):
        assert a.error is None and a.probs == b.probs
        assert [s.logprob for s in a.scores] == [s.logprob for s in b.scores]


def test_padding_rows_are_counted_only_in_the_mode(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=128, batch_invariant=True) as m:
        assert m.batch_invariant and not m.share_prefix  # no shared prefix in the mode
        r = pg.generate_parallel(m, "Hello there, how are you?", max_tokens=5, temperature=0, ignore_eos=True)
        # 1 prompt: its 4 generation steps (the first token comes from the prefill, a call
        # of its own) each padded from 1 row to the minimum
        assert r.stats.prompt_tokens > 1 and r.stats.padding_rows == 4 * (BATCH_INVARIANT_MIN_ROWS - 1)
        assert m.runner.run_on_engine(lambda e: e.kv_tokens) == 0  # the dummy rows leave nothing behind
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=128) as m:
        r = pg.generate_parallel(m, "Hi", max_tokens=5, temperature=0, ignore_eos=True)
        assert r.stats.padding_rows == 0 and m.share_prefix


def test_the_mode_is_part_of_the_numerics_and_checked(smollm2_path):
    assert pg.ModelConfig(batch_invariant=True).numerics()["batch_invariant"] is True
    assert pg.ModelConfig(batch_invariant=True).share_prefix is False
    assert pg.ModelConfig(batch_invariant=True).prompt_cache is False
    assert pg.ModelConfig(n_parallel=2, batch_invariant=True).kv_streams == BATCH_INVARIANT_MIN_ROWS
    with pytest.raises(ParamError, match="kv_unified=False") as e:
        pg.ModelConfig(batch_invariant=True, kv_unified=True)
    assert e.value.field == "batch_invariant"
    with pytest.raises(ParamError, match=f">= {BATCH_INVARIANT_MIN_ROWS}") as e:
        pg.ModelConfig(n_parallel=2, n_batch=4, batch_invariant=True)
    assert e.value.field == "n_batch"
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        pg.ModelConfig(batch_invariant="yes")
