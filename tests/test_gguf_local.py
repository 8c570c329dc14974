"""Local GGUF files as models: a tiny Qwen2 written with the `gguf` library, whole and split."""

import pytest
import torch

from specexec.launch import model_store
from specexec.launch.loading import load_causal_lm, load_tokenizer
from specexec.launch.model_store import ModelStoreError
from tiny_models import tiny_lm

gguf = pytest.importorskip("gguf")
VOCAB = 96


def tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spelled = bytes_to_unicode()
    chars = [spelled[b] for b in range(32, 127)]  # byte-level BPE spellings of ' ' .. '~'
    return chars + ["<|eos|>"]


def write_gguf(model, path, split_max_tensors: int = 0):
    """The model's weights (float32) and a byte-level tokenizer, as llama.cpp's converter names them."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2", split_max_tensors=split_max_tensors)
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                              else float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens())
    writer.add_token_types([1] * (VOCAB - 1) + [3])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges([])
    writer.add_eos_token_id(VOCAB - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def model():
    return tiny_lm("qwen2", vocab=VOCAB)


def logits_of(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("split", [0, 4])
def test_a_gguf_file_or_its_split_parts_load_as_the_model(home, model, split):
    write_gguf(model, home / "tiny.gguf", split_max_tensors=split)
    given = home / ("tiny-00002-of-%05d.gguf" % len(list(home.glob("tiny-*.gguf"))) if split else "tiny.gguf")
    if split:
        assert len(list(home.glob("tiny-*-of-*.gguf"))) > 2
    path = model_store.resolve(str(given), model_store.TARGET)
    loaded = load_causal_lm(path, torch.float32, pack=False)
    ids = [5, 17, 3, 44, 9]
    rounded = tiny_lm("qwen2", vocab=VOCAB).to(torch.bfloat16).float()  # the conversion stores bf16 weights
    assert torch.allclose(logits_of(loaded, ids), logits_of(rounded, ids), atol=2e-3)  # eps stored as float32
    tok = load_tokenizer(path)
    assert tok.convert_ids_to_tokens([33, VOCAB - 1]) == [tokens()[33], "<|eos|>"]
    assert model_store.resolve(str(given), model_store.TARGET) == path  # converted once
    assert not list((home / "home" / "gguf").glob("*"))  # the joined file is not kept


def test_missing_and_damaged_files_are_named(home, model):
    with pytest.raises(ModelStoreError, match="nope.gguf does not exist"):
        model_store.resolve(str(home / "nope.gguf"), model_store.TARGET)
    write_gguf(model, home / "tiny.gguf", split_max_tensors=4)
    parts = sorted(home.glob("tiny-*-of-*.gguf"))
    parts[-1].unlink()
    with pytest.raises(ModelStoreError, match=f"{parts[-1].name} does not exist"):
        model_store.resolve(str(parts[0]), model_store.TARGET)
    (home / "text.gguf").write_text("not a model")
    with pytest.raises(ModelStoreError, match="text.gguf is not a GGUF file"):
        model_store.resolve(str(home / "text.gguf"), model_store.TARGET)
    write_gguf(model, home / "cut.gguf")
    data = (home / "cut.gguf").read_bytes()
    (home / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelStoreError, match="cannot load GGUF .*cut.gguf"):
        model_store.resolve(str(home / "cut.gguf"), model_store.TARGET)
