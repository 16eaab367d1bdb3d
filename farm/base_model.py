"""Build a tiny Llama-architecture base model that works offline.

    farm base-model build --out .farm/base-model [--layers 2 --hidden 256 --heads 4 --vocab 1024]

Nothing is downloaded: a byte-level BPE tokenizer is trained (with the `tokenizers` library)
on the sample tenants' text, a chat template is set, and a ``LlamaForCausalLM`` with random
weights is written as safetensors. Heads are 64 wide (``hidden / heads == 64``) because that
is a head size vLLM's kernels serve. The folder loads like any hub model, through the same
code path real bases take (``farm.models.load_base_model``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

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


def build_base_model(out: Path, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write tokenizer, config and random safetensors weights of a tiny Llama into ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from farm.samples import corpus_text

    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(config.vocab, corpus_text())
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
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "farm_base_model.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out
