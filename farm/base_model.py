"""Build a tiny Llama-architecture base model that works offline.

    farm base-model build --out .farm/base-model [--layers 2 --hidden 256 --heads 4 --vocab 1024]
    farm base-model build --out /tmp/base --random      # random weights: fast, for tests

Nothing is downloaded: a byte-level BPE tokenizer is trained (with the `tokenizers` library)
on the sample tenants' text and the pretraining corpus, a chat template is set, and a
``LlamaForCausalLM`` is pretrained on simple English from a grammar (``farm.base_corpus``), a
bounded number of steps, deterministically (same settings and machine: same weights), then
written as safetensors. Heads are 64 wide (``hidden / heads == 64``) because that is a head
size vLLM's kernels serve. The folder loads like any hub model, through the same code path
real bases take (``farm.models.load_base_model``).

Why pretrain at all: on a random base a rank-8 adapter must learn the language itself and
looks far worse than full fine-tuning; on a base that knows the words and the turn
structure it only has to learn the tenant's style, which is what the demo exists to show.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")

#: Jinja chat template: every turn is "<|role|>\n{content}<|end|>\n"; the generation prompt
#: opens an assistant turn. Tool definitions (``tools``) open the conversation as a system turn,
#: and an assistant's tool calls follow its content as ``<tool_call>{"name": ..., "arguments":
#: {...}}</tool_call>``; tool results are ``tool`` turns. Rendering is prefix-stable, which
#: label masking relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\\nTools: ' + (tools | tojson) + eos_token + '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson) + '</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Dimensions of the tiny base model."""

    layers: int = 2          # transformer blocks
    hidden: int = 256        # model width; must equal 64 x heads
    heads: int = 4           # attention heads of width 64
    kv_heads: int = 4        # key/value heads (grouped-query attention when fewer)
    intermediate: int = 512  # MLP width
    vocab: int = 1024        # tokenizer vocabulary, special tokens included
    max_positions: int = 2048
    seed: int = 0            # weight initialisation

    def validate(self) -> None:
        """Raise ``ValueError`` for dimensions vLLM could not serve or that do not fit."""
        if self.hidden != 64 * self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be 64 x heads ({self.heads}) so that "
                             "head_dim is 64, which vLLM serves")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.vocab < 300:
            raise ValueError(f"vocab ({self.vocab}) must be at least 300: 256 byte tokens + specials + merges")
        if self.layers < 1:
            raise ValueError("layers must be at least 1")


@dataclass(frozen=True)
class PretrainConfig:
    """The bounded pretraining run of the tiny base (a few minutes on 2 CPU cores)."""

    steps: int = 400             # optimizer steps (about 2 minutes on 2 CPU cores)
    batch_size: int = 16         # rows per step
    seq_len: int = 128           # tokens per row (documents packed back to back)
    learning_rate: float = 3e-3  # peak AdamW rate: tiny models take a large one
    warmup_steps: int = 30
    corpus_seed: int = 0         # which grammar stream (farm.base_corpus.documents)
    log_every: int = 50

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot train."""
        if min(self.steps, self.batch_size, self.seq_len, self.log_every) < 1:
            raise ValueError("steps, batch_size, seq_len and log_every must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be between 0 and 1")


def train_tokenizer(vocab: int, texts):
    """Train a byte-level BPE tokenizer on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base_model(out: Path, config: TinyModelConfig = TinyModelConfig(),
                     pretrain: PretrainConfig | None = None, log: TextIO | None = None) -> Path:
    """Write tokenizer, config and safetensors weights of a tiny Llama into ``out``.

    ``pretrain`` None keeps the random initial weights (what most tests want: fast); otherwise
    the model is pretrained on ``farm.base_corpus`` first, with progress lines on ``log``.
    The folder appears whole or not at all: it is built beside ``out`` and renamed into place,
    so an interrupted build never leaves a half-written base that later runs would load.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from farm.base_corpus import documents
    config.validate()
    if pretrain is not None:
        pretrain.validate()
    # The tokenizer learns its merges from the pretraining corpus alone: every token it has is
    # then seen in pretraining (a token that never is keeps a logit pushed down for good, which
    # an adapter on the linear layers can hardly lift).
    tokenizer = train_tokenizer(config.vocab, _tokenizer_texts(documents()))
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads, head_dim=64, max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    record: dict = {**asdict(config), "pretrain": None}
    if pretrain is not None:
        record["pretrain"] = {**asdict(pretrain), **pretrain_model(model, tokenizer, pretrain, log)}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "farm_base_model.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():  # replaced whole: move the old one aside first, then drop it
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(retired / out.name)
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _tokenizer_texts(corpus, corpus_documents: int = 20_000):
    """What the tokenizer learns its merges from: the corpus's first documents' text."""
    for _, document in zip(range(corpus_documents), corpus):
        if isinstance(document, str):
            yield document
        else:
            yield from (message["content"] for message in document)


def corpus_token_rows(tokenizer, rows: int, seq_len: int, seed: int = 0):
    """``rows`` x ``seq_len + 1`` token ids: corpus documents rendered and packed back to back.

    Conversations are rendered with the base's own chat template (so the model learns the turn
    structure and to end an answer with ``<|end|>``); stories are framed by bos/eos, as the
    farm's data pipeline frames plain text.
    """
    import torch

    from farm.base_corpus import documents

    need = rows * (seq_len + 1)
    stream: list[int] = []
    for document in documents(seed):
        if isinstance(document, str):
            ids = [tokenizer.bos_token_id, *tokenizer(document, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
        else:
            text = tokenizer.apply_chat_template(document, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += ids
        if len(stream) >= need:
            break
    return torch.tensor(stream[:need]).view(rows, seq_len + 1)


def pretrain_model(model, tokenizer, settings: PretrainConfig, log: TextIO | None = None) -> dict:
    """Pretrain ``model`` in place on the grammar corpus; returns what the build records.

    Deterministic for a given machine and thread count: seeded data, fixed order, no dropout.
    """
    import torch

    log = log or sys.stderr
    rows = corpus_token_rows(tokenizer, settings.steps * settings.batch_size, settings.seq_len,
                             settings.corpus_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01,
                                  betas=(0.9, 0.95))

    def factor(step: int) -> float:  # linear warm-up, then cosine to a tenth of the peak
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        done = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    from farm.base_corpus import heldout_prose

    prose = heldout_prose()  # what the build reports it learnt: loss on prose it never saw, before and after
    prose_before = prose_loss(model, tokenizer, prose)
    model.train()
    started, window = time.monotonic(), []
    print(f"pretraining the base: {settings.steps} steps x {settings.batch_size} rows x "
          f"{settings.seq_len} tokens", file=log, flush=True)
    for step in range(settings.steps):
        batch = rows[step * settings.batch_size:(step + 1) * settings.batch_size]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.monotonic() - started
            left = elapsed / (step + 1) * (settings.steps - step - 1)
            print(f"  step {step + 1:>5}/{settings.steps}  loss {sum(window) / len(window):.3f}  "
                  f"{elapsed:5.0f} s  (about {left:.0f} s left)", file=log, flush=True)
            window = []
    seconds = round(time.monotonic() - started, 1)
    return {"final_loss": round(loss.item(), 4), "seconds": seconds,
            "heldout_prose_loss": {"before": round(prose_before, 3),
                                   "after": round(prose_loss(model, tokenizer, prose), 3)}}


def prose_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss of ``model`` on plain ``texts`` (each framed by bos/eos)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
            batch = torch.tensor([ids])
            loss = model(input_ids=batch, labels=batch).loss
            total += loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    return total / count
