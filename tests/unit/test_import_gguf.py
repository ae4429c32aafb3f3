"""GGUF import round trip: a tiny Llama written as GGUF by the `gguf` package (some tensors Q8_0, as a
quantized release would have them, with llama.cpp's q/k row order and a byte-level BPE tokenizer with a
chat template), imported into an HF directory, equals the model it was written from."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")   # `make install` installs it (pyproject: gguf, accelerate)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from services.common.import_gguf import ImportError_, import_gguf, main  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QUANTIZED = ("mlp.up_proj", "mlp.down_proj")   # written as Q8_0


def _bpe() -> tuple[list[str], list[str]]:
    """Tokens (in the byte-level alphabet, specials first) and merges of a small trained BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is 12 + 7? Answer with only the number. Tom has 3 apples and gets 4 more."] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, merges


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows in llama.cpp's rotary order (what its converter writes and transformers undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{layer}.{names[rest]}.weight"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the GGUF, the HF model it encodes with its Q8_0 tensors as dequantized, token list)."""
    tokens, merges = _bpe()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    expected = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = p.numpy().copy()
            if ".q_proj." in name:
                data = _permute(data, 4)
            elif ".k_proj." in name:
                data = _permute(data, 2)
            if any(q in name for q in QUANTIZED):
                packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(_gguf_name(name), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)))
            else:
                w.add_tensor(_gguf_name(name), data)
            expected[name] = p.detach().clone()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model, tokens


def test_round_trip_equals_the_written_model(tiny_gguf, tmp_path):
    path, model, tokens = tiny_gguf
    out = str(tmp_path / "hf")
    lines = []
    report = import_gguf(path, out, progress=lines.append)
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]   # progress, step by step
    assert report.max_abs_logit_diff <= 1e-4 and report.tokens_checked > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert saved.config.tie_word_embeddings and saved.config.vocab_size == len(tokens)
    assert "quantization_config" not in saved.config.to_dict()
    ours = dict(saved.named_parameters())
    for name, p in model.named_parameters():   # q/k back in HF order, Q8_0 tensors dequantized
        torch.testing.assert_close(ours[name], p, atol=0, rtol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokens.index("<|im_start|>") and tok.decode(ids).endswith("<|im_start|>assistant\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(saved(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_bad_input_is_one_clear_message(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--gguf", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gguf") and "is not a file" in err and "Traceback" not in err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(ImportError_, match="--gguf .*cannot read it"):
        import_gguf(str(junk), str(tmp_path / "out"))
    with pytest.raises(ImportError_, match="--dtype"):
        import_gguf(str(junk), str(tmp_path / "out"), dtype="int8")
