"""Tool calls in-process: chat_parallel(tools=...), the template families' formats, the file
job's tool_calls column (the lazy grammars under "auto": test_constraints.py).

SmolLM2 is not tool-trained: "required" and a named tool are deterministic through the
grammar; "auto" is tested on a few-shot history under the Hermes-style template in
tests/templates/hermes_tools.jinja (written for these tests), greedy.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import parallel_gen as pg
from parallel_gen.chat import checked_conversation
from parallel_gen.jobs import run_file_job
from parallel_gen.templates import ChatTemplate
from parallel_gen.tools import FORMATS, GENERIC, ToolPlan, format_for, format_named, tool_request

HERMES = (Path(__file__).parent / "templates" / "hermes_tools.jinja").read_text()


def tool(name, description, properties, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


WEATHER = tool("get_weather", "Current weather in a city.",
               {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
TIME = tool("get_time", "Current time in a timezone.", {"timezone": {"type": "string"}}, ["timezone"])
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def user(text):
    return [{"role": "user", "content": text}]


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# Two weather questions answered by a tool call, a tool result and an answer: a few-shot
# history that makes SmolLM2 start a call of its own under the Hermes-style template.
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in London?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "London"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 14, "sky": "rain"}'},
    {"role": "assistant", "content": "It is 14 degrees and raining in London."},
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_2", "get_weather", {"city": "Berlin"})]},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 9, "sky": "cloudy"}'},
    {"role": "assistant", "content": "It is 9 degrees and cloudy in Berlin."},
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=1024, n_threads=1) as m:
        yield m


def check_calls(output, names=None):
    """Every call names a tool, has a unique id and arguments valid for its schema."""
    assert output.finish_reason == "tool_calls" and output.error is None, output
    assert output.tool_calls, output
    for c in output.tool_calls:
        assert isinstance(c, pg.ToolCall) and c.name in (names or SCHEMAS)
        assert isinstance(c.arguments, str)
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        assert c.parsed_arguments == json.loads(c.arguments)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name,
                                                                              "arguments": c.arguments}}


# -- rendering ---------------------------------------------------------------------------
def test_tools_reach_the_prompt_through_the_template(smol):
    conv = user("What is the weather in Paris?")
    with_tools = pg.apply_chat_template(smol, conv, tools=TOOLS, chat_template=HERMES)
    assert "<tools>" in with_tools and json.dumps(WEATHER) in with_tools and json.dumps(TIME) in with_tools
    assert with_tools.endswith("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    # Without tools, or with tool_choice "none", the template renders no tools block.
    plain = pg.apply_chat_template(smol, conv, chat_template=HERMES)
    assert plain == "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert pg.apply_chat_template(smol, conv, tools=TOOLS, tool_choice="none", chat_template=HERMES) == plain
    # SmolLM2's own template has no tool support: the generic system block lists them.
    generic = pg.apply_chat_template(smol, conv, tools=TOOLS)
    assert ChatTemplate(smol).tool_format is GENERIC
    assert generic.startswith("<|im_start|>system\nYou can call the following tools")
    assert '"name": "get_weather"' in generic and '{"tool_calls": [' in generic and '{"response":' in generic
    system = [{"role": "system", "content": "Be brief."}] + conv
    assert pg.apply_chat_template(smol, system, tools=TOOLS).startswith("<|im_start|>system\nBe brief.\n\nYou can")


def test_renderer_matches_llama_cpp_python_without_tools(smol):
    """Conversations without tools render byte for byte as llama-cpp-python's (and
    transformers') Jinja renderer does: the template changes nothing for them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from test_chat import GEMMA_TEMPLATE, NO_SYSTEM_TEMPLATE

    convs = [user("Hi"), [{"role": "system", "content": "S"}, {"role": "user", "content": "Ünïcode ✓"},
                          {"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]]
    for source in (smol.chat_template(), HERMES, GEMMA_TEMPLATE):
        t = ChatTemplate(smol, source)
        for conv in convs:
            for gen in (True, False):
                theirs = Jinja2ChatFormatter(source, eos_token=t._eos, bos_token=t._bos,
                                             add_generation_prompt=gen)(messages=conv).prompt
                assert t.render(checked_conversation("c", conv), gen) == theirs
    assert ChatTemplate(smol, NO_SYSTEM_TEMPLATE).render(user("Hi")) == \
        Jinja2ChatFormatter(NO_SYSTEM_TEMPLATE, eos_token="", bos_token="")(messages=user("Hi")).prompt


def test_a_history_with_a_tool_call_and_its_result_is_rendered(smol):
    conv = FEW_SHOT[:3] + [{"role": "assistant", "content": "Rainy."}, {"role": "user", "content": "And Paris?"}]
    prompt = pg.apply_chat_template(smol, conv, tools=TOOLS, chat_template=HERMES)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>tool\n{"temperature": 14, "sky": "rain"}<|im_end|>\n') in prompt
    # A template that knows no tool calls (SmolLM2's own) gets them as JSON content.
    own = pg.apply_chat_template(smol, conv)
    assert ('<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "London"}}]}'
            '<|im_end|>\n<|im_start|>tool\n{"temperature": 14, "sky": "rain"}<|im_end|>') in own
    # One that refuses the tool role too: the result becomes a user message.
    strict = ("{% for m in messages %}{% if m.role not in ('user', 'assistant') %}{{ raise_exception('bad role') }}"
              "{% endif %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}")
    t = ChatTemplate(smol, strict)
    assert (t.caps.tools, t.caps.tool_calls, t.caps.tool_role, t.caps.system_role) == (False, False, False, False)
    text = pg.apply_chat_template(smol, conv, chat_template=strict)
    assert ('<user>{"tool_response": {"name": "get_weather", "tool_call_id": "call_1", '
            '"content": "{\\"temperature\\": 14, \\"sky\\": \\"rain\\"}"}}</user>') in text
    # ...and the generic tools block goes into the first user message.
    assert pg.apply_chat_template(smol, user("Hi"), tools=TOOLS, chat_template=strict).startswith(
        "<user>You can call the following tools")
    # A tool message without a name gets the name of the call it answers.
    checked = checked_conversation("c", conv)
    assert checked[2]["name"] == "get_weather" and checked[1]["content"] is None


# -- chat_parallel -----------------------------------------------------------------------
def test_required_gives_a_valid_call_for_every_conversation(smol):
    convs = [user("What is the weather in Paris?"), user("What time is it in Tokyo?"), user("Hello, how are you?")]
    r = pg.chat_parallel(smol, convs, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                         chat_template=HERMES, temperature=0, max_tokens=80)
    ids = []
    for c in r:
        check_calls(c.outputs[0])
        assert len(c.tool_calls) == 1 and c.outputs[0].content == ""
        assert c.text.startswith("<tool_call>") and c.text.rstrip().endswith("</tool_call>")
        ids += [x.id for x in c.tool_calls]
    assert len(set(ids)) == len(ids)
    assert r[0].tool_calls[0].name == "get_weather" and r[0].tool_calls[0].parsed_arguments["city"] == "Paris"
    assert r[1].tool_calls[0].name == "get_time"
    assert r.stats.prompts == 3 and r.stats.failed == 0


def test_named_tool_is_the_one_called(smol):
    convs = [user("What is the weather in Paris?"), user("Tell me about Rome.")]
    choice = {"type": "function", "function": {"name": "get_time"}}
    for template in (HERMES, None):  # the family's format and the generic one
        r = pg.chat_parallel(smol, convs, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                             chat_template=template, temperature=0, max_tokens=80)
        for c in r:
            check_calls(c.outputs[0], names=["get_time"])
            assert [x.name for x in c.tool_calls] == ["get_time"]


def test_parallel_calls(smol):
    conv = user("What is the weather in Paris and what time is it in Tokyo?")
    several = pg.chat_parallel(smol, [conv], tools=TOOLS, tool_choice="required", chat_template=HERMES,
                               temperature=0, max_tokens=160)[0]
    check_calls(several.outputs[0])
    assert len(several.tool_calls) >= 2 and {x.name for x in several.tool_calls} == {"get_weather", "get_time"}
    assert len({x.id for x in several.tool_calls}) == len(several.tool_calls)
    one = pg.chat_parallel(smol, [conv], tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                           chat_template=HERMES, temperature=0, max_tokens=160)[0]
    check_calls(one.outputs[0])
    assert len(one.tool_calls) == 1 and one.text.count("<tool_call>") == 1


def test_auto_constrains_only_once_a_call_starts(smol):
    # unit is required and can only be "kelvin": nothing the history shows, so a call
    # that has it was written under the grammar, from its <tool_call> on.
    kelvin = tool("get_weather", "Current weather in a city.",
                  {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["kelvin"]}}, ["city", "unit"])
    convs = [FEW_SHOT + user(q) for q in ("What is the weather in Paris?", "What is the weather in Rome?")]
    r = pg.chat_parallel(smol, convs, tools=[kelvin], chat_template=HERMES, temperature=0, max_tokens=60)
    for c, city in zip(r, ("Paris", "Rome")):
        assert c.finish_reason == "tool_calls", c.text
        assert [(x.name, x.parsed_arguments) for x in c.tool_calls] == [("get_weather", {"city": city,
                                                                                           "unit": "kelvin"})]
    # A reply that starts no call is free text: the same as without any grammar.
    joke = FEW_SHOT + user("Thanks! Tell me a joke.")
    auto = pg.chat_parallel(smol, [joke], tools=[kelvin], chat_template=HERMES, temperature=0, max_tokens=60)[0]
    free = pg.generate_parallel(smol, [auto.prompt], temperature=0, max_tokens=60,
                                stop_token_ids=[ChatTemplate(smol, HERMES).end_of_turn_token])[0]
    assert auto.finish_reason in ("stop", "length") and auto.tool_calls == []
    assert auto.text == free.text and auto.outputs[0].content == auto.text.strip()


def test_none_offers_no_tools_and_constrains_nothing(smol):
    conv = user("What is the weather in Paris?")
    r = pg.chat_parallel(smol, [conv], tools=TOOLS, tool_choice="none", chat_template=HERMES, temperature=0,
                         max_tokens=30)[0]
    plain = pg.chat_parallel(smol, [conv], chat_template=HERMES, temperature=0, max_tokens=30)[0]
    assert r.prompt == plain.prompt and r.text == plain.text and r.finish_reason == plain.finish_reason
    assert r.tool_calls == [] and r.outputs[0].content == r.text
    assert plain.tool_calls is None and plain.outputs[0].content is None  # no tools: nothing read


def test_generic_format_on_a_template_without_tools(smol):
    convs = [user("What is the weather in Paris?"), user("Hello!")]
    r = pg.chat_parallel(smol, convs, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                         temperature=0, max_tokens=80)
    for c in r:
        check_calls(c.outputs[0])
        assert json.loads(c.text)["tool_calls"][0]["name"] == c.tool_calls[0].name
    # "auto": a JSON reply either way; an answer is read into content.
    auto = pg.chat_parallel(smol, [user("Say hello.")], tools=TOOLS, temperature=0, max_tokens=80)[0]
    assert auto.finish_reason == "stop" and auto.tool_calls == []
    assert json.loads(auto.text) == {"response": auto.outputs[0].content}


def test_a_reply_cut_short_is_no_error(smol):
    r = pg.chat_parallel(smol, [user("What is the weather in Paris?")], tools=TOOLS, tool_choice="required",
                         chat_template=HERMES, temperature=0, max_tokens=6)[0]
    assert r.finish_reason == "length" and r.error is None and r.tool_calls == []
    assert r.text.startswith("<tool_call>") and r.outputs[0].content == r.text
    # Cut after a whole call: that call is kept, and "length" says the reply was cut.
    long = pg.chat_parallel(smol, [user("What time is it in Tokyo?")], tools=TOOLS, tool_choice="required",
                            chat_template=HERMES, temperature=0, max_tokens=200)[0]
    first_end = long.text.index("</tool_call>") + len("</tool_call>")
    n = len(smol.tokenize(long.text[:first_end], add_special=False)) + 2
    cut = pg.chat_parallel(smol, [user("What time is it in Tokyo?")], tools=TOOLS, tool_choice="required",
                           chat_template=HERMES, temperature=0, max_tokens=n)[0]
    assert cut.finish_reason == "length" and len(cut.tool_calls) == 1 and cut.outputs[0].content == ""
    check_calls(pg.Output("", [], "tool_calls", tool_calls=cut.tool_calls))


def test_samples_each_get_their_calls_and_results_survive_to_dict(smol):
    r = pg.chat_parallel(smol, [user("What is the weather in Oslo?")], tools=TOOLS, tool_choice="required",
                         parallel_tool_calls=False, chat_template=HERMES, n=2, temperature=0.9, seed=3,
                         max_tokens=80)[0]
    assert len(r.outputs) == 2
    for o in r.outputs:
        check_calls(o)
    assert r.outputs[0].tool_calls[0].id != r.outputs[1].tool_calls[0].id
    assert pg.Completion.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# -- formats -----------------------------------------------------------------------------
def family_template(markers):
    """A ChatML template with tool support whose text holds a family's markers."""
    return ("{# " + " ".join(markers) + " #}{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_every_family_writes_and_reads_a_call(smol):
    """Per family: detected from its template, the grammar makes SmolLM2 write a call in
    the family's format, and the family's parser reads it back (one batch, each prompt
    with its own grammar)."""
    city = tool("get_weather", "Current weather in a city.",
                {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
    plans, prompts, params = [], [], []
    for fmt in FORMATS:
        template = ChatTemplate(smol, family_template(fmt.markers))
        assert template.tool_format is fmt
        plan = ToolPlan(template, tool_request([city, TIME], "required", False))
        plans.append(plan)
        prompts.append(plan.render(user("What is the weather in Paris?")))
        params.append(plan.params(template.add_stops(pg.SamplingParams(temperature=0, max_tokens=160, seed=1))))
    r = pg.generate_parallel(smol, prompts, params)
    for plan, c in zip(plans, r):
        out = plan.read(smol, c.outputs[0])
        assert out.finish_reason == "tool_calls", (plan.format.name, c.text)
        assert [(x.name, x.parsed_arguments["city"]) for x in out.tool_calls] == [("get_weather", "Paris")], \
            plan.format.name


# Text as each family's models write it (or its templates render it), with the calls in it.
SAMPLES = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}\n</tool_call>',
               "Let me check."),
    "qwen3_coder": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
                    "</tool_call>\n<tool_call>\n<function=get_time>\n<parameter=timezone>\nAsia/Tokyo\n</parameter>\n"
                    "</function>\n</tool_call>", ""),
    "seed_oss": ("<seed:tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
                 "</seed:tool_call><seed:tool_call>\n<function=get_time>\n<parameter=timezone>\nAsia/Tokyo\n"
                 "</parameter>\n</function>\n</seed:tool_call>", ""),
    "apriel": ('<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
               '"arguments": {"timezone": "Asia/Tokyo"}}]</tool_calls>', ""),
    "mistral": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]abc123def'
                '[ARGS]{"timezone": "Asia/Tokyo"}', ""),
    "mistral_nemo": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, '
                     '{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}, "id": "bcd234efg"}]', ""),
    "deepseek_r1": ("I need the weather.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                    'get_time\n```json\n{"timezone": "Asia/Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                    "I need the weather."),
    "deepseek_v3_1": ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
                      '<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"timezone": "Asia/Tokyo"}'
                      "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", ""),
    "command_r7b": ('<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": '
                    '{"city": "Paris"}},\n    {"tool_call_id": "1", "tool_name": "get_time", "parameters": '
                    '{"timezone": "Asia/Tokyo"}}\n]<|END_ACTION|>', ""),
    "nemotron_v2": ('<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                    '"arguments": {"timezone": "Asia/Tokyo"}}]</TOOLCALL>', ""),
    "granite": ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {"timezone": "Asia/Tokyo"}}]', ""),
    "firefunction_v2": (' functools[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                        '"arguments": {"timezone": "Asia/Tokyo"}}]', ""),
    "functionary_v3_1": ('<function=get_weather>{"city": "Paris"}</function><function=get_time>'
                         '{"timezone": "Asia/Tokyo"}</function>', ""),
    "generic": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {"timezone": "Asia/Tokyo"}}]}', ""),
}
BOTH = [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Asia/Tokyo"})]


def test_samples_cover_every_family():
    assert set(SAMPLES) | {"llama3"} == {f.name for f in FORMATS} | {"generic"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_family_parser_reads_its_format(name):
    fmt = format_named(name)
    text, content = SAMPLES[name]
    reply = fmt.parse(text)
    assert reply.started and reply.complete and reply.content == content
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == BOTH
    # Cut anywhere inside the last call: the calls before it are read, and it is not.
    cut = fmt.parse(text[: text.rindex("Tokyo")])
    assert not cut.complete and [c.name for c in cut.calls] in ([], ["get_weather"]), cut
    # Plain text is content and no call.
    plain = fmt.parse("Paris is sunny today.")
    assert plain == type(plain)("Paris is sunny today.", [], False, True)


def test_llama3_parser_reads_its_format():
    fmt = format_named("llama3")
    for text in ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 ' {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Paris"}}}'):
        reply = fmt.parse(text)
        assert reply.complete and [(c.name, json.loads(c.arguments)) for c in reply.calls] == BOTH[:1], text
    assert fmt.parse('{"name": "get_weather", "parameters": {"ci').calls == []
    assert fmt.parse("The weather is {unknown}.").calls == []


def test_family_detection():
    assert format_for(None) is GENERIC and format_for("{{ messages }}") is GENERIC
    assert format_for(HERMES).name == "hermes"
    assert format_for("<tool_call>{{ x }}<function=f><parameter=p>").name == "qwen3_coder"
    assert format_for("<tool_call>{{ x }}<arg_key>").name == "generic"  # GLM: not Hermes
    assert format_for("[TOOL_CALLS]{{ x }}").name == "mistral_nemo"
    assert format_for("[TOOL_CALLS]{{ x }}[ARGS]").name == "mistral"
    assert format_for("<|start_header_id|>{{ x }} parameters").name == "llama3"
    assert format_for("<|start_header_id|>{{ x }} parameters >>>all").name == "generic"  # Functionary v3.2
    with pytest.raises(ValueError, match="unknown tool-call format 'nope'"):
        format_named("nope")


# -- errors ----------------------------------------------------------------------------------
BAD_TOOLS = [
    (dict(tools=WEATHER), TypeError, "tools must be a list"),
    (dict(tools=[]), ValueError, "tools is empty"),
    (dict(tools=["get_weather"]), TypeError, r"tools\[0\] must be a dict"),
    (dict(tools=[{"type": "retrieval"}]), ValueError, r"tools\[0\]\['type'\] must be 'function'"),
    (dict(tools=[{"type": "function"}]), ValueError, r"tools\[0\]\['function'\] must be a dict"),
    (dict(tools=[tool("get weather", "", {}, [])]), ValueError, r"tools\[0\]\['function'\]\['name'\]"),
    (dict(tools=[WEATHER, WEATHER]), ValueError, r"tools\[1\]\['function'\]\['name'\]: 'get_weather' is also"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), ValueError,
     r"tools\[0\]\['function'\]\['parameters'\] must describe an object"),
    (dict(tools=[tool("f", "", {"x": {"$ref": "https://example.com/schema.json"}}, ["x"])]), ValueError,
     r"tools\[0\]\['function'\]\['parameters'\]: cannot convert the schema"),
    (dict(tools=[tool("f", "", {"x": {"$ref": "#/$defs/missing"}}, ["x"])]), ValueError,
     r"tools\[0\]\['function'\]\['parameters'\]: cannot convert the schema"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_news"}}), ValueError,
     r"tool_choice\['function'\]\['name'\]: 'get_news' is not one of the tools \(get_weather, get_time\)"),
    (dict(tools=TOOLS, tool_choice="always"), ValueError, "tool_choice must be 'none', 'auto', 'required'"),
    (dict(tools=TOOLS, tool_choice=3), TypeError, "tool_choice must be a str or a dict"),
    (dict(tool_choice="required"), ValueError, "tool_choice='required' needs tools"),
    (dict(tools=TOOLS, parallel_tool_calls="yes"), TypeError, "parallel_tool_calls must be a bool"),
    (dict(tools=TOOLS, json_schema={"type": "object"}), ValueError, "tools cannot be combined with grammar"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_TOOLS)
def test_bad_tools_fail_before_any_work(kwargs, exc, match, tmp_path, smol):
    absent = str(tmp_path / "absent.gguf")
    if "json_schema" in kwargs:  # needs the template to know the format: a loaded model
        with pytest.raises(exc, match=match):
            pg.chat_parallel(smol, [user("Hi")], **kwargs)
        return
    with pytest.raises(exc, match=match):
        pg.chat_parallel(absent, [user("Hi")], **kwargs)


BAD_HISTORIES = [
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{"}}]},
     ValueError, r"conversations\[0\]\[1\]\['tool_calls'\]\[0\]\['function'\]\['arguments'\] is not valid JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     ValueError, r"\['arguments'\] must be a JSON object"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
     TypeError, r"\['arguments'\] must be JSON text"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     ValueError, r"\['tool_calls'\]\[0\]\['function'\]\['name'\] must be a non-empty str"),
    ({"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
     ValueError, r"\['tool_calls'\]\[0\] must be a dict"),
    ({"role": "assistant", "content": None, "tool_calls": "f()"}, TypeError, r"\['tool_calls'\] must be a list"),
    ({"role": "user", "content": "x", "tool_calls": [call("c", "f", {})]}, ValueError,
     "only an assistant message has tool calls"),
    ({"role": "assistant", "content": None}, TypeError, r"conversations\[0\]\[1\]\['content'\] must be a str"),
    ({"role": "tool", "content": "r", "tool_call_id": 7}, TypeError, r"\['tool_call_id'\] must be a str"),
]


@pytest.mark.parametrize("message, exc, match", BAD_HISTORIES)
def test_malformed_tool_histories_fail_before_any_work(message, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        pg.chat_parallel(str(tmp_path / "absent.gguf"), [user("Hi") + [message]])


# -- the file job ----------------------------------------------------------------------------
def test_file_job_writes_tool_calls_on_every_row(smol, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "What is the weather in Paris?"}, {"messages": [{"role": "user"}]},
            {"messages": FEW_SHOT + user("What is the weather in Rome?")}, {"prompt": "Time in Tokyo?",
                                                                             "tool_calls": "mine"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"out.{fmt}"
        summary = run_file_job(smol, src, out, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                               chat_template=HERMES, temperature=0, max_tokens=80)
        assert (summary.rows, summary.failed) == (4, 1)
        if fmt == "jsonl":
            recs = [json.loads(line) for line in out.read_text().splitlines()]
        else:
            import csv

            recs = list(csv.DictReader(out.open()))
            for r in recs:
                r["tool_calls"] = json.loads(r["tool_calls"])
        assert all(list(r)[-2:] == ["content", "tool_calls"] for r in recs), recs
        for i in (0, 2, 3):
            assert recs[i]["finish_reason"] == "tool_calls" and len(recs[i]["tool_calls"]) == 1
            c = recs[i]["tool_calls"][0]
            assert c["type"] == "function" and c["id"].startswith("call_")
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        assert recs[1]["finish_reason"] == "error" and recs[1]["tool_calls"] == []
        assert "messages[0] has no 'content'" in recs[1]["error"]
        if fmt == "jsonl":  # (CSV keeps the first row's columns)
            assert recs[3]["input_tool_calls"] == "mine"  # an input field named like an output column
        # The calls go straight back into a conversation for the next turn.
        checked_conversation("next", user("q") + [{"role": "assistant", "content": None,
                                                   "tool_calls": recs[0]["tool_calls"]}])


def test_cli_tools_options(tmp_path, smollm2_path):
    import subprocess
    import sys

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    out = tmp_path / "out.jsonl"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "parallel_gen", "generate", "--model", str(smollm2_path),
                               "--threads", "1", *args], capture_output=True, text=True, timeout=300)

    ok = cli("What is the weather in Paris?", "--tools", str(tools_file), "--tool-choice", "get_time",
             "--no-parallel-tool-calls", "--temperature", "0", "-n", "80", "-o", str(out))
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(out.read_text())
    assert rec["finish_reason"] == "tool_calls" and rec["tool_calls"][0]["function"]["name"] == "get_time"
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    for args, message in ((["--tools", str(bad)], "not valid JSON"),
                          (["--tools", str(tools_file), "--tool-choice", "get_news"], "'get_news' is not one"),
                          (["--tool-choice", "required"], "need --tools FILE")):
        r = cli("Hi", *args, "-o", str(tmp_path / "x.jsonl"))
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_a_stream_holds_back_only_what_may_start_a_call(smol):
    """ToolPlan.streamable: how much of a reply so far a stream may send as content."""
    hermes = ChatTemplate(smol, HERMES)
    auto = ToolPlan(hermes, tool_request(TOOLS))
    for text, sent in (("Sure. ", 6), ("Sure. <tool", 6), ("Sure. <tool_call>\n{\"na", 6), ("<", 0),
                       ("a < b", 5), ("a <tool_cal", 2), ("", 0)):
        assert auto.streamable(text) == sent, text
    assert ToolPlan(hermes, None).streamable("<tool_call>") == len("<tool_call>")  # no tools: all of it
    assert ToolPlan(hermes, tool_request(TOOLS, "none")).streamable("<tool") == 5
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        assert ToolPlan(hermes, tool_request(TOOLS, choice)).streamable("Sure.") == 0  # the reply is calls
    assert ToolPlan(ChatTemplate(smol), tool_request(TOOLS)).streamable("Sure.") == 0  # generic: all JSON
