"""The native C++ tokenizer (_core.Tokenizer) against the libraries the Python package uses.

Exact agreement, encode and decode, on every topic of Python's pydoc_data.topics plus edge strings
(emoji, CJK, combining marks, runs of spaces and newlines, digits, invalid UTF-8, empty input),
for byte-level BPE (the tiny test tokenizer, a Llama-3 style tokenizer and SmolLM2's) and
SentencePiece BPE with byte fallback (Llama-2 style).
"""
from __future__ import annotations

import json
import random

import pydoc_data.topics
import pytest

from flexquant_rt import _core
from flexquant_rt.tokenizer import Tokenizer as LibTokenizer

pytestmark = pytest.mark.skipif(not _core.native_tokenizer_available(),
                                reason="built without ICU: no native byte-level BPE tokenizer")

EDGE = [
    "", " ", "  ", "\n", "\n\n\n", "a", "Hello world", "Hello, world! How are you?",
    "   leading and trailing spaces   ", "many      spaces\tand\ttabs\t\t",
    "line one\nline two\r\nline three\n\n\n  \n", "\u000b\u000c\u0085\u00a0\u2028\u3000 mixed white space",
    "1234567890 3.14159 1,000,000 007 ١٢٣ ⅫⅬ ²³", "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "中文字符和日本語のテキスト、한국어", "combining: e\u0301 a\u0300\u0323 Z\u0351\u0352\u0353",
    "Ünïcödé ÀÉÎÕÜ ß ſ Ǆǅǆ", "it's I'M we'Re they'VE he'd she'll 'S",
    "tabs\tand\u200bzero\u200dwidth", "<|endoftext|> special <|im_start|>user\nhi<|im_end|>",
    "a" * 300, " " * 100 + "x", "\n" * 50, "x" * 40 + " " * 40 + "\n" * 40,
    "def f(x):\n    return x ** 2  # square\n", "URL https://example.com/a?b=c&d=e#f",
    "<s> </s> <unk> <0x41> ▁▁ spaces▁escaped",
]
INVALID = [b"\xff", b"abc\xfe\xffdef", b"\xe2\x82", b"\xe2\x82 tail", b"\xc3", b"\xed\xa0\x80",
           b"\xf0\x9f\x98", b"ok \x80\x80 \xc0\xaf", b"\xf4\x90\x80\x80", b"mixed \xe4\xb8 \xe4\xb8\xad"]


def corpus() -> list[str]:
    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)] + EDGE


def assert_agree(native, lib: LibTokenizer, n_vocab: int, invalid_ref) -> None:
    docs = corpus()
    for add_special in (True, False):
        for i, doc in enumerate(docs):
            ids = lib.encode(doc, add_special)
            got = native.encode(doc, add_special)
            assert got == ids, f"encode mismatch on document {i} ({doc[:60]!r}, add_special={add_special})"
            for skip in (True, False):
                assert native.decode(ids, skip) == lib.decode(ids, skip), f"decode mismatch on document {i}"
    for raw in INVALID:
        assert native.encode(raw) == invalid_ref(raw), f"encode mismatch on invalid UTF-8 {raw!r}"
    # random id sequences: partial UTF-8 sequences, special and padding tokens in any order
    rng = random.Random(0)
    for n in list(range(1, 12)) * 40:
        ids = [rng.randrange(n_vocab) for _ in range(n)]
        for skip in (True, False):
            assert native.decode(ids, skip) == lib.decode(ids, skip), f"decode mismatch on ids {ids}"


def _pair(path):
    mf = _core.ModelFile(str(path))
    return _core.Tokenizer(mf), LibTokenizer.from_model_file(mf), int(mf.config["vocab"])


def test_byte_level_tiny(tiny_fq):
    native, lib, v = _pair(tiny_fq)
    assert native.kind == "bpe" and native.n_vocab == v
    assert_agree(native, lib, v, lambda raw: lib.encode(raw.decode("utf-8", "replace")))


def test_byte_level_smollm2(smollm2_fq):
    native, lib, v = _pair(smollm2_fq)
    assert native.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n")[:1] == [1]
    assert_agree(native, lib, v, lambda raw: lib.encode(raw.decode("utf-8", "replace")))


def llama3_style_tokenizer_json(vocab: int) -> str:
    """A byte-level BPE trained on the Python docs with Llama-3's pre-tokenizer (Split regex, then
    ByteLevel without its regex), ignore_merges and a BOS template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False)
    tk.train_from_iterator(list(pydoc_data.topics.topics.values())[::2], trainer)
    tk.add_tokens(["<tool>"])  # a non-special added token: matched in text, kept by decode
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    return tk.to_str()


def test_byte_level_llama3_style(tmp_path):
    from flexquant_rt.convert import HFSource, convert

    from conftest import make_hf_llama

    src = make_hf_llama(tmp_path / "hf", vocab=1024)
    (src / "tokenizer.json").write_text(llama3_style_tokenizer_json(1024))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=0, eos_token_id=1)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "l3.fq"
    convert(HFSource(src), out, progress=False)
    native, lib, v = _pair(out)
    assert native.add_bos and native.encode("hi")[0] == 0
    assert native.encode("a <tool> b", False) == lib.encode("a <tool> b", False)
    assert_agree(native, lib, v, lambda raw: lib.encode(raw.decode("utf-8", "replace")))


def _sp_across_words(vocab: int) -> bytes:
    """conftest's Llama-2 style model, but with pieces that span words ("e▁the"): the native
    encoder cannot split the text into words first and runs on the whole text."""
    import io

    import sentencepiece as spm

    text = "\n".join(corpus()[:40])
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_by_whitespace=False, minloglevel=2)
    return buf.getvalue()


@pytest.mark.parametrize("split_by_whitespace", [True, False])
def test_sentencepiece_llama2_style(tmp_path, split_by_whitespace):
    from flexquant_rt.convert import HFSource, convert

    from conftest import make_hf_llama

    src = make_hf_llama(tmp_path / "hf", vocab=600, tokenizer="sp")
    if not split_by_whitespace:
        (src / "tokenizer.model").write_bytes(_sp_across_words(600))
    out = tmp_path / "sp.fq"
    convert(HFSource(src), out, progress=False)
    native, lib, v = _pair(out)
    assert native.kind == "spm" and native.add_bos
    sp = lib._sp
    spans = any("\u2581" in sp.IdToPiece(i).lstrip("\u2581") for i in range(sp.GetPieceSize()))
    assert spans == (not split_by_whitespace)
    assert_agree(native, lib, v, lambda raw: [lib.bos_id] + sp.EncodeAsIds(raw))
    # text without special pieces is exactly sentencepiece's; "<s>" in text is the BOS id, and each
    # stretch of text around it is encoded as its own sentencepiece input (Llama-2's chat format)
    for doc in corpus():
        if not any(p in doc for p in ("<s>", "</s>", "<unk>")):
            assert native.encode(doc, False) == sp.EncodeAsIds(doc)
    assert native.encode("<s>[INST] hi [/INST]", False) == [1] + sp.EncodeAsIds("[INST] hi [/INST]")
    assert native.encode("a</s><s>b", False) == sp.EncodeAsIds("a") + [2, 1] + sp.EncodeAsIds("b")


def test_errors_name_the_problem(tiny_fq, tmp_path):
    native, _, v = _pair(tiny_fq)
    with pytest.raises(_core.FlexquantError, match=f"ids\\[1\\] = {v} is outside 0..{v - 1}"):
        native.decode([1, v])
    with pytest.raises(TypeError, match="str or bytes"):
        native.encode(42)


def test_unsupported_tokenizers_are_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, normalizers

    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert

    src = make_hf_llama(tmp_path / "hf", vocab=320)
    tk = Tokenizer.from_str((src / "tokenizer.json").read_text())
    tk.normalizer = normalizers.NFC()
    (src / "tokenizer.json").write_text(tk.to_str())
    convert(HFSource(src), tmp_path / "nfc.fq", progress=False)
    with pytest.raises(_core.FlexquantError, match="cannot run this model's tokenizer: normalizer 'NFC'"):
        _core.Tokenizer(_core.ModelFile(str(tmp_path / "nfc.fq")))

    import io

    import sentencepiece as spm

    src = make_hf_llama(tmp_path / "sp", vocab=400, tokenizer="sp")
    buf = io.BytesIO()  # sentencepiece's default normalizer (nmt_nfkc), unlike Llama-2's identity
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()[:20]), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    convert(HFSource(src), tmp_path / "nfkc.fq", progress=False)
    with pytest.raises(_core.FlexquantError, match="normalizer 'nmt_nfkc' is not supported"):
        _core.Tokenizer(_core.ModelFile(str(tmp_path / "nfkc.fq")))


def test_catastrophic_regex_from_the_model_file_times_out(tmp_path):
    """The pre-tokenizer regexes come from the (untrusted) model file: an exponentially
    backtracking one ends in an error naming ICU's time-out, not in a hung process."""
    import json

    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert

    src = make_hf_llama(tmp_path / "hf", vocab=320)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    convert(HFSource(src), tmp_path / "evil.fq", progress=False, method="plain")
    tok = _core.Tokenizer(_core.ModelFile(str(tmp_path / "evil.fq")))
    assert len(tok.encode("aaa")) > 0  # the pattern itself works on benign input
    with pytest.raises(_core.FlexquantError, match="U_REGEX_TIME_OUT"):
        tok.encode("a" * 40 + "b")
