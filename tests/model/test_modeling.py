from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from reir.model import ReirConfig, ReirModel, ReirProcessor, create_model, list_models

TEXTS = ["the small blue triangle left of the red square", "the largest green object", "a zebra"]


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (200, 100), (200, 30, 30)), Image.new("L", (50, 80), 128)]


def test_list_models() -> None:
    assert {"tiny", "small", "siglip-vitb16"} <= set(list_models())


def test_output_shapes_and_norms(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    pv = proc.images(_images())
    assert pv.shape == (2, 3, 64, 64)
    with torch.no_grad():
        inst = model.encode_images(pv)
        text = model.encode_text(**proc.text(TEXTS))
    q, d = model.num_queries, model.config.embed_dim
    assert q == 64 and d == 32
    assert inst.boxes.shape == (2, q, 4) and inst.objectness_logits.shape == (2, q)
    assert inst.embeddings.shape == (2, q, d) and text.embeddings.shape == (3, d)
    assert ((inst.boxes > 0) & (inst.boxes < 1)).all()
    torch.testing.assert_close(inst.embeddings.norm(dim=-1), torch.ones(2, q))
    torch.testing.assert_close(text.embeddings.norm(dim=-1), torch.ones(3))
    assert text.aux_loss.ndim == 0 and text.gate_probs.shape == (3, 4)
    assert model.score(text.embeddings, inst.embeddings).shape == (3, 2, q)
    assert model.score(text.embeddings, inst.embeddings[0, :5]).shape == (3, 5)


def test_save_load_round_trip(tiny: tuple[ReirModel, ReirProcessor], tmp_path: Path) -> None:
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    model2, proc2 = create_model(tmp_path)
    enc, enc2 = proc.text(TEXTS), proc2.text(TEXTS)
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(enc["attention_mask"], enc2["attention_mask"])
    assert proc2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    pv, pv2 = proc.images(_images()), proc2.images(_images())
    assert torch.equal(pv, pv2)
    with torch.no_grad():
        a, b = model.encode_images(pv), model2.encode_images(pv2)
        ta, tb = model.encode_text(**enc), model2.encode_text(**enc2)
    for x, y in [(a.boxes, b.boxes), (a.objectness_logits, b.objectness_logits), (a.embeddings, b.embeddings)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(ta.embeddings, tb.embeddings, rtol=0, atol=0)
    assert isinstance(ReirModel.from_pretrained(tmp_path), ReirModel)
    assert isinstance(ReirProcessor.from_pretrained(tmp_path), ReirProcessor)
    assert ReirConfig.from_pretrained(tmp_path).to_dict() == model.config.to_dict()
    with pytest.raises(ValueError):
        create_model(tmp_path, embed_dim=8)


def test_create_model_overrides() -> None:
    model, proc = create_model(
        "tiny", embed_dim=16, vision__num_layers=1, vision={"image_size": 32}, text={"max_length": 8}, more__num_experts=3
    )
    cfg = model.config
    assert cfg.embed_dim == 16 and cfg.vision_spec.num_layers == 1 and cfg.more_spec.num_experts == 3
    assert len(model.vision.encoder.layers) == 1 and len(model.text.more.experts) == 3
    assert proc.image_size == 32 and model.num_queries == 16
    assert cfg.vision_spec.hidden_size == 32  # untouched keys keep preset values
    assert proc.text(["the red square " * 10])["input_ids"].shape[1] == 8
    with torch.no_grad():
        assert model.encode_images(proc.images(_images())).embeddings.shape == (2, 16, 16)
    with pytest.raises(ValueError):
        create_model("tiny", vision__not_a_field=1)
    with pytest.raises(ValueError):
        create_model("no-such-preset")



@pytest.mark.parametrize("texts", [["the red square left of the blue circle"],
                                   ["the red square", "find the big blue circle left of the green triangle please"]])
def test_inference_text_path_equals_the_hf_tower(tiny: tuple[ReirModel, ReirProcessor], texts: list[str]) -> None:
    """Without gradients the BERT tower runs through torch's fused encoder-layer kernel; its token
    states and embeddings are the HF layers' own (padding keys masked). With gradients (training)
    the HF layers run, and the gradient reaches them."""
    model, processor = tiny
    encoder = model._text_encoder()
    batch = processor.text(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        assert encoder._fused_bert(ids, mask) is not None
        fused = model.encode_text(ids, mask)
    out = model.encode_text(ids, mask)  # gradients on: the HF layers
    assert encoder._fused_bert(ids, mask) is None
    real = mask.bool()
    torch.testing.assert_close(fused.token_states[real], out.token_states.detach()[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.embeddings, out.embeddings.detach(), atol=1e-5, rtol=1e-5)
    out.embeddings.sum().backward()
    layer = encoder.model.encoder.layer[0].attention.self.query.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    with torch.no_grad():  # a weight changed in place (an optimizer step): the fused path reads the new one
        layer.add_(0.05 * layer.grad)
        changed = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encode_text(ids, mask).token_states[real], changed[real], atol=1e-5, rtol=1e-5)
        value = encoder.model.encoder.layer[-1].attention.self.value
        value.bias.add_(0.1)  # a bias, in the last layer
        changed = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encode_text(ids, mask).token_states[real], changed[real], atol=1e-5, rtol=1e-5)
        value.weight = torch.nn.Parameter(value.weight * 0.5)  # another tensor in its place
        changed = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encode_text(ids, mask).token_states[real], changed[real], atol=1e-5, rtol=1e-5)


def test_encoder_layer_under_cpu_autocast_equals_torch_layer_in_values_and_gradients() -> None:
    """The visual encoder's layer writes its attention out under CPU bf16 autocast only (a
    faster backward there); it must compute what ``nn.TransformerEncoderLayer`` does, keep its
    parameter names (checkpoints load either way) and take torch's path everywhere else."""
    from torch import nn

    from reir.model.modeling import EncoderLayer

    torch.manual_seed(0)
    kwargs = {"dropout": 0.0, "activation": "gelu", "batch_first": True, "norm_first": True}
    ours, theirs = EncoderLayer(64, 4, 128, **kwargs), nn.TransformerEncoderLayer(64, 4, 128, **kwargs)
    theirs.load_state_dict(ours.state_dict())  # same names and shapes, or this raises
    x = torch.randn(3, 20, 64)
    fused_calls: list[int] = []  # torch's path runs self_attn's forward; the written-out one reads its weights
    ours.self_attn.register_forward_hook(lambda *_: fused_calls.append(1))
    grads = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xi)
        (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
        grads.append((out.detach().float(), xi.grad, layer.self_attn.in_proj_weight.grad))
    assert fused_calls == []
    for a, b in zip(*grads):
        assert a is not None and b is not None
        assert torch.allclose(a, b, atol=0.05 * float(b.abs().max()) + 1e-3), float((a - b).abs().max())
    assert torch.equal(ours(x), theirs(x))  # fp32: torch's own path, the same numbers exactly
    assert fused_calls == [1]
