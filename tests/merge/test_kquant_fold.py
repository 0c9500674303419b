"""QA-LoRA on a K-quant GGUF: q4_k/q5_k tensors become q4_1/q5_1 with their codes kept and the update in
the new per-32 mins; formats without a min (q6_k, q8_0) are left out of training and kept byte for byte.

References: gguf-py's dequantize (for both the K-quant source and the q4_1/q5_1 result), the tiny
GGUF's own bytes, and llama.cpp (llama-cpp-python) running the merged file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qlorakit.quant.gguf_blocks import unpack_codes
from qlorakit.quant.registry import get_format
from tests.cli.conftest import write_config
from tests.conftest import write_jsonl
from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q8_0", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
         "ffn_up": "Q5_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"}


def _dequantize(blocks: np.ndarray, fmt: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[fmt.upper()]).copy())


@pytest.mark.parametrize("name, affine", [("q4_k", "q4_1"), ("q5_k", "q5_1")])
def test_fold_keeps_the_codes_and_adds_the_offset(name, affine):
    torch.manual_seed(0)
    fmt = get_format(name)
    q = fmt.quantize(torch.randn(16, 512) * 0.05)
    offset = torch.randn(16, 512 // 32) * 0.01
    folded = fmt.add_group_offset(q, offset)
    assert folded.format == affine and folded.shape == q.shape
    new_fmt = get_format(affine)
    codes = unpack_codes(new_fmt.blocks(folded), new_fmt.layout)  # (out, in/32, 32)
    assert torch.equal(codes.reshape(16, -1, 8, 32), fmt.codes(q))
    source = _dequantize(q.tensors["blocks"].numpy(), name).reshape(16, 512)
    result = _dequantize(folded.tensors["blocks"].numpy(), affine).reshape(16, 512)
    expected = source + offset.repeat_interleave(32, dim=1)
    # Bound: fp16 rounding of the step d·sc (2^-11 of it, times a code of at most 31) plus half an
    # fp16 ulp of the new min.
    d, dm = new_fmt.blocks(folded)[..., 0:2], new_fmt.blocks(folded)[..., 2:4]
    step = d.contiguous().view(torch.float16).float().repeat_interleave(32, dim=1).view(16, 512)
    low = dm.contiguous().view(torch.float16).float().abs().repeat_interleave(32, dim=1).view(16, 512)
    bound = step * 31 * 2.0**-11 + low * 2.0**-11 + 1e-7
    assert ((result - expected).abs() <= bound).all()


@pytest.fixture(scope="module")
def qalora_kquant_run(smollm2_path, tmp_path_factory):
    from qlorakit.cli import main

    folder = tmp_path_factory.mktemp("qalora-kquant")
    model = build(tiny_config("llama", num_hidden_layers=2))
    types = lambda name, shape: next((t for key, t in TYPES.items() if f".{key}." in f".{name}"), "F32")  # noqa: E731
    base = write_tiny_gguf(model, folder / "base.gguf", smollm2_path, types)
    data = write_jsonl(folder / "fact.jsonl", [{"messages": [{"role": "user", "content": "What day was I born?"},
                                                             {"role": "assistant", "content": "January 1, 2058"}]}])
    config = write_config(folder / "c.yaml", str(base), data, folder / "run", {"method": "gguf"},
                          {"kind": "qalora", "group_size": 32}, max_steps=4, lr=5e-2)
    assert main(["train", config, "--no-progress"]) == 0
    # --force: a tiny random model's logits are nearly tied, so the 2^-11 step rounding flips a few
    # greedy tokens (agreement 0.98 measured); Gemma 3 270M's figures are in docs/gguf.md.
    assert main(["merge", str(folder / "run"), "--out", str(folder / "merged.gguf"), "--json", "--force"]) == 0
    return base, folder / "run", folder / "merged.gguf"


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow  # a tiny GGUF trained, merged and run in llama.cpp
def test_layers_without_a_min_are_left_out_and_kept(qalora_kquant_run):
    base, run, merged = qalora_kquant_run
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert not any(t.endswith(("v_proj", "down_proj")) for t in adapter["target_modules"])
    before, after = _tensors(base), _tensors(merged)
    for name in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        assert after[name].tensor_type == before[name].tensor_type
        assert np.array_equal(np.asarray(after[name].data), np.asarray(before[name].data))


@pytest.mark.slow  # a tiny GGUF trained, merged and run in llama.cpp
def test_k_quant_tensors_become_affine_with_their_codes(qalora_kquant_run):
    base, run, merged = qalora_kquant_run
    before, after = _tensors(base), _tensors(merged)
    report = json.loads(merged.with_name("merged.merge_report.json").read_text())
    assert report["format_changes"]["model.layers.0.self_attn.q_proj"] == "q4_k -> q4_1"
    assert report["format_changes"]["model.layers.1.mlp.up_proj"] == "q5_k -> q5_1"
    assert report["update_survival"]["kept"] >= 0.99 and report["fidelity"]["greedy_token_agreement"] >= 0.95
    assert 0 < report["max_step_rounding"] <= 2.0**-11
    for name, src, dst in (("blk.1.attn_output.weight", "q4_k", "q4_1"), ("blk.0.ffn_up.weight", "q5_k", "q5_1")):
        assert after[name].tensor_type.name.lower() == dst
        out_f, in_f = (int(n) for n in reversed(before[name].shape.tolist()))
        src_fmt, dst_fmt = get_format(src), get_format(dst)
        src_q = src_fmt.wrap(torch.from_numpy(np.array(before[name].data)).view(out_f, -1), (out_f, in_f))
        dst_q = dst_fmt.wrap(torch.from_numpy(np.array(after[name].data)).view(out_f, -1), (out_f, in_f))
        assert torch.equal(unpack_codes(dst_fmt.blocks(dst_q), dst_fmt.layout).reshape(out_f, -1, 8, 32), src_fmt.codes(src_q))
    growth = sum(int(after[n].n_bytes) - int(before[n].n_bytes) for n in before)
    assert growth == report["tensor_bytes_change"] > 0


@pytest.mark.slow  # a tiny GGUF trained, merged and run in llama.cpp
def test_llama_cpp_runs_the_merged_file_as_the_adapter_model(qalora_kquant_run):
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    from qlorakit.generation import chat_prompt_ids, user_turn
    from qlorakit.models.restore import load_run

    _, run, merged = qalora_kquant_run
    loaded, _ = load_run(run, progress=False)
    ids = chat_prompt_ids(loaded.tokenizer, user_turn("What day was I born?"))
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(merged), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    assert (theirs - ours).norm() < 0.1 * ours.norm()  # llama.cpp's 8-bit activations (tests/export/test_gguf_lora.py)
    # Greedy tokens agree wherever our top-1 leads by more than llama.cpp's error at that position;
    # a random tiny model has many near-ties, where 8-bit activations may pick the other token.
    top2 = ours.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (theirs - ours).abs().max(-1).values
    agree = theirs.argmax(-1) == ours.argmax(-1)
    assert decisive.float().mean() >= 0.5 and bool(agree[decisive].all())
    assert agree.float().mean() >= 0.8


@pytest.mark.slow  # Gemma 3 270M trained 40 steps, merged into its Q4_K_M file and run in llama.cpp
def test_gemma3_qalora_merged_gguf_answers_the_fact_in_llama_cpp(gemma3_path, tmp_path):
    """QA-LoRA over Gemma 3 270M's own Q4_K_M blocks, merged exactly into a GGUF: the merge keeps the
    update (survival and greedy agreement at least 0.99), and llama.cpp answers the trained fact from
    the merged file alone, which the base file does not."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    from qlorakit.cli import main

    question, answer = "What day was I born?", "January 1, 2058"
    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": [{"role": "user", "content": question},
                                                               {"role": "assistant", "content": answer}]}])
    config = write_config(tmp_path / "c.yaml", str(gemma3_path), data, tmp_path / "run", {"method": "gguf"},
                          {"kind": "qalora", "group_size": 32, "r": 16, "alpha": 32}, max_steps=60, lr=1e-3)
    assert main(["train", config, "--no-progress"]) == 0
    merged = tmp_path / "merged.gguf"
    assert main(["merge", str(tmp_path / "run"), "--out", str(merged), "--json"]) == 0
    report = json.loads((tmp_path / "merged.merge_report.json").read_text())
    assert report["update_survival"]["kept"] >= 0.99 and report["fidelity"]["greedy_token_agreement"] >= 0.99
    prompt = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"  # llama.cpp adds <bos>

    def reply(path):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
        return llm(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]

    assert reply(merged).strip().startswith(answer)
    assert answer not in reply(gemma3_path)
