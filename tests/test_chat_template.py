"""The C++ chat-template renderer against jinja2 (as the Python package renders: sandboxed, with
trim_blocks and lstrip_blocks) on the supported models' templates and a few stress templates."""
from __future__ import annotations

import pytest

from flexquant_rt import _core
from flexquant_rt.convert import byte_level_tokenizer
from flexquant_rt.tokenizer import _compile

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Multi-line templates: trim_blocks / lstrip_blocks and the "-" markers decide every newline.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
CHATML_DASHES = """{#- a ChatML variant written with whitespace control -#}
{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
        {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content | trim ~ '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt is defined and add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
STRESS = """  {% set n = messages | length %}
Turns: {{ n }} {{ 'many' if n > 2 else 'few' }}  {# a comment #}
  {% for m in messages[-2:] %}
    [{{ loop.index }}/{{ loop.length }}{% if loop.last %} last{% endif %}] {{ m.role | upper }}: {{ m['content'][:0] }}
    {%- if 'x' in m.content %} has-x{% elif m.role not in ['user', 'system'] %} other{% else %} plain{% endif %}
  {%+ if m.content.startswith('He') %}starts-He{% endif %}
  {% endfor %}
{% if bos_token %}bos={{ bos_token }}{% endif %}{{ eos_token ~ 7 // 2 ~ -7 % 3 ~ (none is none) }}
"""

TEMPLATES = {"llama2": LLAMA2, "llama3": LLAMA3, "smollm2": SMOLLM2, "zephyr": ZEPHYR,
             "chatml_dashes": CHATML_DASHES, "stress": STRESS, "tiny": byte_level_tokenizer(320).chat_template}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "Hello! How can I help?\n\n"},
     {"role": "user", "content": "Explain x = {{ y }} and {% raw %} in jinja, 'quoted' \"too\"."}],
    [{"role": "system", "content": "Système: réponds en français 🇫🇷"}, {"role": "user", "content": "中文?\tok"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "\n\nmore\n"}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_jinja2(name, add_generation_prompt):
    src = TEMPLATES[name]
    for msgs in CONVERSATIONS:
        kw = dict(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
        try:
            want = _compile(src).render(**kw)
        except Exception as e:  # the template rejects this conversation: C++ must reject it too
            with pytest.raises(_core.FlexquantError, match="Conversation roles must alternate"):
                _core.render_chat_template(src, **kw)
            assert "alternate" in str(e)
            continue
        assert _core.render_chat_template(src, **kw) == want, (name, msgs)


def test_model_file_template(smollm2_fq):
    eng = _core.TextEngine(str(smollm2_fq), 512)
    msgs = CONVERSATIONS[1]
    from flexquant_rt.tokenizer import Tokenizer

    tok = Tokenizer.from_model_file(_core.ModelFile(str(smollm2_fq)))
    assert eng.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


@pytest.mark.parametrize("src, message", [
    ("{% for m in messages %}", "missing {% endfor %}"),
    ("{{ messages | tojson }}", "unsupported filter 'tojson'"),
    ("{% macro f() %}{% endmacro %}", "unsupported statement 'macro'"),
    ("{{ 1.5 }}", "floating-point"),
    ("{{ 'a' + 1 }}", "unsupported operand types for '\\+': string and int"),
    ("{{ x.y }}", "'y' of an undefined value"),
    ("{% if true %}", "missing {% endif %}"),
    ("{{ 'open }}", "unterminated string|unclosed tag"),
])
def test_unsupported_constructs_are_errors(src, message):
    with pytest.raises(_core.FlexquantError, match=message):
        _core.render_chat_template(src, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("src, message", [
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested deeper than"),
    ("{{ " + "-" * 5000 + "1 }}", "nested deeper than"),
    ("{{ " + "1 if true else " * 5000 + "1 }}", "nested deeper than"),
    ("{% if true %}" * 5000 + "{% endif %}" * 5000, "nested deeper than"),
], ids=["parentheses", "unary-minus", "conditional-chain", "if-blocks"])
def test_pathological_nesting_is_an_error_not_a_crash(src, message):
    """The template comes from the (untrusted) model file: nesting is bounded."""
    with pytest.raises(_core.FlexquantError, match=message):
        _core.render_chat_template(src, [{"role": "user", "content": "hi"}])
