"""chat_parallel and chat templates (SmolLM2-Instruct has one, the Gemma 3 base model none),
and the progress bar."""

from __future__ import annotations

import sys

import pytest

import parallel_gen as pg
from parallel_gen import progress as progress_mod
from parallel_gen.progress import make_progress
from parallel_gen.templates import ChatTemplate, builtin_templates

MARKUP = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>")

# A Gemma-3-instruct-style template, given to the Gemma 3 base model (which has none).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = m['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# ChatML without a default system message, and refusing system messages.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system messages are not "
    "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    """One thread: on a shared 2-core machine a second OpenMP thread mostly waits its turn."""
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    with pg.Model(gemma3_path, n_parallel=2, n_ctx=256, n_threads=1) as m:
        yield m


def user(text):
    return [{"role": "user", "content": text}]


def im_end(model):
    ids = model.tokenize("<|im_end|>", add_special=False)
    assert len(ids) == 1
    return ids[0]


# -- formatting --------------------------------------------------------------------------
def test_smollm2_template_rendered_as_written(smol):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = pg.apply_chat_template(smol, conv)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    # Cross-check between the two renderers: llama.cpp's ChatML says the same.
    assert pg.apply_chat_template(smol, conv, chat_template="chatml") == prompt
    assert pg.apply_chat_template(smol, conv, add_generation_prompt=False) == prompt[: -len("<|im_start|>assistant\n")]
    # Without a system message SmolLM2's own template adds its default one (llama.cpp's
    # built-in ChatML would not: this is why the Jinja template is rendered).
    plain = pg.apply_chat_template(smol, user("Hi"))
    assert plain.startswith("<|im_start|>system\n") and plain.count("<|im_start|>") == 3
    assert plain.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert plain != pg.apply_chat_template(smol, user("Hi"), chat_template="chatml")


def test_end_of_turn_detection_and_stops(smol, gemma):
    t = ChatTemplate(smol)
    assert (t.renderer, t.end_of_turn, t.end_of_turn_token) == ("jinja2", "<|im_end|>", im_end(smol))
    p = t.add_stops(pg.SamplingParams(stop_token_ids=(5,)))
    assert p.stop_token_ids == (5, im_end(smol)) and t.add_stops(p) == p
    # On Gemma "<|im_end|>" is plain text, not a token: it becomes a stop string.
    t = ChatTemplate(gemma, "chatml")
    assert (t.renderer, t.end_of_turn, t.end_of_turn_token) == ("llama.cpp", "<|im_end|>", None)
    p = t.add_stops(pg.SamplingParams(stop="x"))
    assert p.stop == ("x", "<|im_end|>") and p.stop_token_ids == () and t.add_stops(p) == p
    t = ChatTemplate(gemma, GEMMA_TEMPLATE)
    assert t.end_of_turn == "<end_of_turn>"
    assert [t.end_of_turn_token] == gemma.tokenize("<end_of_turn>", add_special=False)


# -- generation --------------------------------------------------------------------------
def test_chat_parallel_answers_hold_no_markup(smol):
    convs = [
        user("Say hi."),
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
        user("Hello!") + [{"role": "assistant", "content": "Hi! How can I help?"},
                          {"role": "user", "content": "What is 2 + 2?"}],
    ]
    r = pg.chat_parallel(smol, convs, max_tokens=40, temperature=0)
    assert isinstance(r, pg.BatchResult) and [c.index for c in r] == [0, 1, 2]
    assert [c.prompt for c in r] == [pg.apply_chat_template(smol, c) for c in convs]
    for c in r:
        assert c.finish_reason in ("stop", "length") and c.error is None and c.text.strip()
        assert not any(m in c.text for m in MARKUP), c.text
        if c.finish_reason == "stop":  # the end of turn, reported by id
            assert c.stop_reason == im_end(smol)
        else:  # max_tokens: no stop reason
            assert c.stop_reason is None and len(c.token_ids) == 40
    assert any(c.finish_reason == "stop" for c in r)
    # The same machinery as generate_parallel on the formatted prompts.
    plain = pg.generate_parallel(smol, [c.prompt for c in r], max_tokens=40, temperature=0)
    assert [c.token_ids for c in plain] == [c.token_ids for c in r]


def test_end_of_turn_stops_even_with_ignore_eos(smol):
    chat = pg.chat_parallel(smol, [user("Say hi.")], max_tokens=48, temperature=0, ignore_eos=True)[0]
    assert chat.finish_reason == "stop" and chat.stop_reason == im_end(smol)
    # Without the template's stop the model runs on past its end of turn.
    raw = pg.generate_parallel(smol, chat.prompt, max_tokens=48, temperature=0, ignore_eos=True)[0]
    assert raw.finish_reason == "length" and len(raw.token_ids) == 48
    assert raw.token_ids[: len(chat.token_ids)] == chat.token_ids


def test_chat_parallel_opening_a_path_sizes_n_ctx_to_the_conversations(smollm2_path, caplog):
    with caplog.at_level("INFO", logger="parallel_gen"):
        r = pg.chat_parallel(str(smollm2_path), [user("Hi"), user("word " * 300)], max_tokens=2, temperature=0)
    # ~330 template + message tokens + 2, rounded up to 512; not the 4096 default
    assert "n_ctx 512 sized to the work" in caplog.text, caplog.text
    assert all(c.error is None and c.token_ids for c in r), r


def test_base_model_without_template_is_a_clear_error(gemma, gemma3_path):
    assert gemma.chat_template() is None
    for model in (gemma, gemma3_path):
        with pytest.raises(ValueError, match="no chat template") as e:
            pg.chat_parallel(model, [user("Hi")], max_tokens=4)
        assert "chat_template=" in str(e.value) and "chatml" in str(e.value)
    with pytest.raises(ValueError, match="no chat template"):
        pg.apply_chat_template(gemma, user("Hi"))


def test_given_template_on_base_model(gemma):
    convs = [user("What is the capital of France?"), user("Write one word.")]
    r = pg.chat_parallel(gemma, convs, chat_template=GEMMA_TEMPLATE, max_tokens=12, temperature=0)
    bos = gemma.tokenize("", add_special=True)
    end_of_turn = ChatTemplate(gemma, GEMMA_TEMPLATE).end_of_turn_token
    for c, conv in zip(r, convs):
        # {{ bos_token }} is dropped from the text since the model adds BOS itself: one BOS.
        assert c.prompt == pg.apply_chat_template(gemma, conv, chat_template="gemma")
        assert c.prompt_tokens == len(gemma.tokenize(c.prompt))
        assert gemma.tokenize(c.prompt)[:2] != bos * 2
        assert c.finish_reason in ("stop", "length") and not any(m in c.text for m in MARKUP)
        if c.finish_reason == "stop":
            assert gemma.handle.is_eog(c.stop_reason) or c.stop_reason == end_of_turn
        else:
            assert c.stop_reason is None and len(c.token_ids) == 12
    # A base model rarely ends its turn by itself: force the end-of-turn token to see that
    # the template's stop ends the output and is reported by id.
    forced = pg.chat_parallel(gemma, convs[:1], chat_template=GEMMA_TEMPLATE, max_tokens=12, temperature=0,
                              logit_bias={end_of_turn: 100.0})[0]
    assert (forced.finish_reason, forced.stop_reason, forced.token_ids) == ("stop", end_of_turn, [end_of_turn])


# -- failures ----------------------------------------------------------------------------
BAD_CONVERSATIONS = [
    ("hello", TypeError, "sequence of conversations"),
    (user("Hi"), TypeError, "wrap it in a list"),
    ([user("Hi"), "Hi"], TypeError, r"conversations\[1\] must be a list"),
    ([user("Hi"), []], ValueError, r"conversations\[1\] is empty"),
    ([[{"role": "user"}]], ValueError, r"conversations\[0\]\[0\] has no 'content'"),
    ([[{"role": "user", "content": 3}]], TypeError, r"conversations\[0\]\[0\]\['content'\] must be a str"),
    ([[{"role": "", "content": "x"}]], ValueError, r"conversations\[0\]\[0\]\['role'\] is empty"),
    ([user("Hi"), [("user", "Hi")]], TypeError, r"conversations\[1\]\[0\] must be a dict"),
    (5, TypeError, "sequence of conversations"),
]


@pytest.mark.parametrize("convs, exc, match", BAD_CONVERSATIONS)
def test_malformed_conversations_fail_before_any_work(convs, exc, match, tmp_path):
    # The model path does not exist: the argument error must come first.
    with pytest.raises(exc, match=match):
        pg.chat_parallel(str(tmp_path / "absent.gguf"), convs)


def test_bad_params_and_progress_fail_before_any_work(tmp_path):
    absent = str(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="temperature"):
        pg.chat_parallel(absent, [user("Hi")], temperature=-1)
    with pytest.raises(TypeError, match="unknown sampling option"):
        pg.chat_parallel(absent, [user("Hi")], temprature=0)
    with pytest.raises(TypeError, match="progress must be"):
        pg.chat_parallel(absent, [user("Hi")], progress="yes")
    with pytest.raises(FileNotFoundError):
        pg.chat_parallel(absent, [user("Hi")])


def test_bad_templates(smol):
    with pytest.raises(TypeError, match="chat_template must be a str"):
        pg.chat_parallel(smol, [user("Hi")], chat_template=5)
    with pytest.raises(ValueError, match="built-in") as e:
        pg.chat_parallel(smol, [user("Hi")], chat_template="chatmll")
    assert "chatml" in str(e.value) and "chatml" in builtin_templates()
    with pytest.raises(ValueError, match="not valid Jinja"):
        pg.chat_parallel(smol, [user("Hi")], chat_template="{% if %}")
    with pytest.raises(ValueError, match="empty"):
        pg.chat_parallel(smol, [user("Hi")], chat_template="  ")
    # The template's own raise_exception: the error names the conversation.
    convs = [user("Hi"), [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]]
    with pytest.raises(ValueError, match=r"conversations\[1\].*system messages are not supported"):
        pg.chat_parallel(smol, convs, chat_template=NO_SYSTEM_TEMPLATE, max_tokens=2)
    # The Model is still usable after those errors.
    r = pg.chat_parallel(smol, [user("Hi")], chat_template=NO_SYSTEM_TEMPLATE, max_tokens=2, temperature=0)
    assert r[0].prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# -- progress bar ------------------------------------------------------------------------
def test_progress_bar_writes_to_stderr_only(smol, capfd):
    r = pg.chat_parallel(smol, [user("Hi"), user("Bye")], max_tokens=4, temperature=0, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "2/2" in err and "prompt" in err and "tok/s" in err
    assert len(r) == 2


def test_progress_default_follows_the_terminal(smol, capfd, monkeypatch):
    pg.chat_parallel(smol, [user("Hi")], max_tokens=2, temperature=0)  # progress=None, stderr captured
    assert capfd.readouterr() == ("", "")
    monkeypatch.setattr(progress_mod, "_stderr_is_terminal", lambda: True)
    pg.chat_parallel(smol, [user("Hi")], max_tokens=2, temperature=0)
    out, err = capfd.readouterr()
    assert out == "" and "1/1" in err
    pg.chat_parallel(smol, [user("Hi")], max_tokens=2, temperature=0, progress=False)
    assert capfd.readouterr() == ("", "")


def test_progress_bar_closed_on_error(capfd):
    from tqdm import tqdm

    with pytest.raises(KeyboardInterrupt):
        with make_progress(True, 3) as on_step:
            on_step(1, 3, 7)
            raise KeyboardInterrupt
    out, err = capfd.readouterr()
    assert out == "" and "1/3" in err
    assert not list(getattr(tqdm, "_instances", []))


def test_progress_without_tqdm(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    with pytest.raises(ImportError, match="pip install tqdm"):
        make_progress(True, 1)
    with pytest.raises(ImportError, match="tqdm"):  # before the (absent) model is opened
        pg.chat_parallel(str(tmp_path / "absent.gguf"), [user("Hi")], progress=True)
    monkeypatch.setattr(progress_mod, "_stderr_is_terminal", lambda: True)
    with make_progress(None, 1) as on_step:  # asked for by default only: quietly no bar
        assert on_step is None
