"""Normalised records -> token ids and loss labels, through the base model's chat template.

Chat turns go through the tokenizer's own chat template (tools included, where the template
reads them). The tokens of each assistant answer are found by rendering the conversation up to
that answer (with the generation prompt) and up to its end: the difference is the answer,
whatever the template looks like. Segments are tokenised separately, so a segment boundary is
always a token boundary, and a whole batch of records is tokenised in one call.

Before anything is rendered, each text is cut to ``char_budget`` characters: enough for more
than ``max_seq_len`` tokens (no token of the vocabulary is longer than ``max_token_chars``
characters), so a record of millions of tokens costs what a record of ``max_seq_len`` does,
and its first ``max_seq_len`` tokens are the same as if it had been tokenised whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from farm.data.records import Chat, RecordError

_CUT_MARGIN_TOKENS = 16  # tokens past max_seq_len kept before a cut, so the cut never shows


def max_token_chars(vocab) -> int:
    """The most characters any one token of ``vocab`` (its token strings) stands for (an upper bound)."""
    # Byte-level tokens are written one character per byte, so their length bounds the
    # characters they decode to; SentencePiece pieces are the characters themselves.
    return max(1, max((len(token) for token in vocab), default=1))


@dataclass(frozen=True)
class TokenizerParts:
    """What rendering and tokenising need from a fast tokenizer, without transformers' object.

    Picklable and light: a data worker rebuilds the Rust tokenizer from its JSON and renders
    with the template, never importing transformers' tokenizer classes (which load torch,
    about 350 MB per process).
    """

    tokenizer_json: str            # tokenizers.Tokenizer.to_str()
    chat_template: str | None
    template_vars: dict            # bos_token, eos_token, ... as apply_chat_template passes them
    bos_token_id: int | None
    eos_token_id: int | None

    @classmethod
    def of(cls, tokenizer) -> "TokenizerParts | None":
        """The parts of a transformers tokenizer; None for a slow (Python) tokenizer."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template, dict(tokenizer.special_tokens_map),
                   tokenizer.bos_token_id, tokenizer.eos_token_id)


class Renderer:
    """Renders and tokenises records for one tokenizer, training target and row length.

    ``tokenizer`` is a transformers tokenizer, or ``TokenizerParts`` (in a data worker).
    """

    def __init__(self, tokenizer, train_on: str, max_seq_len: int):
        self.train_on = train_on
        self.max_seq_len = max_seq_len
        self.source = tokenizer
        if isinstance(tokenizer, TokenizerParts):
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(tokenizer.tokenizer_json)
            self.slow = None
        else:
            fast = getattr(tokenizer, "is_fast", False)
            self.backend = tokenizer.backend_tokenizer if fast else None
            self.slow = None if fast else tokenizer
        self.template = tokenizer.chat_template
        # The template's variables, as apply_chat_template passes them (bos_token, ...).
        self.template_vars = dict(tokenizer.template_vars if isinstance(tokenizer, TokenizerParts)
                                  else tokenizer.special_tokens_map)
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        vocab = self.backend.get_vocab() if self.backend is not None else tokenizer.get_vocab()
        self.char_budget = (max_seq_len + _CUT_MARGIN_TOKENS) * max_token_chars(vocab)
        # A template that never reads tool_calls would silently drop them from the text.
        self.tools_ok = bool(self.template) and "tool_calls" in self.template

    def parts(self) -> TokenizerParts | None:
        """This renderer's tokenizer as ``TokenizerParts`` (None for a slow tokenizer)."""
        if isinstance(self.source, TokenizerParts):
            return self.source
        return TokenizerParts.of(self.source)

    # -- rendering -------------------------------------------------------------------------

    def cut(self, text: str) -> str:
        """``text``, cut to the character budget."""
        return text if len(text) <= self.char_budget else text[: self.char_budget]

    def segments(self, item: Chat | str) -> list[tuple[str, bool]]:
        """The record as ``(text, trained)`` pieces, in order (texts already cut)."""
        if isinstance(item, str):
            return [(self.cut(item), True)]
        if item.uses_tools and not self.tools_ok:
            raise RecordError("messages", "uses tool calls, but the base model's chat template has no tool "
                                          "support (it never reads 'tool_calls'); use a base whose template does, "
                                          "or drop the tool turns")
        messages = self._within_budget(item.messages)
        train_all = self.train_on == "all"
        out: list[tuple[str, bool]] = []
        rendered = ""
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for index in answers:
            prompt = self._render(messages[:index], item.tools, True)
            full = self._render(messages[: index + 1], item.tools, False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise RecordError(None, "the tokenizer's chat template does not render conversations "
                                        "as growing prefixes; cannot locate the answers")
            out += [(prompt[len(rendered):], train_all), (full[len(prompt):], True)]
            rendered = full
        ends_on_answer = bool(answers) and answers[-1] == len(messages) - 1
        tail = rendered if ends_on_answer else self._render(messages, item.tools, False)
        if len(tail) > len(rendered):
            out.append((tail[len(rendered):], train_all))
        return out

    def _within_budget(self, messages: list[dict]) -> list[dict]:
        """The turns that can reach the first max_seq_len tokens, each cut to the budget.

        If the answers all lie past the budget, none is kept: the example then has nothing
        to learn from within max_seq_len, which the caller counts.
        """
        kept, chars = [], 0
        for message in messages:
            if len(message["content"]) > self.char_budget:
                message = {**message, "content": message["content"][: self.char_budget]}
            kept.append(message)
            chars += len(message["content"])
            if chars > self.char_budget:
                break
        return kept

    def _render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            # The function apply_chat_template calls, minus its per-call overhead.
            rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=self.template,
                                                add_generation_prompt=generation_prompt, **self.template_vars)
        except TemplateError as exc:
            raise RecordError(None, f"the chat template refused this conversation: {exc}") from None
        return rendered[0]

    # -- tokenising ------------------------------------------------------------------------

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; special tokens the template wrote are parsed as specials."""
        if not texts:
            return []
        if self.backend is not None:
            return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.slow(texts, add_special_tokens=False)["input_ids"]

    def render_batch(self, items: Sequence[Chat | str]) -> "Rendered":
        """Render and tokenise a batch of records with one tokeniser call for all of them."""
        pieces: list[list[tuple[str, bool]] | RecordError] = []
        for item in items:
            try:
                pieces.append(self.segments(item))
            except RecordError as exc:
                pieces.append(exc)
        texts = [text for p in pieces if not isinstance(p, RecordError) for text, _ in p if text]
        encoded = iter(self.encode_texts(texts))
        bos, eos = self.bos_token_id, self.eos_token_id
        out = Rendered()
        for item, piece in zip(items, pieces):
            if isinstance(piece, RecordError):
                out.problems.append(piece)
                continue
            out.problems.append(None)
            start = len(out.ids)
            if isinstance(item, str):  # plain text: framed by bos/eos like a document, all trained
                tokens = ([bos] if bos is not None else []) + next(encoded) + [eos]
                out.ids += tokens
                out.trained += [1] * len(tokens)
            else:
                for text, trained in piece:
                    if text:
                        tokens = next(encoded)
                        out.ids += tokens
                        out.trained += [int(trained)] * len(tokens)
            if len(out.ids) > start:
                # The first token of an example has nothing before it in its own example; in a
                # packed row the token before it belongs to another example: never a target.
                out.trained[start] = 0
            out.offsets.append(len(out.ids))
        return out


@dataclass
class Rendered:
    """A rendered batch: every example's tokens back to back, and for each record its problem."""

    problems: list[RecordError | None] = field(default_factory=list)  # per record; None: it made an example
    ids: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)  # 1 where the token carries loss
    offsets: list[int] = field(default_factory=lambda: [0])  # example k is ids[offsets[k]:offsets[k + 1]]
