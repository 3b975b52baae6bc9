"""Text in and out: the artifact's ``tokenizers`` tokenizer, and texts or ids made into the
right-padded batches classifiers take. numpy (+ tokenizers, imported when a tokenizer is loaded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgepeft.contract import inside
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.batch import batch_inputs


def load_tokenizer(root: Path, manifest: dict):
    """The artifact's ``tokenizers.Tokenizer``, with its own padding and truncation switched off.

    Raises:
        EdgepeftError: the artifact has no tokenizer, or its file is missing or unreadable.
    """
    tok = manifest.get("tokenizer")
    if not tok:
        raise EdgepeftError(f"{root}: the artifact has no tokenizer (the base model "
                            "had no fast tokenizer); pass token ids instead.")
    from tokenizers import Tokenizer

    file = inside(root, f"{tok['dir']}/tokenizer.json", str(root / "manifest.json"))
    if not file.is_file():
        raise EdgepeftError(f"{file}: missing from the artifact. Export it again.")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise EdgepeftError(f"{file}: cannot read the tokenizer ({str(e)[:200]}). Export the "
                            "artifact again.") from None
    # A tokenizer.json may carry fixed padding / truncation (sentence-transformers ship
    # MiniLM padded to 128): the runtime pads and truncates itself, with a mask that marks
    # pads as pads, so both are switched off here.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode(texts_or_ids, attention_mask, manifest: dict, tokenizer: Callable, limit: int,
           reserved: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask for a classifier; texts truncated to ``limit`` tokens.

    Args:
        texts_or_ids: a string, strings, ``(B, S)`` ints, or ragged lists of ids.
        attention_mask: only with a rectangular ids array.
        manifest: for the vocabulary size and pad token.
        tokenizer: returns the tokenizer (called only for texts).
        limit: the longest sequence, after ``reserved`` positions (a prompt adapter's virtual
            tokens) are taken off; named in messages.

    Raises:
        EdgepeftError: no rows, an empty row (or a mask row of zeros), ids out of range, sequences
            above ``limit``.
    """
    if isinstance(texts_or_ids, str):
        texts_or_ids = [texts_or_ids]
    if len(texts_or_ids) and isinstance(texts_or_ids[0], str):
        if attention_mask is not None:
            raise EdgepeftError("attention_mask goes with token ids; texts are padded here.")
        rows = [e.ids for e in tokenizer().encode_batch(list(texts_or_ids))]
        rows = [r[:limit - 1] + r[-1:] if len(r) > limit else r for r in rows]  # keep [SEP]/</s>
    elif isinstance(texts_or_ids, np.ndarray) or (len(texts_or_ids) and isinstance(texts_or_ids[0], (int, np.integer))):
        ids, mask = batch_inputs(texts_or_ids, attention_mask, manifest["base"]["vocab_size"])
        empty = np.flatnonzero(mask.sum(1) == 0)
        if empty.size:  # as an empty text: nothing to classify (the graphs would differ on it, too)
            raise EdgepeftError(f"attention_mask row {int(empty[0])} is all 0; every row needs at least one token.")
        if ids.shape[1] > limit:
            raise EdgepeftError(f"sequences of {ids.shape[1]} tokens exceed the model's {limit} "
                                f"(after {reserved} virtual tokens); shorten them.")
        return ids, mask
    else:
        if attention_mask is not None:
            raise EdgepeftError("attention_mask goes with a rectangular ids array; ragged lists "
                                "are padded here.")
        rows = [list(r) for r in texts_or_ids]
    return _right_padded(rows, manifest, limit, reserved)


def _right_padded(rows: list[list[int]], manifest: dict, limit: int, reserved: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, L)`` ids and mask of ``rows``, padded on the right as encoder tokenizers do."""
    if not rows or not all(rows):
        raise EdgepeftError("classify() needs at least one non-empty text or id sequence.")
    pad = (manifest.get("tokenizer") or {}).get("pad_token_id") or 0
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    vocab = manifest["base"]["vocab_size"]
    if ids.min() < 0 or ids.max() >= vocab:
        raise EdgepeftError(f"input ids must lie in [0, {vocab}); got {ids.min()}..{ids.max()}.")
    if longest > limit:
        raise EdgepeftError(f"sequences of {longest} tokens exceed the model's {limit} (after "
                            f"{reserved} virtual tokens); shorten them.")
    return ids, mask


class TextStream:
    """A generation's text as its tokens come, held back while it may still change: text that
    could be the start of a ``stop`` string, or an unfinished UTF-8 character (decoded as
    U+FFFD). The pieces :meth:`push` and :meth:`flush` return join to the whole text, cut before
    the first stop string (then ``stopped`` is set and later tokens are ignored).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        stop: strings that end the text (not included).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(x, str) or not x for x in stop):
            raise EdgepeftError(f"stop={list(stop)!r}: non-empty strings.")
        self._tokenizer, self._stop = tokenizer, list(stop)
        self._tokens: list[int] = []
        self.sent = ""  # the text returned so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add ``token``; the new text that is final (may be empty)."""
        if self.stopped:
            return ""
        self._tokens.append(int(token))
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        sent = self.sent
        cut = min((i for i in (text.find(x, max(0, len(sent) - len(x))) for x in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut]) if cut > len(sent) else ""
        ready = len(text.rstrip("\ufffd"))  # an unfinished character decodes as U+FFFD
        ready -= max((k for x in self._stop for k in range(1, min(len(x), ready + 1))  # a tail a stop
                      if text[:ready].endswith(x[:k])), default=0)                   # string may start
        return self._send(text[:ready]) if ready > len(sent) else ""

    def flush(self) -> str:
        """The text held back, at the end of the generation."""
        if self.stopped:
            return ""
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        return self._send(text) if len(text) > len(self.sent) else ""

    def _send(self, upto: str) -> str:
        piece, self.sent = upto[len(self.sent):], upto
        return piece


def chat_prompt(root: Path, manifest: dict, messages: list[dict]) -> str:
    """``messages`` rendered by the tokenizer's chat template, ending with the assistant's turn
    (the text to continue), as transformers' ``apply_chat_template(add_generation_prompt=True)``
    renders it: a sandboxed Jinja2 environment with ``raise_exception`` and the special tokens.

    Raises:
        EdgepeftError: no tokenizer or no chat template in the artifact, jinja2 missing, or the
            template refusing the messages (its own message).
    """
    tok = manifest.get("tokenizer")
    if not tok:
        raise EdgepeftError(f"{root}: the artifact has no tokenizer, so no chat template.")
    folder = inside(root, tok["dir"], str(root / "manifest.json"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{name, template}]: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        raise EdgepeftError(f"{folder}: the tokenizer has no chat template (the base model has none); send "
                            "the text yourself to /v1/completions.")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgepeftError("chat templates need jinja2: pip install 'edgepeft[serve]'.") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    special = {k: (v if isinstance(v, str) else (v or {}).get("content"))
               for k, v in config.items() if k.endswith("_token")}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise EdgepeftError(f"the chat template refused these messages: {e}") from None
