"""The transformers + PEFT serving backend: every method the farm trains, behind ``farm gateway``.

    FARM_TRANSFORMERS_API_KEY=... FARM_REGISTRY_STORE=.farm/registry \\
        python -m farm.serving.transformers_server --base-model .farm/base-model --port 8001
    (or: farm serve --backend transformers --base-model ... --run)

vLLM serves LoRA only; DoRA, IA3, prefix and prompt tuning and bottleneck adapters are served
here. The routes are the subset of vLLM's OpenAI API the gateway uses, with the same shapes:

    GET  /health                  liveness, no key
    GET  /v1/models               API key
    POST /v1/completions          API key; streamed (SSE) or not, ``usage`` always
    POST /v1/chat/completions     API key; likewise

A request's ``model`` is the base's served name or an immutable serve name
(``acme.support.v3``), resolved in the registry by ``farm.serving.resolver`` with the same
checks as vLLM's resolver plugin (base model, sha256-verified copy, tensors against this base);
aliases are resolved by the gateway, which also scopes tenants, limits and meters. Like vLLM,
this server trusts its caller: it listens on loopback or a private address, behind the gateway.

How it runs: one base model on one device (bf16 on GPUs that have it, fp32 elsewhere) and one
generation thread. Requests wait in a queue; the thread takes the oldest and, with it, every
waiting row of the same adapter and sampling settings (up to ``max_batch_size``), and
generates them as one left-padded batch, streaming each row's tokens as they come. Where a
method answers differently when padded (prompt tuning: PEFT puts its virtual tokens before the
padding), only prompts of equal length share a batch. Adapters
are kept loaded in an LRU of ``max_loaded_adapters`` (config and tensors on the device,
verified once); the adapter of the running batch is attached to the base and stays attached
while batches for it follow, so a busy adapter is wrapped once, not per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from farm.serving.errors import APIError

logger = logging.getLogger("farm.transformers_server")

API_KEY_ENV = "FARM_TRANSFORMERS_API_KEY"
MAX_BODY_BYTES = 4 * 2**20
#: Request fields this backend honours; the gateway's own additions are accepted and ignored.
#: Anything else (logprobs, tools, logit_bias, ...) is a 400 naming the field, not silently dropped.
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
                           "stream_options", "stop", "seed", "user", "return_token_ids", "ignore_eos"})
IGNORED_FIELDS = frozenset({"cache_salt"})  # the gateway's per-tenant prefix-cache salt: no shared cache here
FIELDS = {"completions": COMMON_FIELDS | {"prompt"},
          "chat/completions": COMMON_FIELDS | {"messages", "max_completion_tokens"}}


class ServerSettings(BaseModel):
    """What one transformers backend serves and how much it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(..., description="the base (path or hub id), exactly as adapters were published")
    served_model_name: Optional[str] = Field(None, description="name of the plain base for clients (default: base_model)")
    max_loaded_adapters: int = Field(8, ge=1, le=1024, description="adapters kept loaded on the device (LRU)")
    max_batch_size: int = Field(8, ge=1, le=256, description="rows generated together")
    max_model_len: int = Field(2048, ge=16, le=1_000_000, description="prompt + completion tokens, at most")
    precision: str = Field("auto", pattern="^(auto|bf16|fp32)$")

    @property
    def name(self) -> str:
        return self.served_model_name or self.base_model


# -- sampling and rows -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings; rows batch together only when these are equal."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    ignore_eos: bool = False           # vLLM's extension: generate max_tokens whatever the model says

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(eq=False)
class Row:
    """One sequence to generate (a request with ``n`` choices and several prompts has several)."""

    adapter: Optional[str]             # serve name; None: the plain base
    folder: Optional[Path]             # its verified local copy
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    index: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0                      # characters of ``text`` already delivered
    tokens_sent: int = 0               # tokens already delivered (``return_token_ids``)
    finish: Optional[str] = None
    cancelled: bool = False
    padded: bool = True                # may share a batch with rows of other lengths (the method's ``pads_batches``)

    @property
    def batch_key(self) -> tuple:
        # A seeded row runs alone: its draws must not depend on what it was batched with.
        return (self.adapter, self.sampling, id(self) if self.sampling.seed is not None else None,
                None if self.padded else len(self.prompt))

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# -- the engine ----------------------------------------------------------------------------------------
class Engine:
    """The base model, the loaded adapters and the generation thread."""

    def __init__(self, settings: ServerSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from farm.models import select_placement

        hf_logging.disable_progress_bar()
        self.settings = settings
        self.placement = select_placement(settings.precision)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.base_model, trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(
            settings.base_model, dtype=self.placement.dtype, trust_remote_code=False,
            use_safetensors=True).to(self.placement.device).eval()
        eos = self.base.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.loaded: OrderedDict[str, tuple[dict, dict]] = OrderedDict()  # serve name -> (config, tensors)
        self._loaded_lock = threading.Lock()  # the thread changes the LRU, /v1/models reads it
        self.attached: tuple[Optional[str], Any] = (None, self.base)      # (serve name, model)
        self._pending: list[Row] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="farm-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def loaded_names(self) -> list[str]:
        """Serve names of the loaded adapters, least recently used first."""
        with self._loaded_lock:
            return list(self.loaded)

    def submit(self, rows: list[Row]) -> None:
        with self._wake:
            self._pending.extend(rows)
            self._wake.notify_all()

    # -- the generation thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                first = self._pending[0]
                batch = [r for r in self._pending if r.batch_key == first.batch_key][:self.settings.max_batch_size]
                self._pending = [r for r in self._pending if r not in batch]
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as exc:  # one bad batch fails its rows, never the server
                logger.exception("generation failed for %s", first.adapter or "the base")
                for row in batch:
                    if row.finish is None:
                        row.finish = "error"
                        row.emit(("error", f"generation failed: {type(exc).__name__}"))

    def _model_for(self, serve_name: Optional[str], folder: Optional[Path]):
        """The base with ``serve_name``'s adapter attached (the one already attached stays)."""
        from farm.models import attach_saved, read_adapter, unload_adapter

        if self.attached[0] == serve_name:
            return self.attached[1]
        if self.attached[0] is not None:
            unload_adapter(self.attached[1])
            self.attached = (None, self.base)
        if serve_name is None:
            return self.base
        with self._loaded_lock:
            entry = self.loaded.get(serve_name)
            if entry is not None:
                self.loaded.move_to_end(serve_name)
        if entry is None:
            config, tensors = read_adapter(folder)
            entry = (config, {k: v.to(self.placement.device) for k, v in tensors.items()})
            with self._loaded_lock:
                self.loaded[serve_name] = entry
                while len(self.loaded) > self.settings.max_loaded_adapters:
                    self.loaded.popitem(last=False)
        config, tensors = entry
        model = attach_saved(self.base, config, tensors).eval()  # on failure the base stays bare
        self.attached = (serve_name, model)
        return model

    def _generate(self, rows: list[Row]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        model = self._model_for(rows[0].adapter, rows[0].folder)
        device = self.placement.device
        width = max(len(r.prompt) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token is at the end
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        engine = self

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                for row, token in zip(rows, value.reshape(-1).tolist()):
                    if row.finish is None:
                        engine._advance(row, int(token))

            def end(self):
                for row in rows:
                    if row.finish is None:
                        engine._close(row, "length")

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([r.finish is not None or r.cancelled for r in rows], device=input_ids.device)

        sampling = rows[0].sampling
        options: dict[str, Any] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        if sampling.ignore_eos:
            options["eos_token_id"] = None  # no row ends at EOS; each stops at its own max_tokens
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=max(r.max_new_tokens for r in rows), pad_token_id=pad,
                           streamer=Streamer(), stopping_criteria=StoppingCriteriaList([RowsDone()]),
                           use_cache=True, **options)

    def _advance(self, row: Row, token: int) -> None:
        """One new token of ``row``: text out, and the row closed at EOS, a stop string or its limit."""
        row.tokens.append(token)
        if token in self.eos_ids and not row.sampling.ignore_eos:
            self._close(row, "stop")
            return
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in row.stop:
            at = text.find(stop)
            if at >= 0:
                row.text = text[:at]
                self._close(row, "stop")
                return
        row.text = text
        # Hold back a partial character (a multi-byte one split across tokens) and anything a
        # stop string could still begin with.
        safe = len(text.rstrip("\ufffd"))
        for stop in row.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe > row.sent:
            row.emit(("text", text[row.sent:safe], len(row.tokens)))
            row.sent = safe
        if len(row.tokens) >= row.max_new_tokens:
            self._close(row, "length")

    def _close(self, row: Row, reason: str) -> None:
        row.finish = reason
        if len(row.text) > row.sent:
            row.emit(("text", row.text[row.sent:], len(row.tokens)))
            row.sent = len(row.text)
        row.emit(("done", reason, len(row.tokens)))


# -- the HTTP app ----------------------------------------------------------------------------------------
def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{name}: expected a number in {low}..{high}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, default: Optional[int]) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(400, f"{name}: expected an integer in {low}..{high}", param=name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise APIError(400, f"{name}: expected true or false", param=name)
    return value


def _prompts(engine: Engine, body: dict, kind: str) -> list[list[int]]:
    tokenizer = engine.tokenizer
    if kind == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise APIError(400, "messages: a non-empty list of {role, content} with text content", param="messages")
        ids = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        return [list(ids)]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenizer(prompt).input_ids]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        if any(not 0 <= p < len(tokenizer) for p in prompt):
            raise APIError(400, "prompt: token ids must be in the vocabulary", param="prompt")
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer(p).input_ids for p in prompt]
    raise APIError(400, "prompt: a string, a list of strings or a list of token ids", param="prompt")


def create_app(settings: ServerSettings, resolver, api_key: str, engine: Engine | None = None):
    """The backend's ASGI app. ``resolver``: a ``farm.serving.resolver.FarmResolverCore`` with
    ``backend="transformers"``; ``api_key``: what callers send as ``Authorization: Bearer``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from farm.methods import method_info
    from farm.serving.errors import handled
    from farm.serving.resolver import AdapterRefused

    state: dict[str, Engine] = {}
    if engine is not None:
        state["engine"] = engine

    def authorized(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key", "authentication_error")

    async def read_body(request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise APIError(400, "body: not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "body: expected a JSON object")
        return body

    async def adapter_of(model: Any) -> tuple[Optional[str], Optional[Path], bool]:
        """(serve name, local folder, whether its rows may be padded into batches)."""
        if not isinstance(model, str) or not model:
            raise APIError(400, "model: required, a string", param="model")
        if model == settings.name:
            return None, None, True
        try:
            found = await asyncio.to_thread(resolver.resolve, settings.base_model, model)
        except AdapterRefused as exc:
            raise APIError(400, str(exc), param="model") from None
        if found is None:
            raise APIError(404, f"The model `{model[:300]}` does not exist.", "NotFoundError", param="model")
        info, folder = found
        return info["serve_name"], folder, method_info(info["method"]).pads_batches

    async def generate(request: Request, kind: str) -> Response:
        authorized(request)
        body = await read_body(request)
        unknown = sorted(set(body) - FIELDS[kind] - IGNORED_FIELDS)
        if unknown:
            raise APIError(400, f"{unknown[0]}: not supported by the transformers backend", param=unknown[0])
        engine = state["engine"]
        serve_name, folder, padded = await adapter_of(body.get("model"))
        prompts = _prompts(engine, body, kind)
        limit_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        room = settings.max_model_len - max(len(p) for p in prompts)
        max_new = _integer(body, limit_field, 1, settings.max_model_len, None)
        if room < 1 or (max_new is not None and max_new > room):
            raise APIError(400, f"{limit_field}: the prompt ({settings.max_model_len - room} tokens) plus "
                                f"{max_new or 1} new tokens exceed this server's context of "
                                f"{settings.max_model_len}", param=limit_field)
        max_new = max_new or min(room, 16 if kind == "completions" else room)
        n = _integer(body, "n", 1, 16, 1)
        sampling = Sampling(temperature=_number(body, "temperature", 0, 2, 1.0), top_p=_number(body, "top_p", 0, 1, 1.0),
                            top_k=max(0, _integer(body, "top_k", -1, 100_000, 0)),  # -1 or 0: off (vLLM's -1)
                            seed=_integer(body, "seed", 0, 2**63 - 1, None),
                            ignore_eos=_flag(body, "ignore_eos"))
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 16 or not all(
                isinstance(s, str) and 0 < len(s) <= 200 for s in stop)):
            raise APIError(400, "stop: a string or up to 16 strings", param="stop")
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options: an object", param="stream_options")
        with_ids = _flag(body, "return_token_ids")
        loop = asyncio.get_running_loop()
        rows = [Row(serve_name, folder, prompt, max_new, sampling, tuple(stop or ()), i * n + j, loop, padded=padded)
                for i, prompt in enumerate(prompts) for j in range(n)]
        engine.submit(rows)
        prompt_tokens = sum(len(p) for p in prompts)
        ident = f"{'chatcmpl' if kind != 'completions' else 'cmpl'}-{uuid.uuid4().hex}"
        created, model_name = int(time.time()), body["model"]

        def usage(completion: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if not stream:
            try:
                outcomes = await asyncio.gather(*(_collect(row) for row in rows))
            finally:
                for row in rows:
                    row.cancelled = True
            choices = []
            for row, (text, reason) in zip(rows, outcomes):
                if reason == "error":
                    raise APIError(500, "generation failed", "internal_error")
                choices.append({"index": row.index, "text": text, "logprobs": None, "finish_reason": reason}
                               if kind == "completions" else
                               {"index": row.index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
                if with_ids:  # vLLM's extension, same names
                    choices[-1].update(prompt_token_ids=row.prompt, token_ids=row.tokens)
            return JSONResponse({"id": ident, "object": "text_completion" if kind == "completions" else "chat.completion",
                                 "created": created, "model": model_name, "choices": choices,
                                 "usage": usage(sum(len(r.tokens) for r in rows))})

        continuous = bool(options.get("continuous_usage_stats"))
        include_usage = bool(options.get("include_usage")) or continuous
        chunk_object = "text_completion" if kind == "completions" else "chat.completion.chunk"

        def event(choice: dict, with_usage: bool) -> bytes:
            payload = {"id": ident, "object": chunk_object, "created": created, "model": model_name,
                       "choices": [choice]}
            if with_usage:
                payload["usage"] = usage(sum(len(r.tokens) for r in rows))
            return f"data: {json.dumps(payload)}\n\n".encode()

        async def events():
            try:
                if kind != "completions":
                    for row in rows:
                        yield event({"index": row.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}, continuous)
                merged = asyncio.Queue()

                async def follow(row: Row):
                    while True:
                        item = await row.events.get()
                        await merged.put((row, item))
                        if item[0] in ("done", "error"):
                            return

                followers = [asyncio.create_task(follow(row)) for row in rows]
                open_rows = len(rows)
                while open_rows:
                    row, item = await merged.get()
                    extra = {}
                    if with_ids and item[0] != "error":
                        extra["token_ids"] = row.tokens[row.tokens_sent:item[2]]
                        row.tokens_sent = item[2]
                    if item[0] == "text":
                        delta = {"text": item[1]} if kind == "completions" else {"delta": {"content": item[1]}}
                        yield event({"index": row.index, **delta, "logprobs": None, "finish_reason": None, **extra},
                                    continuous)
                    else:
                        open_rows -= 1
                        reason = item[1] if item[0] == "done" else "error"
                        closing = {"text": ""} if kind == "completions" else {"delta": {}}
                        yield event({"index": row.index, **closing, "logprobs": None, "finish_reason": reason,
                                     **extra}, continuous)
                for task in followers:
                    task.cancel()
                if include_usage:
                    payload = {"id": ident, "object": chunk_object, "created": created, "model": model_name,
                               "choices": [], "usage": usage(sum(len(r.tokens) for r in rows))}
                    yield f"data: {json.dumps(payload)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:  # the client went away, or the stream ended: stop generating for it
                for row in rows:
                    row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def completions(request: Request) -> Response:
        return await generate(request, "completions")

    async def chat(request: Request) -> Response:
        return await generate(request, "chat/completions")

    async def models(request: Request) -> Response:
        authorized(request)
        engine = state["engine"]
        now = int(time.time())
        data = [{"id": settings.name, "object": "model", "created": now, "owned_by": "farm", "root": settings.base_model}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": "farm", "root": settings.name,
                  "parent": settings.name} for name in engine.loaded_names()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return Response(status_code=200 if "engine" in state else 503)

    async def anything_else(request: Request) -> Response:
        raise APIError(404, "not found", "NotFoundError")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        owned = "engine" not in state
        if owned:
            state["engine"] = await asyncio.to_thread(Engine, settings)
        try:
            yield
        finally:
            if owned:
                state.pop("engine").stop()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(routes=[
        Route("/health", handled(health, logger), methods=["GET"]),
        Route("/v1/models", handled(models, logger), methods=["GET"]),
        Route("/v1/completions", handled(completions, logger), methods=["POST"]),
        Route("/v1/chat/completions", handled(chat, logger), methods=["POST"]),
        Route("/{path:path}", handled(anything_else, logger), methods=methods),
    ], lifespan=lifespan)
    app.state.engine = lambda: state.get("engine")
    return app


async def _collect(row: Row) -> tuple[str, str]:
    """A row's whole text and finish reason (non-streamed answers)."""
    while True:
        item = await row.events.get()
        if item[0] == "done":
            return row.text, item[1]
        if item[0] == "error":
            return "", "error"


def main(argv: list[str] | None = None) -> int:
    """``python -m farm.serving.transformers_server``: serve until interrupted."""
    import ipaddress

    import uvicorn

    from farm.serving.resolver import AdapterCache, FarmResolverCore, cache_dir_from_env, source_from_env

    parser = argparse.ArgumentParser(prog="farm-transformers-server", description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--behind-gateway", action="store_true", help="allow a non-loopback --host")
    parser.add_argument("--max-loaded-adapters", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.behind_gateway:
        parser.error(f"--host {args.host} is not loopback; this server trusts its caller (farm gateway): "
                     "add --behind-gateway when only the gateway can reach it")
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        parser.error(f"{API_KEY_ENV} is not set: the server needs an API key (never on the command line)")
    source = source_from_env()
    if source is None:
        parser.error("set FARM_REGISTRY_URL (+ FARM_REGISTRY_TOKEN) or FARM_REGISTRY_STORE")
    settings = ServerSettings(base_model=args.base_model, served_model_name=args.served_model_name,
                              max_loaded_adapters=args.max_loaded_adapters, max_batch_size=args.max_batch_size,
                              max_model_len=args.max_model_len, precision=args.precision)
    resolver = FarmResolverCore(source, AdapterCache(cache_dir_from_env()), backend="transformers")
    uvicorn.run(create_app(settings, resolver, api_key), host=args.host, port=args.port, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
