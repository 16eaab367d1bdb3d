"""Memory planner: what one device needs to fine-tune a model, estimated before anything runs.

The planner works from the model's shape alone (a preset or a transformers ``config.json``), so
it never loads weights or imports torch. Sizes are bytes; "GB" in its output is GiB (2**30
bytes), the unit nvidia-smi and operators quote. Notation: P total parameters, N data-parallel
devices (the ranks ZeRO partitions over), b bytes per weight element (bf16 2, fp32 4),
T = batch * seq_len tokens per micro-batch, h hidden, I intermediate, V vocab, L layers.

Full fine-tuning (per device, before ZeRO)::

    adamw, bf16       weights 2P  grads 2P  optimizer 12P  (fp32 master + m + v: ZeRO paper, K=12)
    adamw, fp32       weights 4P  grads 4P  optimizer  8P  (m + v; the weights are the master)
    adamw-bf16        weights 2P  grads 2P  optimizer  4P  (bf16 m + v, no master copy)

ZeRO (Rajbhandari et al. 2020) divides by N: stage 1 the optimizer states, stage 2 also the
gradients, stage 3 also the weights (stage 0 is plain DDP). Stage 3 adds the working set of
gathered weights, about 2 layers at b bytes (the layer computing plus the one prefetched).
``offload="cpu"`` moves the optimizer partition to host memory; from stage 2 also the gradient
partition (fp32 for mixed-precision Adam), the device keeping two reduce buckets of 5e8 elements
(DeepSpeed's ``reduce_bucket_size``) = min(bP, 2 * 5e8 * b); at stage 3 also the weight partition
(``offload_param``), the device keeping only the gathered working set.

LoRA: frozen weights bP; adapter A = sum over layers and targeted linears of r * (in + out),
kept in fp32 by PEFT (autocast computes in bf16): weights 4A, grads 4A, Adam m + v 8A (4A with
adamw-bf16). QLoRA stores the layers' linear weights in NF4 with double quantisation: 4 bits +
one fp8 scale per 64-block + one fp32 scale per 256 blocks = 0.5 + 1/64 + 4/(64*256) B/param;
embeddings, lm_head and norms stay at b. ZeRO stages do not apply to LoRA (a replica per rank).

Activations (element size a = b), attention through SDPA/flash (no seq_len^2 score matrix)::

    per layer per token  4h + 3*heads*hd + 3*kv*hd + 4I (+ r per LoRA target), listed in code
    head                 T * V * (a + 4 + 4): logits, their fp32 upcast for the loss (only if
                         a < 4) and the fp32 cross-entropy gradient
    no checkpointing     L * per_layer * T * a + head
    checkpointing        L * h * T * a + max(head, per_layer * T * a)

With checkpointing the output head's tensors are freed before the first layer is recomputed,
so the peak holds the layer inputs plus the larger of the two, not their sum. LoRA's r-wide
intermediates are part of a layer's count, so checkpointing keeps them for one layer only;
lora_dropout is taken as 0 (with dropout each adapter also keeps its dropped input). Gradient
accumulation does not change memory: gradients accumulate in place. A runtime line covers the
CUDA context, cuBLAS workspace and NCCL buffers (0.5 GiB on GPU, i.e. bf16 plans) or, for fp32
CPU runs, the process itself (0.75 GiB: measured on the farm's tiny CPU runs, about 0.45 GiB of
interpreter and libraries before the model loads plus 0.3 GiB of oneDNN, OpenMP and allocator
arenas after the first step), unless ``runtime_bytes`` is given. On CPU, attention with a packed
mask takes the math path, whose seq_len^2 scores the planner does not count.

The published figures, reproduced by the tests (Llama 3.1 8B, batch 1, 512 tokens, gradient
checkpointing): LoRA r=16 on every linear layer needs about 16 GB (15.0 bf16 weights + 0.6
adapter state + activations + runtime); a full fine-tune needs about 60 GB when weights,
gradients and both AdamW moments are bf16 with no fp32 master copy (8 B/param = 59.8 GB),
and about 120 GB with ZeRO's mixed-precision AdamW (16 B/param) on one device.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # rich is only needed to render; keep the import cost off plain planning
    from rich.table import Table

GiB = 2**30

#: DeepSpeed's default reduce_bucket_size (elements); two buckets are in flight when offloading.
REDUCE_BUCKET_ELEMENTS = 500_000_000
#: NF4 with double quantisation: 4-bit codes, fp8 absmax per 64 weights, fp32 per 256 absmax.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A model or request the planner cannot work with; the message says what and where."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linears as ``name -> (in_features, out_features)`` (Llama: no biases)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_parameters(self) -> int:
        """Parameters of one layer's linears (what QLoRA quantises)."""
        return sum(i * o for i, o in self.linear_shapes().values())

    def parameters(self) -> int:
        """Total parameters: embeddings, layers (linears + 2 RMSNorms), final norm, lm_head."""
        embed = self.vocab * self.hidden
        per_layer = self.layer_linear_parameters() + 2 * self.hidden
        return embed + self.layers * per_layer + self.hidden + (0 if self.tied_embeddings else embed)


PRESETS: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", hidden=4096, intermediate=14336, layers=32, heads=32,
                               kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False),
    "llama-3.1-70b": ModelShape("llama-3.1-70b", hidden=8192, intermediate=28672, layers=80, heads=64,
                                kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False),
}


def load_shape(model: str) -> ModelShape:
    """A preset name, or a path to a ``config.json`` or to a folder holding one."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) "
                        f"and no config.json at {path}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise PlanError(f"{path}: expected a JSON object")
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the decoder's keys nested

    def field(key: str, default: int | None = None) -> int:
        value = config.get(key, default)
        if value is None:
            raise PlanError(f"{path}: missing field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{path}: field {key!r} must be a positive integer, got {value!r}")
        return value

    hidden, heads = field("hidden_size"), field("num_attention_heads")
    name = path.parent.name if path.name == "config.json" else path.stem
    return ModelShape(name=name or str(path), hidden=hidden, intermediate=field("intermediate_size"),
                      layers=field("num_hidden_layers"), heads=heads,
                      kv_heads=field("num_key_value_heads", heads),
                      head_dim=field("head_dim", hidden // heads), vocab=field("vocab_size"),
                      tied_embeddings=bool(config.get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class PlanRequest:
    """How the job trains; every field that changes per-device memory."""

    method: Literal["full", "lora", "qlora"] = "lora"
    zero_stage: Literal[0, 1, 2, 3] = 0  # full fine-tuning only; LoRA ignores it
    offload: Literal["none", "cpu"] = "none"
    devices: int = 1  # data-parallel ranks that ZeRO (full) or FSDP (shard_base) partitions over
    rank: int = 16
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    batch: int = 1  # sequences per micro-batch per device
    seq_len: int = 512  # tokens per row; the farm's packed rows are usually this size or less
    grad_accum: int = 1  # recorded only: accumulation adds into the same gradient buffers
    gradient_checkpointing: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"  # fp32 is what CPU runs use
    optimizer: Literal["adamw", "adamw-bf16"] = "adamw"
    runtime_bytes: int | None = None  # framework overhead per device; None: see module docstring
    # Other PEFT methods (farm.methods.MethodInfo.plan_fields says which fields each sets):
    dora: bool = False  # DoRA: LoRA + magnitudes, and a weight-sized B·A product per adapted linear
    adapter_params: int | None = None  # IA3, prefix, prompt: their trainable count (None: LoRA's formula)
    extra_tokens: int = 0  # virtual tokens prefix and prompt tuning add to every row
    label: str | None = None  # the PEFT method as tables show it (default: method)
    shard_base: bool = False  # adapters: the frozen base and the adapter sharded over ``devices`` (FSDP2)


@dataclass(frozen=True)
class MemoryLine:
    name: str
    bytes: int
    note: str  # how the figure was computed, for people


@dataclass(frozen=True)
class MemoryPlan:
    request: PlanRequest
    model: ModelShape
    lines: tuple[MemoryLine, ...]  # per device
    cpu_offload_bytes: int  # host memory per rank holding what offload moved off the device
    trainable_params: int
    total_params: int
    assumptions: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def total_gb(self) -> float:
        return round(self.total_bytes / GiB, 2)

    def line(self, name: str) -> MemoryLine:
        """The line called ``name`` (KeyError if the plan has none)."""
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(name)

    def fits(self, device_bytes: int) -> bool:
        """Whether the job fits a device of ``device_bytes``."""
        return self.total_bytes <= device_bytes

    def to_json(self) -> dict:
        """A JSON-ready dict; device-free (callers add ``device_gb`` and ``fits``)."""
        request = asdict(self.request)
        if isinstance(self.request.target_modules, tuple):
            request["target_modules"] = list(self.request.target_modules)
        return {"model": asdict(self.model), "request": request,
                "lines": [{"name": x.name, "bytes": x.bytes, "gb": round(x.bytes / GiB, 2),
                           "note": x.note} for x in self.lines],
                "total_bytes": self.total_bytes, "total_gb": self.total_gb,
                "cpu_offload_bytes": self.cpu_offload_bytes,
                "cpu_offload_gb": round(self.cpu_offload_bytes / GiB, 2),
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "assumptions": list(self.assumptions)}


def _targets(model: ModelShape, target_modules: tuple[str, ...] | str) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return LINEARS  # PEFT's all-linear: every linear in the layers, never lm_head
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = sorted(set(targets) - set(LINEARS))
    if unknown or not targets:
        raise PlanError(f"target_modules {list(targets)!r}: expected 'all-linear' or names "
                        f"among {', '.join(LINEARS)}")
    return targets


def lora_parameters(model: ModelShape, rank: int, target_modules: tuple[str, ...] | str) -> int:
    """Adapter parameters: r * (in + out) per targeted linear (A is r x in, B is out x r)."""
    shapes = model.linear_shapes()
    return model.layers * sum(rank * sum(shapes[t]) for t in _targets(model, target_modules))


def _ceil_div(x: int, n: int) -> int:
    return -(-x // n)


def _activation_line(model: ModelShape, r: PlanRequest, a: int, lora_targets: int) -> MemoryLine:
    h, i = model.hidden, model.intermediate
    q, kv = model.heads * model.head_dim, model.kv_heads * model.head_dim
    per_layer = (  # elements per token one Llama block saves for backward
        h            # input of the attention RMSNorm (the residual stream)
        + h          # its normed output: input of q/k/v
        + q + kv + kv  # q, k, v projections
        + q + kv     # q and k after RoPE: what SDPA saves (its logsumexp is negligible)
        + q          # attention output: input of o_proj
        + h          # residual after attention: input of the MLP RMSNorm
        + h          # its normed output: input of gate/up
        + i + i      # gate, up
        + i          # silu(gate)
        + i          # silu(gate) * up: input of down_proj
        + r.rank * lora_targets  # each adapter's A x, input of B (LoRA only)
    )
    tokens = r.batch * (r.seq_len + r.extra_tokens)
    # Logits at a, their fp32 copy for the loss (none when already fp32), the fp32 gradient.
    head = tokens * model.vocab * (a + (4 if a < 4 else 0) + 4)
    if r.gradient_checkpointing:
        kept = model.layers * h * tokens * a
        layer = per_layer * tokens * a
        return MemoryLine("activations", kept + max(head, layer),
                          f"{model.layers} layer inputs x {tokens} tok x {h} x {a} B + max(head "
                          f"{tokens} tok x {model.vocab} vocab, one recomputed layer "
                          f"{per_layer}/tok)")
    return MemoryLine("activations", model.layers * per_layer * tokens * a + head,
                      f"{model.layers} layers x {per_layer}/tok x {tokens} tok x {a} B + head "
                      f"{tokens} tok x {model.vocab} vocab")


def _full_states(model: ModelShape, r: PlanRequest, b: int, notes: list[str]) -> tuple[list[MemoryLine], int]:
    """Weights, gradients and optimizer states of full fine-tuning under ZeRO; and host bytes."""
    p, n, s = model.parameters(), r.devices, r.zero_stage
    opt = 4 if r.optimizer == "adamw-bf16" else (12 if b == 2 else 8)
    notes.append({12: "mixed-precision Adam (ZeRO paper, K=12): bf16 weights and grads, fp32 master, "
                      "m and v = 16 B/param",
                  8: "fp32 Adam: fp32 weights, grads, m and v = 16 B/param",
                  4: "pure bf16 AdamW: bf16 weights, grads, m and v, no master copy = 8 B/param"}[opt])

    def share(per_param: int, stage: int, what: str) -> tuple[int, str]:
        """ZeRO stage ``stage`` and up partition this state over the N ranks."""
        if s >= stage:
            return _ceil_div(per_param * p, n), f"{per_param} B x {p} {what} / {n} devices"
        return per_param * p, f"{per_param} B x {p} {what}"

    (w, w_note), (g, g_note), (o, o_note) = share(b, 3, "params"), share(b, 2, "grads"), \
        share(opt, 1, "optimizer")
    host = 0
    if r.offload == "cpu":
        host, o, o_note = o, 0, o_note + ", on host"
        if s >= 2:  # ZeRO-Offload keeps the (fp32 for mixed Adam) gradient partition on the host
            host += _ceil_div((4 if r.optimizer == "adamw" else b) * p, n)
            g = min(b * p, 2 * REDUCE_BUCKET_ELEMENTS * b)
            g_note = f"2 reduce buckets x {REDUCE_BUCKET_ELEMENTS:.0e} x {b} B (partition on host)"
        if s == 3:  # offload_param: the device keeps only the gathered working set
            host, w, w_note = host + w, 0, w_note + ", on host"
    lines = [MemoryLine("weights", w, w_note)]
    if s == 3:
        layer = model.layer_linear_parameters() + 2 * model.hidden
        lines.append(MemoryLine("gathered weights", min(2, model.layers) * layer * b,
                                f"ZeRO-3 working set: 2 layers x {layer} params x {b} B"))
        notes.append("ZeRO-3 gathers about 2 layers at a time (the one computing + prefetch)")
    if s:
        notes.append(f"ZeRO stage {s} over {n} devices" + (", CPU offload" if r.offload == "cpu" else ""))
    return lines + [MemoryLine("gradients", g, g_note), MemoryLine("optimizer states", o, o_note)], host


def adapter_parameters(model: ModelShape, r: PlanRequest, targets: tuple[str, ...]) -> int:
    """Trainable parameters of the request's adapter (LoRA's formula unless it gives a count;
    DoRA adds one magnitude per output feature of each adapted linear)."""
    if r.adapter_params is not None:
        return r.adapter_params
    count = lora_parameters(model, r.rank, targets)
    if r.dora:
        shapes = model.linear_shapes()
        count += model.layers * sum(shapes[t][1] for t in targets)
    return count


def _adapter_states(model: ModelShape, r: PlanRequest, b: int, targets: tuple[str, ...],
                    notes: list[str]) -> tuple[list[MemoryLine], int]:
    """Frozen (maybe quantised) weights plus the fp32 adapter's weights, grads, Adam states."""
    p, a = model.parameters(), adapter_parameters(model, r, targets)
    if r.method == "qlora":
        quantised = model.layers * model.layer_linear_parameters()
        w = math.ceil(quantised * NF4_BYTES_PER_PARAM) + (p - quantised) * b
        w_note = f"{quantised} x {NF4_BYTES_PER_PARAM:.4f} B (NF4, double quant) + {p - quantised} x {b} B"
        notes.append("QLoRA: NF4 + double quantisation for the layers' linears; embeddings, lm_head "
                     "and norms unquantised")
    else:
        w, w_note = b * p, f"{b} B x {p} frozen params"
    sharded = r.shard_base and r.devices > 1 and r.method != "qlora"
    n = r.devices if sharded else 1
    opt = 4 if r.optimizer == "adamw-bf16" else 8
    o, o_note, host = _ceil_div(opt * a, n), f"Adam m + v, {opt} B x {a}" + (f" / {n}" if sharded else ""), 0
    if r.offload == "cpu":
        host, o, o_note = o, 0, o_note + ", on host"
    notes.append("adapter weights, grads and Adam states in fp32 (PEFT keeps adapters fp32 under "
                 "autocast)")
    notes.append("lora_dropout = 0: with dropout each adapter also keeps its dropped input")
    lines = [MemoryLine("weights", _ceil_div(w, n), w_note + (f" / {n} devices (FSDP)" if sharded else ""))]
    if sharded:
        layer = model.layer_linear_parameters() + 2 * model.hidden
        lines.append(MemoryLine("gathered weights", min(2, model.layers) * layer * b,
                                f"FSDP working set: 2 layers x {layer} params x {b} B"))
        notes.append(f"shard_base: the base and the adapter sharded over {n} devices (FSDP2); about 2 "
                     "layers gathered at a time (the one computing + prefetch)")
    elif r.zero_stage or r.devices > 1:
        notes.append("without shard_base every rank holds a full replica of the base (data parallel)")
    what = (f"r={r.rank} on {len(targets)} linears x {model.layers} layers" if r.adapter_params is None
            else "the method's own count")
    per = f" / {n}" if sharded else ""
    return lines + [MemoryLine("adapter", _ceil_div(4 * a, n), f"4 B x {a} ({what}){per}"),
                    MemoryLine("gradients", _ceil_div(4 * a, n), f"4 B x {a} adapter params{per}"),
                    MemoryLine("optimizer states", o, o_note)], host


def plan_memory(model: ModelShape, request: PlanRequest) -> MemoryPlan:
    """Per-device memory of fine-tuning ``model`` as ``request`` says (formulas: module doc)."""
    r = request
    for name in ("devices", "rank", "batch", "seq_len", "grad_accum"):
        if getattr(r, name) < 1:
            raise PlanError(f"{name} must be >= 1, got {getattr(r, name)}")
    if r.precision == "fp32" and r.optimizer == "adamw-bf16":
        raise PlanError("optimizer 'adamw-bf16' needs precision 'bf16'")
    if r.method == "full" and r.offload == "cpu" and r.zero_stage == 0:
        raise PlanError("offload 'cpu' needs zero_stage >= 1 (ZeRO-Offload)")
    b = 2 if r.precision == "bf16" else 4
    notes = ["GB are GiB (2**30 bytes)", "attention through SDPA/flash: no seq_len^2 scores",
             f"grad_accum={r.grad_accum} does not change memory (gradients accumulate in place)"]
    if r.method == "full":
        targets: tuple[str, ...] = ()
        lines, host = _full_states(model, r, b, notes)
        trainable = model.parameters()
    else:
        targets = () if r.adapter_params is not None else _targets(model, r.target_modules)
        lines, host = _adapter_states(model, r, b, targets, notes)
        trainable = adapter_parameters(model, r, targets)
    lines.append(_activation_line(model, r, b, len(targets)))
    if r.dora:
        shapes = model.linear_shapes()
        product = sum(shapes[t][0] * shapes[t][1] for t in targets) * 4
        kept = 1 if r.gradient_checkpointing else model.layers
        lines.append(MemoryLine("dora products", kept * product,
                                f"{kept} layer(s) x B·A of {len(targets)} linears in fp32, kept for backward"))
        notes.append("DoRA normalises W + B·A per output feature: one weight-sized fp32 product per "
                     "adapted linear lives until backward")
    notes.append(f"activations {'with' if r.gradient_checkpointing else 'without'} gradient "
                 f"checkpointing; the loss head's peak and a recomputed layer's do not overlap")
    if r.runtime_bytes is not None:
        runtime, how = r.runtime_bytes, "given"
    elif b == 2:  # bf16 plans are GPU plans
        runtime, how = GiB // 2, "GPU: CUDA context, cuBLAS workspace, NCCL buffers"
    else:
        runtime, how = int(0.75 * GiB), "CPU run: interpreter, torch/transformers/PEFT/DeepSpeed, kernel and allocator arenas"
    lines.append(MemoryLine("runtime", runtime, how))
    notes.append("allocator fragmentation beyond the runtime line is not modelled")
    return MemoryPlan(request=r, model=model, lines=tuple(lines), cpu_offload_bytes=host,
                      trainable_params=trainable, total_params=model.parameters(),
                      assumptions=tuple(notes))


_UNITS = {"": GiB, "b": 1, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}


def parse_size(text: str) -> int:
    """``"24GB"``, ``"80G"``, ``"16GiB"``, ``"1.5TB"``, ``"24"`` -> bytes (GB means GiB; bare GB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", str(text), re.IGNORECASE)
    if not match:
        raise PlanError(f"cannot read {text!r} as a size (e.g. 24GB, 80G, 1.5TB)")
    unit = (match.group(2) or match.group(3) or "").lower()
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise PlanError(f"size {text!r} must be positive")
    return size


def jobs_per_device(plan: MemoryPlan, device_bytes: int) -> int:
    """How many copies of this job fit on one device (each with its own runtime), 0 if none."""
    return device_bytes // plan.total_bytes if plan.total_bytes else 0


def devices_needed(model: ModelShape, request: PlanRequest, device_bytes: int,
                   max_devices: int = 1024) -> int | None:
    """The fewest data-parallel ranks at which the plan fits ``device_bytes``; None if none do.

    Memory never grows with N, so a binary search between 1 and ``max_devices`` is exact.
    Only ZeRO-partitioned full fine-tuning actually shrinks; otherwise the answer is 1 or None.
    """
    def fits(n: int) -> bool:
        return plan_memory(model, replace(request, devices=n)).fits(device_bytes)

    if not fits(max_devices):
        return None
    low, high = 1, max_devices
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def render_table(plan: MemoryPlan, device_bytes: int | None = None) -> Table:
    """The plan as a rich table (component, GB, how) with a total row; the caller says if it fits."""
    from rich.table import Table

    r = plan.request
    title = f"{plan.model.name}: {r.label or r.method}"
    if r.method == "full" and r.zero_stage:
        title += f", ZeRO-{r.zero_stage} x {r.devices}"
    table = Table(title=title + f", {r.batch} x {r.seq_len} tokens, {r.precision}")
    table.add_column("component")
    table.add_column("GB", justify="right")
    table.add_column("how")
    for line in plan.lines:
        table.add_row(line.name, f"{line.bytes / GiB:.2f}", line.note)
    table.add_section()
    table.add_row("total", f"{plan.total_gb:.2f}", f"{plan.trainable_params:,} trainable of "
                  f"{plan.total_params:,} params", style="bold")
    if plan.cpu_offload_bytes:
        table.add_row("host (offload)", f"{plan.cpu_offload_bytes / GiB:.2f}", "per rank, not on device")
    if device_bytes is not None:
        table.caption = f"device {device_bytes / GiB:.2f} GB, headroom " \
                        f"{(device_bytes - plan.total_bytes) / GiB:.2f} GB"
    return table
