"""Text <-> token ids from what the model file carries, and the chat template.

Tokenization goes through the well-kept libraries: `tokenizers` for byte-level BPE (the
`flexquant.tokenizer.hf_json` blob, e.g. SmolLM2) and `sentencepiece` for Llama-2 style models
(the `flexquant.tokenizer.sp_model` blob). The chat template is untrusted model-file content and is
rendered only in jinja2's ImmutableSandboxedEnvironment, configured as transformers does.

The C++ API has its own native tokenizer and template renderer (flexquant/tokenizer.h,
chat_template.h), held token for token to these libraries by tests/test_tokenizer_native.py and
tests/test_chat_template.py. Python keeps the libraries: they run every tokenizer and template
(the native side covers the supported families), need no ICU at build time, and either path costs
under a millisecond per prompt (README, "Use from C++", has the measurements).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Sequence


class Tokenizer:
    def __init__(self, *, hf_json: str | None = None, sp_model: bytes | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, chat_template: str | None = None,
                 tokens: Sequence[str] | None = None, add_bos: bool | None = None):
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self._tokens = list(tokens) if tokens is not None else None
        if hf_json is not None:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(hf_json)
            self._sp = None
            # A tokenizer.json carries its own BOS rule in its post-processor: keep it.
            self.add_bos = False if add_bos is None else add_bos
        elif sp_model is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(bytes(sp_model))
            self._hf = None
            # <s>, </s>, <unk> written in the text (a chat template's bos_token) are those ids, as
            # in transformers and Meta's Llama-2 chat format; the text between them is encoded by
            # sentencepiece piece by piece (each with its dummy prefix).
            specials = sorted((self._sp.IdToPiece(i) for i in range(self._sp.GetPieceSize())
                               if self._sp.IsControl(i) or self._sp.IsUnknown(i)), key=len, reverse=True)
            self._sp_special = re.compile("|".join(map(re.escape, specials))) if specials else None
            self.add_bos = True if add_bos is None else add_bos  # Llama-2 convention
        else:
            raise ValueError("the model file carries no tokenizer (neither hf_json nor sp_model)")

    @classmethod
    def from_model_file(cls, mf) -> "Tokenizer":
        """Build from a `_core.ModelFile` (its metadata accessors)."""
        sp = mf.meta("flexquant.tokenizer.sp_model")
        return cls(hf_json=mf.meta("flexquant.tokenizer.hf_json"),
                   sp_model=bytes(sp) if sp is not None else None,
                   bos_id=mf.meta("tokenizer.ggml.bos_token_id"), eos_id=mf.meta("tokenizer.ggml.eos_token_id"),
                   chat_template=mf.meta("tokenizer.chat_template"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids, start = [], 0
            for m in self._sp_special.finditer(text) if self._sp_special else ():
                ids += self._sp.EncodeAsIds(text[start:m.start()]) + [self._sp.PieceToId(m.group())]
                start = m.end()
            ids += self._sp.EncodeAsIds(text[start:])
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + list(ids)
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.IsControl(i)]
        return self._sp.DecodeIds(ids)

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    # -- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise ValueError("this model file has no chat template; use generate() with a plain prompt")
        _check_messages(messages)
        tmpl = _compile(self.chat_template)
        bos = self._piece(self.bos_id)
        eos = self._piece(self.eos_id)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos or "", eos_token=eos or "", **extra)

    def _piece(self, i: int | None) -> str | None:
        if i is None:
            return None
        if self._hf is not None:
            return self._hf.id_to_token(i)
        return self._sp.IdToPiece(i)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")


_TEMPLATES: dict[str, object] = {}


def _compile(source: str):
    t = _TEMPLATES.get(source)
    if t is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            t = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from None
        _TEMPLATES[source] = t
    return t
