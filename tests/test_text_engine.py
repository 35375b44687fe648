"""The C++ TextEngine (flexquant/text_engine.h, through _core.TextEngine) against the Python
Engine's generation loop: same text, same streamed pieces, same stop handling, and errors that name
the bad value."""
from __future__ import annotations

import pytest

from flexquant_rt import Engine, _core

pytestmark = pytest.mark.skipif(not _core.native_tokenizer_available(),
                                reason="built without ICU: no native byte-level BPE tokenizer")


@pytest.fixture(scope="module")
def pair(smollm2_fq):
    with Engine(smollm2_fq, n_ctx=256) as py_eng:
        yield py_eng, _core.TextEngine(str(smollm2_fq), 256)


@pytest.mark.parametrize("prompt, kw", [
    ("The capital of France is", dict(max_new_tokens=24)),
    ("The capital of France is", dict(max_new_tokens=40, stop=["\n\n"])),
    ("Count: 1, 2, 3,", dict(max_new_tokens=30, stop=[", 7", "nine"])),
    ("Once upon a time", dict(max_new_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=11)),
    ("Once upon a time", dict(max_new_tokens=24, temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=3)),
])
def test_generate_matches_python(pair, prompt, kw):
    py_eng, cpp = pair
    want = list(py_eng.generate(prompt, stream=True, **kw))
    got: list[str] = []
    r = cpp.generate(prompt, on_text=got.append, **kw)
    assert got == want  # the same pieces, streamed at the same steps
    assert r["text"] == "".join(want)
    assert r["n_prompt_tokens"] == len(py_eng.tokenize(prompt))
    if kw.get("stop") and r["stop_reason"] == "stop":
        assert not any(s in r["text"] for s in kw["stop"])


def test_stop_reasons_and_callback(pair):
    _, cpp = pair
    assert cpp.generate("The capital of France is", max_new_tokens=3)["stop_reason"] == "length"
    r = cpp.generate("The capital of France is", max_new_tokens=40, stop=["\n"])
    assert r["stop_reason"] == "stop" and "\n" not in r["text"] and r["text"]
    assert cpp.chat([{"role": "user", "content": "What is the capital of France?"}])["stop_reason"] == "eos"
    pieces: list[str] = []
    r = cpp.generate("Once upon a time", max_new_tokens=30, on_text=lambda p: pieces.append(p) or len(pieces) < 3)
    assert r["stop_reason"] == "callback" and len(pieces) == 3 and r["text"] == "".join(pieces)
    assert cpp.generate("Hi", max_new_tokens=0) == {"text": "", "tokens": [], "n_prompt_tokens": 1,
                                                     "stop_reason": "length"}


def test_chat_matches_python(pair):
    py_eng, cpp = pair
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]
    assert cpp.chat(msgs, max_new_tokens=20)["text"] == py_eng.chat(msgs, max_new_tokens=20)


def test_errors_name_the_value(pair, tiny_fq):
    _, cpp = pair
    with pytest.raises(_core.FlexquantError, match="the prompt is empty"):
        cpp.generate("")
    with pytest.raises(_core.FlexquantError, match="max_new_tokens = -1 is negative"):
        cpp.generate("Hi", max_new_tokens=-1)
    with pytest.raises(_core.FlexquantError, match=r"stop\[1\] is an empty string"):
        cpp.generate("Hi", stop=["x", ""])
    with pytest.raises(_core.FlexquantError, match="the prompt has 3\\d\\d tokens, the context holds 256"):
        cpp.generate("word " * 300)
    with pytest.raises(_core.FlexquantError, match="messages is empty"):
        cpp.chat([])


def test_controller_hook_matches_python_controller(pair):
    """before_step sees the same signals the Python controller protocol sees, and a mask set there
    applies to the next step, as Engine.generate(controller=...) does."""
    py_eng, cpp = pair

    def bits(entropy: float) -> int:
        return 8 if entropy > 1.5 else 3

    class EntropySwitch:
        def __init__(self):
            self.seen = []

        def mask(self, info):
            if info is None:
                return 8
            self.seen.append(info.entropy)
            return bits(info.entropy)

    ctl = EntropySwitch()
    want = py_eng.generate("The capital of France is", max_new_tokens=20, controller=ctl)
    seen = []

    def before_step(n):
        e, _ = cpp.signals()
        seen.append(e)
        cpp.set_layer_bits(bits(e))

    cpp.set_layer_bits(8)
    r = cpp.generate("The capital of France is", max_new_tokens=20, before_step=before_step)
    assert r["text"] == want
    assert seen == pytest.approx(ctl.seen, rel=1e-6) and len(set(map(bits, seen))) == 2  # both widths used
    py_eng.set_layer_bits(8)
    cpp.set_layer_bits(8)


def test_llama2_style_chat_matches_python(tmp_path):
    """A SentencePiece model with Llama-2's chat template: the template's "<s>" becomes the BOS id
    in both paths, and C++ answers what Python answers."""
    import json

    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert
    from test_chat_template import LLAMA2

    src = make_hf_llama(tmp_path / "hf", vocab=600, tokenizer="sp")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2}))
    out = tmp_path / "l2.fq"
    convert(HFSource(src), out, progress=False)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]
    cpp = _core.TextEngine(str(out))
    with Engine(out) as py_eng:
        prompt = py_eng.tokenizer.apply_chat_template(msgs)
        assert cpp.apply_chat_template(msgs) == prompt and prompt.count("<s>") == 2
        ids = py_eng.tokenize(prompt, add_special_tokens=False)
        assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # <s> ... </s><s> ...
        for kw in (dict(max_new_tokens=16), dict(max_new_tokens=16, stop=["e"])):
            assert cpp.chat(msgs, **kw)["text"] == py_eng.chat(msgs, **kw)
        with pytest.raises(_core.FlexquantError, match="Conversation roles must alternate"):
            cpp.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_skipped_special_tokens_keep_the_next_space_like_python(tmp_path):
    """generate(ignore_eos=True) can emit </s> mid-text; decoding skips it, and the C++ incremental
    detokenizer must then keep the next word's leading space (SentencePiece drops it only at the start
    of a sequence), as Python does. The model is edited so that </s> stands in for a token t of its
    greedy output that a word with a leading space follows: </s>'s embedding is t's and its LM head row
    is t's times 1.05, so the output is the same with every t replaced by </s>."""
    from safetensors.torch import load_file, save_file

    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert

    src = make_hf_llama(tmp_path / "hf", vocab=600, tokenizer="sp")
    out = tmp_path / "m.fq"
    convert(HFSource(src), out, progress=False)
    ids = _core.TextEngine(str(out)).generate("The", max_new_tokens=40, ignore_eos=True)["tokens"]
    with Engine(out) as py_eng:
        dec = py_eng.detokenize
        t = next(a for a, b in zip(ids, ids[1:]) if a > 2 and dec([a, b]) == dec([a]) + " " + dec([b]))
    w = load_file(src / "model.safetensors")
    w["model.embed_tokens.weight"][2] = w["model.embed_tokens.weight"][t]
    w["lm_head.weight"][2] = 1.05 * w["lm_head.weight"][t]
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    out2 = tmp_path / "m2.fq"
    convert(HFSource(src), out2, progress=False)
    cpp = _core.TextEngine(str(out2))
    with Engine(out2) as py_eng:
        kw = dict(max_new_tokens=40, ignore_eos=True)
        want = list(py_eng.generate("The", stream=True, **kw))
        got: list[str] = []
        r = cpp.generate("The", on_text=got.append, **kw)
        assert r["tokens"] == [2 if i == t else i for i in ids]  # </s> where t was
        assert got == want
        assert r["text"] == "".join(want) == py_eng.detokenize(r["tokens"])
