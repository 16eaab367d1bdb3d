"""Behaviour-check generations through vLLM, the engine that serves the registry's adapters.

Scoring with the serving engine measures what tenants will get: the same kernels, the same
LoRA path, the same refusals (an adapter vLLM cannot load is not scored on it). The engine runs
inside the scoring task: one base, the tenant's adapter(s) as ``LoRARequest``s, greedy
sampling on the same token ids the transformers path gets.

``eval.engine`` chooses: ``vllm``, ``transformers``, or ``auto`` (vLLM where a CUDA device is
there, vLLM is installed and the registry's check says vLLM can serve the adapter; transformers
+ PEFT otherwise, which serves every method the farm trains). Eval loss is always computed with
transformers (vLLM returns no per-token loss on given targets).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: The KV cache of a scoring engine. On CPU an explicit size: vLLM otherwise reserves a share
#: of host RAM *minus this process's size*, which the scoring task's own base model can exceed.
#: On GPUs the share of device memory a scoring task takes.
CPU_KV_CACHE_BYTES, GPU_MEMORY_SHARE = 512 * 2**20, 0.3


def vllm_refusal(adapter_dir: str | Path, base_model: str, method: str) -> str | None:
    """Why vLLM cannot serve this adapter (the registry's own servability check), or None."""
    import json

    from farm.registry.validate import check_config

    config = Path(base_model) / "config.json"  # a local base names its architecture; a hub id is checked by vLLM
    architecture = (json.loads(config.read_text()).get("architectures") or [None])[0] if config.is_file() else None
    check = check_config((Path(adapter_dir) / "adapter_config.json").read_bytes(), base_model, architecture, method)
    return check.not_servable_reason


def choose_engine(requested: str, adapter_dirs: list[Path], base_model: str, method: str) -> tuple[str, str | None]:
    """(engine, why not vLLM) for one scoring of ``adapter_dirs``: ``requested`` is ``eval.engine``.

    ``ValueError`` when ``vllm`` is requested and cannot load one of them.
    """
    if requested == "transformers":
        return "transformers", None
    blocker = None
    if importlib.util.find_spec("vllm") is None:
        blocker = "vLLM is not installed on this node"
    else:
        blocker = next(filter(None, (vllm_refusal(d, base_model, method) for d in adapter_dirs)), None)
    if requested == "vllm":
        if blocker:
            raise ValueError(f"eval.engine vllm: {blocker}")
        return "vllm", None
    import torch

    if blocker is None and not torch.cuda.is_available():
        blocker = "no CUDA device (auto uses vLLM on GPUs only)"
    return ("transformers", blocker) if blocker else ("vllm", None)


class VllmGenerator:
    """A vLLM engine on ``base_dir`` that continues token prompts greedily, with or without a
    LoRA adapter (a folder a registry version was downloaded into)."""

    def __init__(self, base_dir: str, max_lora_rank: int, max_model_len: int, eos_token_id: int):
        # The engine core runs in this process: a scoring task is already a Ray worker, and a
        # spawned engine process would re-import the task's module as __main__.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM

        from farm.serving.vllm_command import max_lora_rank_for

        on_gpu = torch.cuda.is_available()
        options = dict(model=base_dir, enable_lora=True, max_lora_rank=max_lora_rank_for([max_lora_rank]),
                       max_loras=1, max_model_len=max_model_len, seed=0)
        if on_gpu:
            options.update(gpu_memory_utilization=GPU_MEMORY_SHARE)
        else:  # fp32 and eager on CPU, as `farm serve --device cpu` runs it
            options.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
        self.llm = LLM(**options)
        self.eos = eos_token_id
        self.requests = 0

    def __call__(self, prompts: list[list[int]], max_new_tokens: int,
                 adapter_dir: str | Path | None = None) -> list[list[int]]:
        """Greedy continuations (token ids, cut at the end-of-turn token) of each prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = None
        if adapter_dir is not None:
            self.requests += 1  # a fresh id per adapter: vLLM caches adapters by id
            lora = LoRARequest(f"score-{self.requests}", self.requests, str(adapter_dir))
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[self.eos])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False, lora_request=lora)
        continuations = []
        for output in outputs:
            ids = list(output.outputs[0].token_ids)
            cut = next((i for i, t in enumerate(ids) if t == self.eos), len(ids))
            continuations.append(ids[:cut])
        return continuations
