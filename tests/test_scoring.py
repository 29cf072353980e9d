"""score and classify: teacher-forced log-likelihoods and label probabilities.

The reference is llama-cpp-python computing the same thing independently: one
``Llama(logits_all=True)`` evaluation of prompt + continuation, log-softmax at each
position, on the same token ids and with the same flash-attention setting.
"""

from __future__ import annotations

import threading

import llama_cpp
import numpy as np
import pytest

import parallel_gen as pg
from parallel_gen.classification import DEFAULT_TEMPLATE, label_probabilities
from parallel_gen.templates import ChatTemplate

SENTIMENT = ["positive", "negative", "neutral"]
TEMPLATE = "Review: {text}\nSentiment: "
REVIEWS = [
    "I loved this movie, it was wonderful!",
    "Terrible food and rude staff. Never again.",
    "The package arrived on Tuesday.",
    "Best purchase I have made all year, highly recommended.",
]


@pytest.fixture(scope="module")
def smol_exact(smollm2_path):
    """SmolLM2 with flash attention on, as the llama-cpp-python reference runs. With it off,
    llama.cpp's attention kernels make logits depend on how many tokens are decoded
    together (0.05 on a logprob, measured in llama-cpp-python alone between n_ubatch 16
    and 512); with it on, SmolLM2's results do not, so batched equals alone exactly."""
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512, flash_attn=True) as m:
        yield m


@pytest.fixture(scope="module")
def reference(smollm2_path):
    llm = pg.load_llama(str(smollm2_path), n_ctx=512, logits_all=True, flash_attn=True, verbose=False)
    yield llm
    llm.close()


def reference_logprobs(llm: llama_cpp.Llama, prompt_ids, cont_ids):
    """log P(cont_ids[k] | prompt_ids + cont_ids[:k]) for each k, by llama-cpp-python.

    Fed as the engine feeds a scoring sequence: the prompt in one decode, then the
    continuation. llama.cpp's results depend on how many tokens of a sequence one decode
    holds (measured on SmolLM2: prompt + continuation in one 65-token decode differs from
    58 + 7 by up to 0.15 on a token's logprob), so like is compared with like.
    """
    llm.reset()
    llm.eval(list(prompt_ids))
    if len(cont_ids) > 1:
        llm.eval(list(cont_ids[:-1]))
    n = len(prompt_ids)
    logits = np.asarray(llm.scores[n - 1:n + len(cont_ids) - 1], dtype=np.float64)
    mx = logits.max(axis=1, keepdims=True)
    logsm = logits - mx - np.log(np.exp(logits - mx).sum(axis=1, keepdims=True))
    return [float(logsm[k, t]) for k, t in enumerate(cont_ids)]


def _kv_left(model) -> int:
    return model._require_runner().run_on_engine(lambda e: e.kv_tokens)


# -- score --------------------------------------------------------------------------------

def test_score_equals_llama_cpp_python_per_token(smol_exact, reference):
    prompts = ["The capital of France is", "Once upon a time, there ", "def add(a, b):\n    return"]
    conts = [" Paris", " London, a city in England", "was a little girl", " a + b"]
    got = pg.score(smol_exact, prompts, conts)
    assert [len(r) for r in got] == [4, 4, 4]
    n_tokens = 0
    for prompt, row in zip(prompts, got):
        head = prompt.rstrip()
        prompt_ids = smol_exact.tokenize(head)
        for cont, s in zip(conts, row):
            # The prompt's trailing whitespace moved to the continuation, tokenized alone.
            expected_ids = smol_exact.tokenize(prompt[len(head):] + cont, add_special=False, parse_special=False)
            assert s.error is None and s.token_ids == expected_ids
            ref = reference_logprobs(reference, prompt_ids, s.token_ids)
            assert np.max(np.abs(np.array(s.token_logprobs) - ref)) < 0.01, (prompt, cont, s, ref)
            assert s.logprob == pytest.approx(sum(s.token_logprobs), abs=1e-9)
            assert s.mean_logprob == pytest.approx(s.logprob / len(s.token_ids))
            n_tokens += len(s.token_ids)
    assert n_tokens > 30
    # The likely continuation is far more likely than the unlikely one.
    assert got[0][0].logprob > got[0][2].logprob + 5
    assert _kv_left(smol_exact) == 0


def test_score_moves_trailing_whitespace_to_the_continuation(smol_exact):
    spaced, plain = pg.score(smol_exact, ["The capital of France is ", "The capital of France is"], [["Paris"], [" Paris"]])
    assert spaced[0].token_ids == plain[0].token_ids == smol_exact.tokenize(" Paris", add_special=False)
    assert spaced[0].token_logprobs == plain[0].token_logprobs


def test_score_per_prompt_continuation_lists(smol_exact):
    got = pg.score(smol_exact, ["2 + 2 =", "The sky is"], [[" 4", " 5"], [" blue"]])
    assert [len(r) for r in got] == [2, 1]
    assert got[0][0].logprob > got[0][1].logprob
    single = pg.score(smol_exact, "The sky is", [" blue"])
    assert single[0][0].token_logprobs == got[1][0].token_logprobs


def test_score_argument_errors(smol_exact):
    with pytest.raises(ValueError, match="continuations is empty"):
        pg.score(smol_exact, ["a"], [])
    with pytest.raises(ValueError, match=r"continuations\[1\] is empty"):
        pg.score(smol_exact, ["a"], [" x", ""])
    with pytest.raises(ValueError, match="3 lists for 2 prompts"):
        pg.score(smol_exact, ["a", "b"], [[" x"], [" y"], [" z"]])
    with pytest.raises(ValueError, match=r"continuations\[1\] is empty"):
        pg.score(smol_exact, ["a", "b"], [[" x"], []])
    with pytest.raises(TypeError, match="wrap it in a list"):
        pg.score(smol_exact, ["a"], " x")
    with pytest.raises(TypeError, match=r"continuations\[0\]\[0\] must be a str"):
        pg.score(smol_exact, ["a"], [[3]])
    with pytest.raises(ValueError, match="not valid Unicode"):
        pg.score(smol_exact, ["a"], [" \ud800"])


def test_score_bad_prompt_is_a_per_prompt_error(smol_exact):
    got = pg.score(smol_exact, ["fine prompt", "bad \ud800 prompt", "The sky is"], [" blue"])
    assert got[1][0].error is not None and "Unicode" in got[1][0].error and np.isnan(got[1][0].logprob)
    assert got[0][0].error is None and got[2][0].error is None
    assert got[2][0].token_logprobs == pg.score(smol_exact, "The sky is", [" blue"])[0][0].token_logprobs


# -- classify -----------------------------------------------------------------------------

def test_classify_probs_sum_to_one_and_match_score(smol_exact):
    result = pg.classify(smol_exact, REVIEWS, SENTIMENT, template=TEMPLATE)
    assert isinstance(result, pg.Classifications) and len(result) == len(REVIEWS)
    assert result.labels == SENTIMENT
    assert result.probs.shape == (len(REVIEWS), 3) and result.probs.dtype == np.float64
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-12)
    scores = pg.score(smol_exact, [TEMPLATE.replace("{text}", t) for t in REVIEWS], SENTIMENT)
    for c, row, probs in zip(result, scores, result.probs):
        assert [s.token_ids for s in c.scores] == [s.token_ids for s in row]
        np.testing.assert_allclose(probs, label_probabilities(row), rtol=1e-6)
        assert list(c.probs) == SENTIMENT and c.label == SENTIMENT[int(np.argmax(probs))]
    # Real behaviour: the clearly positive and negative reviews go where they belong.
    assert result[0].label == "positive" and result[3].label == "positive"
    assert result.probs[1, 1] > result.probs[0, 1]


def test_a_path_opens_a_context_sized_to_the_work_and_shows_progress(smollm2_path, smol_exact, caplog, capfd):
    with caplog.at_level("INFO", logger="parallel_gen"):
        got = pg.classify(str(smollm2_path), REVIEWS, SENTIMENT, template=TEMPLATE, progress=True)
    # the longest prompt plus the longest label, rounded up to 256; not the 4096 default
    assert "n_ctx 256 sized to the work" in caplog.text, caplog.text
    out, err = capfd.readouterr()
    assert out == "" and f"{len(REVIEWS)}/{len(REVIEWS)}" in err and "tok/s" not in err
    with pg.Model(smollm2_path, n_ctx=256) as same:  # the settings a path gets, but n_ctx
        np.testing.assert_allclose(got.probs, pg.classify(same, REVIEWS, SENTIMENT, template=TEMPLATE).probs,
                                   atol=1e-6)
    caplog.clear()
    with caplog.at_level("INFO", logger="parallel_gen"):
        s = pg.score(str(smollm2_path), ["word " * 300], [" end"], progress=False)
    assert "n_ctx 512 sized to the work" in caplog.text and s[0][0].error is None
    with pytest.raises(TypeError, match="progress must be"):
        pg.classify(smol_exact, REVIEWS, SENTIMENT, progress="yes")


def test_classify_alone_equals_among_64(smol_exact):
    subjects = ["movie", "hotel", "phone", "book", "restaurant", "concert", "laptop", "game"]
    verdicts = ["was great", "was awful", "was fine, nothing special", "changed my life",
                "broke after a day", "arrived late", "exceeded every expectation", "is what it is"]
    texts = [f"The {s} {v}." for s in subjects for v in verdicts]
    assert len(texts) == 64
    together = pg.classify(smol_exact, texts, SENTIMENT)
    for k in (0, 13, 14, 15, 17, 40, 63):
        alone = pg.classify(smol_exact, texts[k], SENTIMENT)
        assert np.array_equal(alone.probs[0], together.probs[k]), (k, alone.probs[0], together.probs[k])
        assert [s.token_logprobs for s in alone[0].scores] == [s.token_logprobs for s in together[k].scores]
    np.testing.assert_allclose(together.probs.sum(axis=1), 1.0, atol=1e-12)
    assert _kv_left(smol_exact) == 0


def test_labels_sharing_their_first_tokens(smol_exact, reference):
    labels = ["very positive", "very negative", "positive", "very positive indeed"]
    text = "What a delightful afternoon."
    result = pg.classify(smol_exact, [text], labels, template=TEMPLATE)
    c = result[0]
    ids = [s.token_ids for s in c.scores]
    assert ids[0][0] == ids[1][0] == ids[3][0] and ids[0][1] != ids[1][1] and ids[3][:2] == ids[0]
    # The shared first token has one logprob, read once from the prompt's last position.
    assert c.scores[0].token_logprobs[0] == c.scores[1].token_logprobs[0] == c.scores[3].token_logprobs[0]
    prompt_ids = smol_exact.tokenize(c.prompt)
    for s in c.scores:
        ref = reference_logprobs(reference, prompt_ids, s.token_ids)
        assert np.max(np.abs(np.array(s.token_logprobs) - ref)) < 0.01
    assert sum(c.probs.values()) == pytest.approx(1.0, abs=1e-12)
    # Each label scored alone after the same prompt gives the same numbers.
    for lab, s in zip(labels, c.scores):
        only = pg.classify(smol_exact, [text], [lab, "x"], template=TEMPLATE)[0].scores[0]
        assert only.token_logprobs == s.token_logprobs


def test_classify_chat_mode(smol_exact, reference):
    system = "You label the sentiment of product reviews."
    result = pg.classify(smol_exact, REVIEWS[:2], SENTIMENT, chat=True, system=system)
    template = ChatTemplate(smol_exact)
    eot = template.end_of_turn_token
    assert eot is not None
    for c in result:
        assert c.prompt.endswith("<|im_start|>assistant\n") and system in c.prompt and c.text in c.prompt
        prompt_ids = smol_exact.tokenize(c.prompt)
        for lab, s in zip(SENTIMENT, c.scores):
            # The label as the assistant's whole answer: its tokens, then the end of turn.
            assert s.token_ids == smol_exact.tokenize(lab, add_special=False) + [eot]
            ref = reference_logprobs(reference, prompt_ids, s.token_ids)
            assert np.max(np.abs(np.array(s.token_logprobs) - ref)) < 0.01
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-12)
    assert result[0].label == "positive" and result[1].label == "negative"


def test_normalize_mean_uses_per_token_means(smol_exact):
    labels = ["yes", "no, not at all"]
    summed = pg.classify(smol_exact, REVIEWS[:2], labels)
    mean = pg.classify(smol_exact, REVIEWS[:2], labels, normalize="mean")
    for a, b in zip(summed, mean):
        assert [s.token_logprobs for s in a.scores] == [s.token_logprobs for s in b.scores]
        x = np.array([s.logprob / len(s.token_ids) for s in b.scores])
        np.testing.assert_allclose(list(b.probs.values()), np.exp(x) / np.exp(x).sum(), rtol=1e-9)
    assert not np.allclose(summed.probs, mean.probs)


def test_classify_argument_errors(smol_exact):
    with pytest.raises(ValueError, match="labels is empty"):
        pg.classify(smol_exact, ["t"], [])
    with pytest.raises(ValueError, match=r"labels\[2\]='a' is a duplicate"):
        pg.classify(smol_exact, ["t"], ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"labels\[1\] is empty"):
        pg.classify(smol_exact, ["t"], ["a", ""])
    with pytest.raises(TypeError, match="single str"):
        pg.classify(smol_exact, ["t"], "positive")
    with pytest.raises(TypeError, match=r"labels\[0\] must be a str"):
        pg.classify(smol_exact, ["t"], [1, 2])
    with pytest.raises(ValueError, match=r"normalize='max'"):
        pg.classify(smol_exact, ["t"], ["a"], normalize="max")
    with pytest.raises(ValueError, match="no {text} field"):
        pg.classify(smol_exact, ["t"], ["a"], template="Label:")
    # system= and chat_template= imply chat (chat.chat_mode, the one rule every surface uses)
    implied = pg.classify(smol_exact, ["t"], ["a", "b"], system="be brief")
    assert implied[0].probs == pg.classify(smol_exact, ["t"], ["a", "b"], chat=True, system="be brief")[0].probs
    assert implied[0].prompt.startswith("<|im_start|>system\nbe brief")
    with pytest.raises(TypeError, match="template"):
        pg.classify(smol_exact, ["t"], ["a"], template=3)
    with pytest.raises(ValueError, match="not valid Unicode"):
        pg.classify(smol_exact, ["t"], ["a\udc80"])


def test_template_fields_and_braces_in_text(smol_exact):
    result = pg.classify(smol_exact, ["a {labels} b {text}"], ["x", "y"], template="[{labels}] {text} ->")
    assert result[0].prompt == "[x, y] a {labels} b {text} ->"
    default = pg.classify(smol_exact, ["hello"], ["x", "y"])
    assert default[0].prompt == DEFAULT_TEMPLATE.replace("{labels}", "x, y").replace("{text}", "hello").rstrip()
    called = pg.classify(smol_exact, ["hello"], ["x", "y"], template=lambda t: f"Say {t}: ")
    assert called[0].prompt == "Say hello:" and called[0].scores[0].token_ids == smol_exact.tokenize(
        " x", add_special=False)


def test_text_longer_than_the_context_is_a_per_text_error(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=64, flash_attn=True) as m:
        long_text = "word " * 80
        # Fits with the one-token label but not with the long one: still this text's error.
        edge = "Review: " + "ok " * 45
        template = "{text}\nSentiment: "
        labels = ["positive", "negative and " * 12]
        n_edge = len(m.tokenize((edge + "\nSentiment: ").rstrip()))
        assert n_edge + 1 <= 64 < n_edge + len(m.tokenize(" " + labels[1], add_special=False))
        result = pg.classify(m, [REVIEWS[0], long_text, edge, REVIEWS[1]], labels, template=template)
        for k in (1, 2):
            assert result[k].error is not None and "n_ctx=64" in result[k].error and result[k].label is None
            assert result[k].error_code is pg.ErrorCode.PROMPT_TOO_LONG  # the code beside the message
            assert np.isnan(result.probs[k]).all()
        fine = pg.classify(m, [REVIEWS[0], REVIEWS[1]], labels, template=template)
        assert np.array_equal(result.probs[[0, 3]], fine.probs)
        assert result[0].error is None and result[0].error_code is None
        assert repr(result).endswith("failed=2)")
        assert _kv_left(m) == 0


def test_scoring_shares_the_batch_with_generation(smol_exact):
    prompts = ["Once upon a time", "The quick brown fox", "Water boils at"]
    gen_alone = pg.generate_parallel(smol_exact, prompts, max_tokens=24, temperature=0, ignore_eos=True)
    cls_alone = pg.classify(smol_exact, REVIEWS, SENTIMENT)
    out = {}

    def gen():
        out["gen"] = pg.generate_parallel(smol_exact, prompts, max_tokens=24, temperature=0, ignore_eos=True)

    t = threading.Thread(target=gen)
    t.start()
    out["cls"] = pg.classify(smol_exact, REVIEWS, SENTIMENT)
    t.join()
    assert [c.token_ids for c in out["gen"]] == [c.token_ids for c in gen_alone]
    assert np.array_equal(out["cls"].probs, cls_alone.probs)
    assert _kv_left(smol_exact) == 0


def test_paused_scoring_sequences_are_recomputed(smollm2_path):
    """A shared KV pool too small for all sequences pauses some (their KV dropped, decoded
    again later from the start); their scores must come out as without pauses, within 0.5
    per token, because in a unified KV pool llama.cpp's numerics follow the batch around a
    sequence (measured on SmolLM2: up to 0.32 on a token between two unified runs, 0.18
    between one and a solo llama-cpp-python run). A continuation fed at wrong positions or
    over stale KV is off by whole nats."""
    texts = [f"Review number {k}: {REVIEWS[k % 4]} " * 2 for k in range(16)]
    labels = ["positive " * 6, "negative " * 6, "neutral"]
    with pg.Model(smollm2_path, n_parallel=16, n_ctx=128, kv_unified=True, flash_attn=True) as roomy:
        expected = pg.classify(roomy, texts, labels, template="{text} ->")
    with pg.Model(smollm2_path, n_parallel=16, n_ctx=128, kv_unified=True, kv_size=256, flash_attn=True) as tight:
        runner = tight._require_runner()
        seen = []
        submit = runner.submit
        runner.submit = lambda req: (seen.append(req), submit(req))[1]  # to read the request's counters
        got = pg.classify(tight, texts, labels, template="{text} ->")
        assert seen[0].counters.preemptions > 0
        assert _kv_left(tight) == 0
    for a, b in zip(got, expected):
        assert [s.token_ids for s in a.scores] == [s.token_ids for s in b.scores]
        for x, y in zip(a.scores, b.scores):
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=0.5)
    np.testing.assert_allclose(got.probs.sum(axis=1), 1.0, atol=1e-12)


def test_gemma3_long_prompt_beyond_its_sliding_window(gemma3_path):
    """Gemma 3 attends over a 512-token window in most layers: continuations after a longer
    prompt cannot be rolled back in place, and the prompt is decoded again for each.
    Scored alone (Gemma's CPU kernels are not batch invariant, see the README), the result
    equals llama-cpp-python's."""
    with pg.Model(gemma3_path, n_parallel=4, n_ctx=1024, flash_attn=True) as m:
        n_swa = m.handle.n_swa
        prompt = "The weather report for the week. " * 80 + "Tomorrow will be"
        prompt_ids = m.tokenize(prompt)
        assert n_swa > 0 and len(prompt_ids) > n_swa
        got = pg.score(m, prompt, [" sunny and warm", " rainy and cold", " windy"])[0]
        assert _kv_left(m) == 0
    llm = pg.load_llama(str(gemma3_path), n_ctx=1024, logits_all=True, flash_attn=True, verbose=False)
    try:
        for s in got:
            ref = reference_logprobs(llm, prompt_ids, s.token_ids)
            assert np.max(np.abs(np.array(s.token_logprobs) - ref)) < 0.01, (s, ref)
    finally:
        llm.close()
