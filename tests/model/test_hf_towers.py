"""HF towers from local directories (never downloaded): SigLIP preset and a BERT text encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import BertConfig, BertModel, SiglipConfig, SiglipModel

from reir.model import ReirModel, create_model
from reir.model.tokenization import build_tokenizer, build_vocab

TEXTS = ["the red square", "the blue circle left of the green triangle"]


def _tiny_siglip_dir(path: Path) -> Path:
    vocab = len(build_vocab())
    cfg = SiglipConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16,
                     "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
    )  # fmt: skip
    SiglipModel(cfg).save_pretrained(path)
    build_tokenizer(16).save_pretrained(path)  # any tokenizer AutoTokenizer can read
    return path


def _tiny_siglip(tmp_path: Path) -> tuple[ReirModel, object]:
    src = _tiny_siglip_dir(tmp_path / "siglip")
    return create_model(
        "siglip-vitb16",
        vision_model_path=str(src),
        text_model_path=str(src),
        embed_dim=16,
        vision={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        text={"max_length": 16},
    )


def test_siglip_preset_from_local_dir(tmp_path: Path) -> None:
    model, proc = _tiny_siglip(tmp_path)
    model.eval()
    assert proc.image_size == 32 and model.num_queries == 16  # (32 / 8) ** 2 patch tokens
    pv = proc.images([Image.new("RGB", (200, 100), "red")])
    enc = proc.text(TEXTS)
    assert enc["input_ids"].shape == (2, 16)  # SigLIP pools the last position: pad to max_length
    with torch.no_grad():
        inst = model.encode_images(pv)
        text = model.encode_text(**enc)
    assert inst.embeddings.shape == (1, 16, 16) and text.embeddings.shape == (2, 16)
    torch.testing.assert_close(text.embeddings.norm(dim=-1), torch.ones(2))
    out_dir = tmp_path / "ckpt"
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    model2, proc2 = create_model(out_dir)  # rebuilt from the stored tower configs
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_images(proc2.images([Image.new("RGB", (200, 100), "red")])).embeddings,
                                   inst.embeddings, rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(model2.encode_text(**proc2.text(TEXTS)).embeddings, text.embeddings, rtol=0, atol=0)
    # The ingestion encoders' image-side load rebuilds the SigLIP tower from its stored config too.
    vision, vproc = create_model(out_dir, vision_only=True)
    assert vision.text is None and vproc.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(vision.encode_images(vproc.images([Image.new("RGB", (200, 100), "red")])).embeddings,
                                   inst.embeddings, rtol=0, atol=0)  # fmt: skip


def test_siglip_tower_weights_are_loaded(tmp_path: Path) -> None:
    model, _ = _tiny_siglip(tmp_path)
    ref = SiglipModel.from_pretrained(tmp_path / "siglip")
    ours = model.vision.backbone.tower.embeddings.patch_embedding.weight
    torch.testing.assert_close(ours, ref.vision_model.embeddings.patch_embedding.weight)
    ours_t = model.text.model.embeddings.token_embedding.weight
    torch.testing.assert_close(ours_t, ref.text_model.embeddings.token_embedding.weight)


def test_text_encoder_path(tmp_path: Path) -> None:
    src = tmp_path / "minilm"
    tok = build_tokenizer(32)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(src)  # fmt: skip
    tok.save_pretrained(src)
    model, proc = create_model("tiny", text_encoder_path=str(src))
    assert model.text.model.config.hidden_size == 24
    with torch.no_grad():
        emb = model.eval().encode_text(**proc.text(TEXTS)).embeddings
    assert emb.shape == (2, 32)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    model2, proc2 = create_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_text(**proc2.text(TEXTS)).embeddings, emb, rtol=0, atol=0)
