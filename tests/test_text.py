"""Text assembly: UTF-8 split across tokens, stop strings across token boundaries."""

from __future__ import annotations

import pytest

import parallel_gen as pg
from parallel_gen._native import _core


def feed(stops, pieces):
    t = _core.TextAssembler(stops)
    hit = False
    for p in pieces:
        hit = t.append(p)
    return t, hit


def test_utf8_split_across_pieces_comes_out_whole():
    data = "naïve 🍕 日本".encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # worst case: one byte per token
    t, _ = feed([], pieces)
    assert t.final_bytes().decode() == "naïve 🍕 日本"
    # Cut inside the 4-byte emoji: the unfinished character is dropped, not mangled.
    cut = "naïve 🍕".encode()[:-2]
    t, _ = feed([], [cut])
    assert t.final_bytes().decode() == "naïve "
    assert t.stable_len == len("naïve ".encode())


def test_stop_string_across_pieces_and_earliest_wins():
    t, hit = feed(["END", "ND!"], [b"abc E", b"N", b"D! more"])
    assert hit and t.matched_stop == 0 and t.final_bytes() == b"abc "
    t, hit = feed(["\n\n"], [b"one\n", b"\ntwo"])
    assert hit and t.final_bytes() == b"one"
    t, hit = feed(["xyz"], [b"no match here"])
    assert not hit and t.matched_stop == -1


def test_stable_len_holds_back_possible_stop_prefix():
    t, _ = feed(["STOP"], [b"hello ST"])
    assert t.stable_len == len(b"hello ")
    t.append(b"ART")
    assert t.stable_len == len(b"hello START")


def test_multibyte_stop_string():
    t, hit = feed(["日本"], ["東京は日".encode(), "本の首都".encode()])
    assert hit and t.final_bytes().decode() == "東京は"


def test_byte_tokens_of_real_model_round_trip(smol):
    # SmolLM2's byte-level BPE splits rare characters into byte tokens that are not
    # valid UTF-8 alone; assembling their pieces must give the text back.
    text = "emoji 🦙🍕 and 漢字 and ñ"
    ids = smol.tokenize(text, add_special=False)
    pieces = [smol.handle.detokenize([i], False) for i in ids]
    assert any(_not_utf8(p) for p in pieces), "expected at least one partial-character token"
    t, _ = feed([], pieces)
    assert t.final_bytes().decode() == text


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return False
    except UnicodeDecodeError:
        return True


def test_generation_cut_inside_a_character(smol):
    """A prompt ending in a multi-byte emoji whose continuation splits emojis across
    tokens; max_tokens falls inside a character: the text holds only whole characters
    and never U+FFFD."""
    prompt = "Emoji list: 🍎 apple, 🍌 banana, 🍇"
    full = pg.generate_parallel(smol, prompt, max_tokens=40, temperature=0, ignore_eos=True)[0]
    assert "\ufffd" not in full.text
    pieces = [smol.handle.detokenize([t], False) for t in full.token_ids]
    cuts = [k for k in range(1, len(pieces) + 1) if _not_utf8(b"".join(pieces[:k]))]
    assert cuts, f"no token boundary inside a character in {full.text!r}"
    k = cuts[0]
    r = pg.generate_parallel(smol, prompt, max_tokens=k, temperature=0, ignore_eos=True)[0]
    assert r.token_ids == full.token_ids[:k]
    raw = b"".join(pieces[:k])
    whole = raw.decode("utf-8", "ignore")
    assert r.text == whole and "\ufffd" not in r.text
    assert full.text.startswith(r.text)


def test_prompt_ending_with_multibyte_characters(smol):
    prompts = ["Ich liebe Käse und Brötchen. Das Wort für 'cheese' auf Japanisch ist チーズ", "🍕🍕🍕"]
    r = pg.generate_parallel(smol, prompts, max_tokens=16, temperature=0)
    for c in r:
        assert c.error is None and "\ufffd" not in c.text and c.token_ids
        assert c.prompt_tokens == len(smol.tokenize(c.prompt))  # the prompt's bytes reached the engine whole
        assert smol.detokenize(c.token_ids).startswith(c.text)
