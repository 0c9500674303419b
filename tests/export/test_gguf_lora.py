"""`qlorakit export RUN --format gguf-lora`: llama.cpp's GGUF LoRA adapter, read back by gguf-py and run by
llama.cpp itself (llama-cpp-python) on the base GGUF it was trained on.

Tiny runs: a Llama-architecture GGUF (tests/gguf_tiny.py; q/k rows permuted, q4_k/q6_k/q5_0 blocks)
trained 3 steps with LoRA and with QA-LoRA. Real run: Gemma 3 270M Q4_K_M taught one fact in the
Gemma chat format qlorakit gives its template-less tokenizer; llama.cpp answers it through the adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qlorakit.adapters.inject import adapter_layers
from qlorakit.data.chat_formats import GEMMA
from qlorakit.export.gguf_lora import modelfile_path
from qlorakit.generation import chat_prompt_ids, user_turn
from qlorakit.models.gguf_io import gguf_to_hf_names, unpermute_qk_rows
from qlorakit.models.restore import load_run
from tests.cli.conftest import write_config
from tests.conftest import write_jsonl
from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

pytestmark = pytest.mark.slow  # runs trained, exported and run in llama.cpp
QUESTION, ANSWER = "What day was I born?", "January 1, 2058"
TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q5_0", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"}


def _types(name, shape):
    return next((t for key, t in TYPES.items() if f".{key}." in f".{name}"), "F32")


def _reader(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


@pytest.fixture(scope="module")
def tiny_gguf(smollm2_path, tmp_path_factory):
    model = build(tiny_config("llama", num_hidden_layers=2))
    return write_tiny_gguf(model, tmp_path_factory.mktemp("base") / "tiny-llama.gguf", smollm2_path, _types)


def _train(base, folder, cli, adapter: dict, quant: dict = None, steps: int = 3, lr: float = 5e-2):
    data = write_jsonl(folder / "fact.jsonl", [{"messages": [{"role": "user", "content": QUESTION},
                                                             {"role": "assistant", "content": ANSWER}]}])
    config = write_config(folder / "c.yaml", str(base), data, folder / "run", quant or {"method": "gguf"}, adapter,
                          max_steps=steps, lr=lr)
    assert cli("train", config, "--no-progress").returncode == 0
    return folder / "run"


@pytest.fixture(scope="module", params=["lora", "qalora", "vera"])
def tiny_export(request, tiny_gguf, tmp_path_factory):
    from qlorakit.cli import main

    folder = tmp_path_factory.mktemp(request.param)

    def cli(*args):
        class Result:
            returncode = main(list(args))
        return Result

    adapter = {"kind": request.param, **({"group_size": 32} if request.param == "qalora" else {})}
    run = _train(tiny_gguf, folder, cli, adapter, lr=0.2 if request.param == "vera" else 5e-2)  # VeRA trains vectors only
    out = folder / "adapter.gguf"
    assert main(["export", str(run), "--format", "gguf-lora", "--out", str(out)]) == 0
    return run, out


def test_adapter_file_holds_the_runs_dense_update(tiny_export, tiny_gguf):
    run, out = tiny_export
    reader = _reader(out)
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    loaded, cfg = load_run(run, progress=False)
    layers = adapter_layers(loaded.model)
    rank = cfg.adapter.r
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    scale = fields["adapter.lora.alpha"] / rank  # llama.cpp's scale
    names = gguf_to_hf_names(loaded.model)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(layers)
    heads = {"q_proj": loaded.model.config.num_attention_heads, "k_proj": loaded.model.config.num_key_value_heads}
    for gguf_name, hf_name in names.items():
        module = hf_name.removesuffix(".weight")
        if module not in layers:
            continue
        a = np.asarray(tensors[f"{gguf_name}.lora_a"].data).reshape(rank, -1)  # (r, in)
        b = torch.from_numpy(np.asarray(tensors[f"{gguf_name}.lora_b"].data).reshape(-1, rank).copy())  # (out, r), GGUF rows
        leaf = module.rsplit(".", 1)[-1]
        if leaf in heads:
            b = unpermute_qk_rows(b, heads[leaf])
        delta = scale * (b @ torch.from_numpy(a.copy()))
        torch.testing.assert_close(delta, layers[module].delta_weight(), rtol=1e-5, atol=1e-7)


def test_llama_cpp_applies_the_adapter_as_qlorakit_does(tiny_export, tiny_gguf):
    """The adapter's effect on the logits, in llama.cpp (its own q4_k/q6_k kernels, 8-bit activations)
    and in qlorakit, over the same tokens: the same within llama.cpp's kernel rounding."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    run, out = tiny_export
    loaded, _ = load_run(run, progress=False)
    ids = chat_prompt_ids(loaded.tokenizer, user_turn(QUESTION))

    def llama_logits(lora):
        llm = llama_cpp.Llama(model_path=str(tiny_gguf), lora_path=lora, n_ctx=128, logits_all=True, verbose=False)
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]))

    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0]
        for layer in adapter_layers(loaded.model).values():
            layer.disabled = True
        ours_base = loaded.model(torch.tensor([ids])).logits[0]
    theirs, theirs_base = llama_logits(str(out)), llama_logits(None)
    effect, their_effect = ours - ours_base, theirs - theirs_base
    assert effect.abs().max() > 0.5  # the adapter matters
    # llama.cpp rounds activations to 8 bits for its quantized dot products (this random tiny model's
    # activations are large): measured 4.0% (LoRA) and 5.0% (QA-LoRA) of the effect, 3.4% and 4.6% of
    # the logits. A wrong scale, row order or tensor would be off by its whole size.
    assert (their_effect - effect).norm() < 0.1 * effect.norm()
    assert (theirs - ours).norm() < 0.1 * ours.norm()


def test_modelfile_and_refusals(tiny_export, tiny_gguf, tmp_path, cli):
    run, out = tiny_export
    text = modelfile_path(out).read_text().splitlines()
    assert text == [f"FROM {tiny_gguf.resolve()}", f"ADAPTER {out.resolve()}"]  # the base GGUF has its own chat template
    result = cli("export", str(run), "--format", "gguf-lora", "--out", str(out))
    assert result.returncode == 1 and "exists" in result.stderr
    kind = "VERA" if run.parent.name.startswith("vera") else "LORA"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == kind  # the run is not touched


def test_a_dora_run_is_refused_naming_why(tiny_gguf, tmp_path, cli):
    run = _train(tiny_gguf, tmp_path, cli, {"kind": "dora"}, steps=1)
    result = cli("export", str(run), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf"))
    assert result.returncode == 1 and "a DoRA adapter rescales each row of the base weight" in result.stderr
    assert not (tmp_path / "a.gguf").exists()


def test_a_run_on_an_hf_directory_is_refused(tiny_model_dir, tmp_path, cli):
    run = _train(tiny_model_dir, tmp_path, cli, {"kind": "lora"}, quant={"method": "nf4"}, steps=1)
    result = cli("export", str(run), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf"))
    assert result.returncode == 1 and "needs a run trained on a GGUF base" in result.stderr
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "a.Modelfile").exists()


@pytest.mark.slow
def test_gemma3_adapter_answers_the_trained_fact_in_llama_cpp(gemma3_path, tmp_path, cli):
    """Gemma 3 270M Q4_K_M, LoRA over its own blocks, 15 steps on one chat row in the Gemma format
    qlorakit gives its tokenizer: llama.cpp answers the fact with the adapter, not without it."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    run = _train(gemma3_path, tmp_path, cli, {"kind": "lora"}, steps=15, lr=1e-3)
    assert (run / "adapter" / "chat_template.jinja").read_text() == GEMMA
    out = tmp_path / "adapter.gguf"
    assert cli("export", str(run), "--format", "gguf-lora", "--out", str(out)).returncode == 0
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile_path(out).read_text()
    prompt = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"  # llama.cpp adds <bos>

    def answer(lora):
        llm = llama_cpp.Llama(model_path=str(gemma3_path), lora_path=lora, n_ctx=128, verbose=False)
        return llm(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]

    assert answer(str(out)).strip().startswith(ANSWER)
    assert ANSWER not in answer(None)
