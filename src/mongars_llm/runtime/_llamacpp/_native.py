"""The llama.cpp library as the engine uses it: import, logging, tokenizer.

* :func:`native` imports ``llama_cpp`` (the ``cpu`` extra,
  ``llama-cpp-python``) once, initialises its backend and routes llama.cpp's
  log lines (which it writes to stderr by default, process-wide) to the
  ``mongars_llm.runtime.llamacpp`` logger at DEBUG; the last lines are kept so
  that a failed load can say why (:func:`recent_log`).
* :class:`Vocab` is a model's tokenizer through llama.cpp (``llama_tokenize``,
  ``llama_token_to_piece``), and :class:`HFTokenizerView` dresses it as the
  slice of a ``transformers`` tokenizer that :mod:`.._llm2vec` calls, so that
  the LLM2Vec input rules (composition, pooled span) are the torch engine's,
  applied to llama.cpp's token ids.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from ...errors import MissingExtraError, RuntimeClosedError

__all__ = ["HFTokenizerView", "Vocab", "native", "recent_log"]

logger = logging.getLogger("mongars_llm.runtime.llamacpp")

_lock = threading.Lock()
_module: Any = None
_callback: Any = None  # the ctypes callback: kept alive as long as llama.cpp may call it
_recent: deque[str] = deque(maxlen=40)
_partial: list[str] = []


def _on_log(level: int, text: bytes | None, _user: Any) -> None:
    line = (text or b"").decode("utf-8", errors="replace")
    _partial.append(line)
    if line.endswith("\n"):
        joined = "".join(_partial).rstrip("\n")
        _partial.clear()
        _recent.append(joined)
        logger.debug("llama.cpp: %s", joined)


def native() -> Any:
    """The ``llama_cpp`` module, imported and set up once (quiet: logs go to DEBUG)."""
    global _module, _callback
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                import llama_cpp
            except ImportError as err:
                raise MissingExtraError(
                    "llama-cpp-python", "cpu", feature="the llama.cpp engine"
                ) from err
            _callback = llama_cpp.llama_log_callback(_on_log)
            llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _module = llama_cpp
    return _module


def recent_log(lines: int = 6) -> str:
    """llama.cpp's last log lines, joined (what it said before a failure)."""
    return " | ".join(list(_recent)[-lines:])


class Vocab:
    """A model's tokenizer, through llama.cpp (thread-safe: it only reads the vocabulary)."""

    def __init__(self, model: Any) -> None:
        self._ll = ll = native()
        self._vocab = ll.llama_model_get_vocab(model)
        self.size = int(ll.llama_vocab_n_tokens(self._vocab))
        self.bos_id = self._token_or_none(ll.llama_vocab_bos(self._vocab))
        self.eos_id = self._token_or_none(ll.llama_vocab_eos(self._vocab))
        self.adds_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    def _token_or_none(self, token: int) -> int | None:
        return None if token < 0 else int(token)

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds the BOS the model asks for,
        ``parse_special`` reads special tokens written in the text (``<|im_end|>``)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (self._ll.llama_token * capacity)()
        n = self._ll.llama_tokenize(
            self._vocab, data, len(data), buffer, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buffer = (self._ll.llama_token * capacity)()
            n = self._ll.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, add_special, parse_special
            )
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes token ``token`` stands for in generated text (special tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            n = self._ll.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = self._ll.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            cached = self._pieces[token] = buffer.raw[:n]
        return cached

    def text_of(self, token: int) -> str:
        """A token's own text in the vocabulary (``<|im_end|>`` for a special one)."""
        raw = self._ll.llama_vocab_get_text(self._vocab, token)
        return (raw or b"").decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn, …)."""
        end = self._eog.get(token)
        if end is None:
            end = self._eog[token] = bool(self._ll.llama_vocab_is_eog(self._vocab, token))
        return end

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")


class HFTokenizerView:
    """The calls :mod:`.._llm2vec` makes on a ``transformers`` tokenizer, answered by
    llama.cpp's: ``tokenizer(text_or_texts, add_special_tokens=..., truncation=...,
    max_length=...)["input_ids"]``, ``eos_token``, ``bos_token(_id)``, ``get_vocab()``.
    Special tokens written in a text are read as such, as a ``transformers`` tokenizer does."""

    is_fast = False  # no character offsets: llm2vec's counting rule only

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab
        self.bos_token_id = vocab.bos_id if vocab.adds_bos else None
        self.eos_token_id = vocab.eos_id
        self.bos_token = vocab.text_of(vocab.bos_id) if vocab.bos_id is not None else None
        self.eos_token = vocab.text_of(vocab.eos_id) if vocab.eos_id is not None else None
        #: set (under the lock its users hold) before the model is freed: calls then fail
        self.closed = False
        #: the GGUF's ``tokenizer.chat_template`` (set by whoever read the header)
        self.chat_template: str | None = None
        #: the names a chat template sees besides the messages (as ``transformers``')
        self.special_tokens_map: dict[str, str] = {
            name: token
            for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
            if token is not None
        }

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        **_ignored: Any,
    ) -> dict[str, Any]:
        self._check_open()

        def encode(one: str) -> list[int]:
            ids = self._vocab.tokenize(one, add_special=add_special_tokens, parse_special=True)
            return ids[:max_length] if truncation and max_length is not None else ids

        if isinstance(text, str):
            return {"input_ids": encode(text)}
        return {"input_ids": [encode(one) for one in text]}

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeClosedError("this model is closed; build or fetch a new runtime")

    def get_vocab(self) -> dict[str, int]:
        self._check_open()
        return {self._vocab.text_of(i): i for i in range(self._vocab.size)}
