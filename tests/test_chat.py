"""engine.serving.chat: HF-compatible chat-template rendering in a sandbox, and OpenAI message validation;
engine.model.tokenizer.ModelTokenizer.encode_chat: exactly one bos."""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import processors

from engine.errors import ChatTemplateError, InvalidRequestError
from engine.model.tokenizer import ModelTokenizer
from engine.model.vocab import BOS, CHAT_TEMPLATE, EOS, build_byte_tokenizer
from engine.serving.chat import render_chat, validate_messages

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


# --- render_chat ------------------------------------------------------------------------------------


def test_our_template_renders_llama3_markers():
    text = render_chat(CHAT_TEMPLATE, MESSAGES, bos_token=BOS, eos_token=EOS)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_our_template_without_generation_prompt():
    text = render_chat(CHAT_TEMPLATE, MESSAGES, add_generation_prompt=False, bos_token=BOS)
    assert text.endswith("Hi!<|eot_id|>")
    assert "assistant" not in text


def test_hf_environment_trims_blocks_and_supports_loop_controls():
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "[{{ m.role }}] {{ m.content }}\n"
        "{% endfor %}\n"
    )
    assert render_chat(template, MESSAGES) == "[user] Hi!\n"


def test_tojson_is_hf_compatible():
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"a": "<b>&"}}}]
    assert render_chat("{{ tools | tojson }}", MESSAGES, tools=tools) == json.dumps(tools, ensure_ascii=False)
    assert render_chat("{{ tools[0] | tojson(indent=2) }}", MESSAGES, tools=tools) == json.dumps(
        tools[0], ensure_ascii=False, indent=2
    )
    assert render_chat("{{ tools is none }}", MESSAGES) == "True"


def test_extra_variables_and_strftime_now():
    text = render_chat("{{ strftime_now('%Y') }} {{ enable_thinking }}", MESSAGES, enable_thinking=False)
    year, flag = text.split()
    assert year.isdigit() and len(year) == 4 and flag == "False"


def test_generation_tag_renders_its_body():
    template = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert render_chat(template, MESSAGES) == "<Be brief.><Hi!>"


def test_raise_exception_surfaces_its_message():
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="refused the messages: Conversation must start with user") as info:
        render_chat(template, MESSAGES)
    assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    ],
)
def test_sandbox_refuses_python_internals(template):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render_chat(template, MESSAGES)


def test_immutable_sandbox_refuses_mutation():
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render_chat("{% set _ = messages.append({'role': 'user'}) %}", MESSAGES)


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat("{{ messages[0]['content'] + 1 }}", MESSAGES)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat("", MESSAGES)


def test_compiled_templates_are_cached():
    from engine.serving.chat import _compile

    _compile.cache_clear()
    render_chat(CHAT_TEMPLATE, MESSAGES)
    render_chat(CHAT_TEMPLATE, MESSAGES, add_generation_prompt=False)
    assert _compile.cache_info().hits == 1 and _compile.cache_info().misses == 1


def test_validated_tool_conversation_renders():
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments | tojson }})]{% endfor %}"
        "{% if m.tool_call_id is defined %}#{{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    messages = validate_messages(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "12C"},
        ]
    )
    assert render_chat(template, messages) == 'user:weather?\nassistant:[get({"city": "Oslo"})]\ntool:12C#c1\n'


# --- validate_messages ------------------------------------------------------------------------------


def test_content_parts_are_joined():
    messages = validate_messages(
        [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    )
    assert messages == [{"role": "user", "content": "one\ntwo"}]


def test_validation_copies_and_keeps_extra_fields():
    original = [{"role": "user", "content": [{"type": "text", "text": "x"}], "name": "ann"}]
    assert validate_messages(original) == [{"role": "user", "content": "x", "name": "ann"}]
    assert original[0]["content"] == [{"type": "text", "text": "x"}]  # input untouched


def test_all_roles_accepted():
    messages = [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant")]
    messages.append({"role": "tool", "content": "x", "tool_call_id": "t"})
    assert [m["role"] for m in validate_messages(messages)] == ["system", "developer", "user", "assistant", "tool"]


@pytest.mark.parametrize(
    "messages,param,pattern",
    [
        ([], "messages", "non-empty list"),
        ("hello", "messages", "non-empty list"),
        (None, "messages", "non-empty list"),
        (["hi"], "messages[0]", r"messages\[0\] must be an object"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            "messages[1].role",
            r"messages\[1\]\.role is 'bot'; expected one of system, user, assistant, tool, developer",
        ),
        ([{"content": "b"}], "messages[0].role", "role is None"),
        ([{"role": "user"}], "messages[0].content", r"messages\[0\] \(user\) needs content"),
        ([{"role": "assistant", "content": None}], "messages[0].content", r"needs content \(or tool_calls\)"),
        ([{"role": "user", "content": 5}], "messages[0].content", "must be a string or a list of text parts"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ],
            "messages[0].content[1]",
            r"messages\[0\]\.content\[1\] is an image_url part: images are not supported",
        ),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0]", "audio are not supported"),
        ([{"role": "user", "content": [{"type": "bogus"}]}], "messages[0].content[0]", "got type 'bogus'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "text must be a string"),
        ([{"role": "tool", "content": "12C"}], "messages[0].tool_call_id", "tool_call_id must be the id"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls", "only allowed on assistant"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"arguments": "{}"}}]}],
            "messages[0].tool_calls[0]",
            "must be",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        ([{"role": "user", "content": "x", "name": 3}], "messages[0].name", "name must be a string"),
    ],
)
def test_validation_errors_name_index_and_field(messages, param, pattern):
    with pytest.raises(InvalidRequestError, match=pattern) as info:
        validate_messages(messages)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


# --- ModelTokenizer.encode_chat ---------------------------------------------------------------------


class FakeModelFile:
    """The parts of engine.model.ggufio.ModelFile that ModelTokenizer reads."""

    def __init__(self, tokenizer, add_bos=True, template=CHAT_TEMPLATE):
        self.tokenizer_json = tokenizer.to_str()
        self.metadata = {gguf.Keys.Tokenizer.ADD_BOS: add_bos}
        self.chat_template = template
        self._special = {
            gguf.Keys.Tokenizer.BOS_ID: tokenizer.token_to_id(BOS),
            gguf.Keys.Tokenizer.EOS_ID: tokenizer.token_to_id(EOS),
        }

    def special_token(self, key):
        return self._special.get(key)


@pytest.mark.parametrize("post_processor", [False, True])
def test_encode_chat_adds_no_second_bos(post_processor):
    tokenizer = build_byte_tokenizer(300)
    bos = tokenizer.token_to_id(BOS)
    if post_processor:  # like Llama-3's tokenizer.json: the post-processor itself prepends bos
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    tok = ModelTokenizer(FakeModelFile(tokenizer))
    prompt = render_chat(tok.chat_template, MESSAGES, bos_token=BOS, eos_token=EOS)
    ids = tok.encode_chat(prompt)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == prompt
    assert tok.tokenizer.token_to_id("<|eot_id|>") in ids  # markers are parsed as special tokens
    # a template without bos still gets the one bos the model expects; plain encode is unchanged
    assert tok.encode_chat("hi")[0] == bos and tok.encode_chat("hi").count(bos) == 1
    assert tok.encode("hi") == [bos, *tokenizer.encode("hi", add_special_tokens=False).ids]


def test_encode_chat_without_add_bos():
    tokenizer = build_byte_tokenizer(300)
    tok = ModelTokenizer(FakeModelFile(tokenizer, add_bos=False))
    assert tok.encode_chat("hi") == list(b"hi")
    assert tok.encode_chat(BOS + "hi") == [tokenizer.token_to_id(BOS), *b"hi"]
