"""``farm export ollama`` proven with llama.cpp, the runtime Ollama runs adapters with.

llama.cpp is built from ``llama-cpp-python``'s sdist by ``make setup`` (cached in the
environment), which also keeps the sdist's ``convert_hf_to_gguf.py`` (with its ``conversion``
package and ``gguf-py``) under ``.venv/llama.cpp``. Here: the tiny base is converted to a GGUF
(f32) with that script, a LoRA adapter is published and exported with ``--base`` naming that
GGUF, and llama.cpp loads base + exported adapter: its greedy tokens equal transformers +
PEFT's (fp32), the adapter changes them, and the Modelfile's ``FROM`` is the base GGUF.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..registry.conftest import make_lora_adapter
from .conftest import PROMPT

pytestmark = pytest.mark.slow

LLAMA_CPP_DIR = Path(sys.prefix) / "llama.cpp"  # where `make setup` keeps the sdist's converter
TOKENS = 16
#: Our base's tokenizer is a byte-level BPE trained locally (farm/base_model.py) with GPT-2's
#: pre-tokenizer; the converter recognises pre-tokenizers by hashing a known vocabulary's output,
#: which no locally trained vocabulary can match, so this run tells it which one it is.
CONVERT = """
import runpy, sys
llama_dir, base, out = sys.argv[1:4]
sys.path.insert(0, llama_dir)
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", base, "--outfile", out, "--outtype", "f32"]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def base_gguf(base_model_dir, tmp_path_factory) -> Path:
    if not (LLAMA_CPP_DIR / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"{LLAMA_CPP_DIR}/convert_hf_to_gguf.py is missing: run `make setup` (it keeps llama.cpp's "
                    "converter from the llama-cpp-python sdist)")
    out = tmp_path_factory.mktemp("gguf") / "base-f32.gguf"
    run = subprocess.run([sys.executable, "-c", CONVERT, str(LLAMA_CPP_DIR), str(base_model_dir), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and out.is_file(), run.stderr[-3000:]
    return out


def _transformers_greedy(base_model_dir: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    """``TOKENS`` argmax steps of transformers (+ PEFT) in fp32, EOS included like any token."""
    from transformers import AutoModelForCausalLM

    from farm.models import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(TOKENS):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def _llama_cpp_greedy(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(adapter) if adapter else None, n_ctx=256, n_threads=2,
                seed=0, verbose=False)
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == TOKENS:
            break
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == prompt  # the GGUF's own tokenizer agrees
    return out


def test_llama_cpp_answers_with_the_exported_adapter_as_transformers_and_peft_do(base_gguf, base_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from farm.cli import app
    from farm.registry import open_registry

    adapter = make_lora_adapter(base_model_dir, tmp_path / "adapter", strength=0.3,
                                targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    store = tmp_path / "registry"
    open_registry(str(store)).publish("acme", "demo", adapter, base_model=str(base_model_dir))
    out = tmp_path / "ollama"
    # A Hugging Face folder is not something Ollama can load: refused, naming what to give instead.
    refused = CliRunner().invoke(app, ["export", "ollama", "acme.demo@latest", "--out", str(tmp_path / "no"),
                                       "--base", str(base_model_dir), "--store", str(store)])
    assert refused.exit_code != 0 and "GGUF" in refused.output, refused.output
    result = CliRunner().invoke(app, ["export", "ollama", "acme.demo@latest", "--out", str(out),
                                      "--base", str(base_gguf), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert (out / "Modelfile").read_text() == f"FROM {base_gguf.resolve()}\nADAPTER ./acme.demo.v1.gguf\n"

    prompt = AutoTokenizer.from_pretrained(base_model_dir)(PROMPT).input_ids
    plain = _transformers_greedy(base_model_dir, None, prompt)
    expected = _transformers_greedy(base_model_dir, adapter, prompt)
    assert expected != plain  # the adapter changes the answer, so equality below means it was applied
    assert _llama_cpp_greedy(base_gguf, None, prompt) == plain
    assert _llama_cpp_greedy(base_gguf, out / "acme.demo.v1.gguf", prompt) == expected
