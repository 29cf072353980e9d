"""Structured output (grammar, JSON schema, choices), logprobs and logit bias."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import parallel_gen as pg

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}


def _valid_person(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "city"} and isinstance(obj["name"], str)
            and isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and isinstance(obj["city"], str))


def test_json_schema_16_prompts_all_parse_and_validate(smol):
    prompts = [f"Invent person number {i} and describe them as JSON with name, age and city:" for i in range(16)]
    r = pg.generate_parallel(smol, prompts, json_schema=PERSON, max_tokens=80, temperature=0.7, seed=11)
    for c in r:
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        assert _valid_person(json.loads(c.text)), c.text
    assert len({c.text for c in r}) > 1  # sampled, not one canned answer


def test_json_strings_never_hold_raw_control_characters(smol):
    """JSON forbids an unescaped U+0000-U+001F inside a string; llama-cpp-python's schema
    converter allowed it (a sampled newline in a string gave text json.loads rejects).
    Every token holding a control character is pushed up by 100: the grammar alone keeps
    them out, in a schema and in a grammar built from schemas (the tool-call path)."""
    from parallel_gen.constraints import GrammarBuilder

    bias = {t: 100.0 for t in range(smol.n_vocab)
            if any(ord(ch) < 0x20 for ch in smol.detokenize([t]))}
    assert len(bias) > 10  # newlines, tabs, runs of them
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 20}},
              "required": ["note"], "additionalProperties": False}
    built = GrammarBuilder()
    built_root = built.schema(schema, "note")
    params = [pg.SamplingParams(json_schema=schema, max_tokens=40, temperature=0.8, seed=s, logit_bias=bias)
              for s in range(3)]
    params.append(pg.SamplingParams(grammar=built.build(built_root), max_tokens=40, temperature=0, logit_bias=bias))
    r = pg.generate_parallel(smol, ["Write a short note as JSON:"] * 4, params)
    for c in r:
        assert not any(ord(ch) < 0x20 for ch in c.text), repr(c.text)
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        assert isinstance(json.loads(c.text)["note"], str)


def test_choices_always_hit_a_choice(smol):
    labels = ["positive", "negative", "neutral"]
    reviews = ["I loved it!", "Awful.", "It exists.", "Best day ever", "Never again", "Meh"] * 2
    prompts = [f"Review: {x}\nSentiment (positive, negative or neutral):" for x in reviews]
    r = pg.generate_parallel(smol, prompts, choices=labels, temperature=1.0, seed=3, max_tokens=10)
    assert all(c.text in labels and c.finish_reason == "stop" for c in r), r.texts


def test_different_grammars_in_one_batch(smol):
    params = [
        pg.SamplingParams(grammar='root ::= [0-9]+ "."', max_tokens=12, temperature=0.5, seed=1),
        pg.SamplingParams(choices=["yes", "no"], max_tokens=8, temperature=0.5, seed=2),
        pg.SamplingParams(json_schema={"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                          max_tokens=40, temperature=0.5, seed=3),
        pg.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),  # unconstrained
    ]
    prompts = ["A number:", "Is water wet?", "Three small numbers as JSON:", "Hello"]
    r = pg.generate_parallel(smol, prompts, params)
    assert r[0].text[:-1].isdigit() and r[0].text.endswith(".")
    assert r[1].text in ("yes", "no")
    arr = json.loads(r[2].text)
    assert isinstance(arr, list) and len(arr) <= 3 and all(isinstance(x, int) for x in arr)
    free = pg.generate_parallel(smol, prompts[3], params[3])[0]
    assert r[3].token_ids == free.token_ids  # constraints on others leave it alone


def test_greedy_logprobs_are_consistent(smol):
    r = pg.generate_parallel(smol, ["The capital of France is", "1, 2, 3,"], logprobs=5, max_tokens=8,
                             temperature=0, ignore_eos=True)
    for c in r:
        out = c.outputs[0]
        assert len(out.logprobs) == len(out.token_ids) == 8
        for tok, lp in zip(out.token_ids, out.logprobs):
            assert lp.token_id == tok and lp.token == smol.detokenize([tok])
            assert all(a.token == smol.detokenize([a.token_id]) for a in lp.top)
            assert len(lp.top) == 5
            assert [a.logprob for a in lp.top] == sorted((a.logprob for a in lp.top), reverse=True)
            # greedy picks the most likely token: its probability is the top-1 probability
            assert lp.top[0].token_id == tok
            assert math.isclose(math.exp(lp.logprob), math.exp(lp.top[0].logprob), rel_tol=1e-6)
            assert lp.logprob <= 0 and sum(math.exp(a.logprob) for a in lp.top) <= 1 + 1e-5
        assert math.isclose(out.cumulative_logprob, sum(t.logprob for t in out.logprobs))
        arr = out.token_logprobs
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.shape == (8,)
        assert arr.tolist() == [t.logprob for t in out.logprobs]
    # logprobs do not change what is generated
    plain = pg.generate_parallel(smol, ["The capital of France is"], max_tokens=8, temperature=0, ignore_eos=True)
    assert plain[0].token_ids == r[0].token_ids and plain[0].outputs[0].logprobs is None
    assert plain[0].outputs[0].token_logprobs is None


def test_greedy_argmax_path_matches_llama_cpp_greedy_sampler(smol):
    """Plain greedy takes a shortcut (an argmax over the logits); a zero logit bias makes
    the same choice go through llama.cpp's own sampler chain: both must pick alike."""
    from conftest import PROMPTS_16

    kw = dict(max_tokens=24, temperature=0, ignore_eos=True)
    fast = pg.generate_parallel(smol, PROMPTS_16, **kw)
    chain = pg.generate_parallel(smol, PROMPTS_16, logit_bias={0: 0.0}, **kw)
    assert [c.token_ids for c in fast] == [c.token_ids for c in chain]


def test_logprobs_zero_gives_only_the_chosen_token(smol):
    out = pg.generate_parallel(smol, "Hi", logprobs=0, max_tokens=3, temperature=0.8, seed=1)[0].outputs[0]
    assert all(t.top == [] and t.logprob <= 0 for t in out.logprobs)


def test_logit_bias_bans_and_forces(smol):
    free = pg.generate_parallel(smol, "The capital of France is", max_tokens=6, temperature=0, ignore_eos=True)[0]
    banned = free.token_ids[0]
    r = pg.generate_parallel(smol, "The capital of France is", max_tokens=6, temperature=0, ignore_eos=True,
                             logit_bias={banned: -math.inf})[0]
    assert banned not in r.token_ids
    forced = smol.tokenize(" banana", add_special=False)[0]
    r = pg.generate_parallel(smol, "The capital of France is", max_tokens=3, temperature=0,
                             logit_bias={forced: 100.0})[0]
    assert r.token_ids == [forced] * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grammar="root ::= undefined_rule"), "rejects the grammar"),
        (dict(grammar="root ::= ("), "rejects the grammar"),
        (dict(json_schema="{not json"), "json_schema: not valid JSON"),
        (dict(json_schema={"type": "object"}, choices=["a"]), "at most one of"),
        (dict(choices=[]), "at least one"),
        (dict(choices=["ok", ""]), "empty"),
        (dict(logprobs=21), "logprobs=21"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={5: math.nan}), "logit_bias"),
        (dict(logit_bias={10**8: 1.0}), "not in the model's vocabulary"),
        (dict(grammar=""), "must not be empty"),
    ],
)
def test_bad_constraints_fail_before_any_work(smol, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.generate_parallel(smol, ["a", "b"], max_tokens=2, **kwargs)
    s = smol.stats()
    assert s.slots_busy == 0 and s.queued_prompts == 0 and s.active_requests == 0


def test_bad_constraint_types():
    with pytest.raises(TypeError, match="grammar must be GBNF text"):
        pg.SamplingParams(grammar=3)
    with pytest.raises(TypeError, match="json_schema must be a dict"):
        pg.SamplingParams(json_schema=[1])
    with pytest.raises(TypeError, match="logit_bias must be a mapping"):
        pg.SamplingParams(logit_bias=[(1, 2.0)])


# -- lazy grammars (grammar_triggers) ------------------------------------------------------
def test_lazy_grammar_constrains_from_its_trigger_on(smol):
    prompts = ["1, 2, 3, 4,", "The capital of France is"]
    free = pg.generate_parallel(smol, prompts, temperature=0, max_tokens=16)
    assert free[0].text.startswith(" 5, 6, 7")
    lazy = pg.generate_parallel(smol, prompts, temperature=0, max_tokens=16, grammar='root ::= "6, seven, eight."',
                                grammar_triggers=["(6)"])
    assert lazy[0].text == " 5, 6, seven, eight." and lazy[0].finish_reason == "stop"
    assert lazy[1].text == free[1].text  # never triggered: never constrained
    eager = pg.generate_parallel(smol, prompts[:1], temperature=0, max_tokens=16, grammar='root ::= "6, seven, eight."')
    assert eager[0].text == "6, seven, eight."


def test_lazy_grammar_failures_stay_with_their_prompt(smol):
    # " Paris" is one token: the trigger "Par" fires inside it and the grammar rejects the
    # rest of the token; that sequence goes on unconstrained, the others are unaffected.
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    free = pg.generate_parallel(smol, prompts, temperature=0, max_tokens=12)
    r = pg.generate_parallel(smol, prompts, temperature=0, max_tokens=12, grammar='root ::= "Parx"',
                             grammar_triggers=["(Par)"])
    assert [c.text for c in r] == [c.text for c in free] and all(c.error is None for c in r)
    # A pattern Python accepts but std::regex does not: that prompt's error.
    params = [pg.SamplingParams(max_tokens=4, grammar='root ::= "x"', grammar_triggers=["(?<=P)ar"]),
              pg.SamplingParams(max_tokens=4, temperature=0)]
    r = pg.generate_parallel(smol, prompts, params)
    assert r[0].finish_reason == "error" and "not a valid regex" in r[0].error
    assert r[1].error is None and r[1].text


def test_bad_grammar_triggers():
    with pytest.raises(ValueError, match="grammar_triggers.*need a grammar"):
        pg.SamplingParams(grammar_triggers=["x"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        pg.SamplingParams(grammar='root ::= "x"', grammar_triggers=["(x"])
    with pytest.raises(TypeError, match="grammar_triggers"):
        pg.SamplingParams(grammar='root ::= "x"', grammar_triggers=[3])
    assert pg.SamplingParams(json_schema={"type": "string"}, grammar_triggers="x").grammar_triggers == ("x",)
