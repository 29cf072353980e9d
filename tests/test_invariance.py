"""Batch invariance: a prompt's greedy output in a batch equals its output alone."""

from __future__ import annotations

import parallel_gen as pg

from conftest import PROMPTS_16


def _batched_vs_alone(model, n_tokens=48):
    batched = pg.generate_parallel(model, PROMPTS_16, max_tokens=n_tokens, temperature=0, ignore_eos=True)
    alone = [pg.generate_parallel(model, p, max_tokens=n_tokens, temperature=0, ignore_eos=True)[0]
             for p in PROMPTS_16]
    return batched, alone


def test_smollm2_batched_equals_alone_exactly(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=16, n_ctx=256) as m:
        batched, alone = _batched_vs_alone(m)
    same = [b.token_ids == a.token_ids for b, a in zip(batched, alone)]
    assert all(len(b.token_ids) == 48 for b in batched)
    assert sum(same) == 16, f"only {sum(same)}/16 identical"


def test_repeated_batches_are_deterministic(gemma3_path):
    with pg.Model(gemma3_path, n_parallel=16, n_ctx=256) as m:
        one = pg.generate_parallel(m, PROMPTS_16, max_tokens=32, temperature=0)
        two = pg.generate_parallel(m, PROMPTS_16, max_tokens=32, temperature=0)
    assert [c.token_ids for c in one] == [c.token_ids for c in two]


def test_gemma3_sequences_are_isolated_and_mostly_invariant(gemma3_path):
    """Gemma 3's CPU kernels are not batch-size invariant in llama.cpp (see the README's
    "Batch invariance" section), so exact equality with decoding alone cannot hold for
    every prompt. What must hold: identical prompts in one batch agree exactly (no KV
    cross-talk between sequences), and most prompts still match their solo run."""
    with pg.Model(gemma3_path, n_parallel=16, n_ctx=256) as m:
        copies = pg.generate_parallel(m, ["Once upon a time"] * 16, max_tokens=32, temperature=0, ignore_eos=True)
        assert len({tuple(c.token_ids) for c in copies}) == 1
        batched, alone = _batched_vs_alone(m, n_tokens=48)
    same = sum(b.token_ids == a.token_ids for b, a in zip(batched, alone))
    first = sum(b.token_ids[:2] == a.token_ids[:2] for b, a in zip(batched, alone))
    print(f"gemma3 batch invariance: {same}/16 identical over 48 tokens")
    assert same >= 6 and first >= 14, (same, first)
