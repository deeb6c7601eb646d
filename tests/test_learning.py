"""Real learning: a short run on the embedded data retrieves held-out-vendor captions far above chance."""
import numpy as np
import torch

from rankclip.data import held_out_vendor_split, load_prepared
from rankclip.models import load_model
from rankclip.config import TrainConfig
from rankclip.train import fit


def recall_at_1(model, images, captions) -> float:
    "Image-to-text recall@1 with one caption per image, by brute force over all captions."
    with torch.no_grad():
        u = torch.cat([model.encode_image(torch.from_numpy(np.array(images[i:i + 256]))) for i in range(0, len(images), 256)])
        v = torch.cat([model.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    return (u @ v.T).argmax(1).eq(torch.arange(len(u))).double().mean().item()


def test_short_run_retrieves_held_out_vendor_far_above_chance(tmp_path, prepared_root):
    cfg = TrainConfig(image_encoder="resnet18", text_encoder="clip-2x128", embed_dim=128, image_size=32,
                      data_root=str(prepared_root), train_vendors=["apple", "google", "twitter"],
                      batch_size=128, epochs=2, lr=1e-3, warmup_steps=20, progress=False,
                      out_dir=str(tmp_path / "run"))
    fit(cfg)
    src = load_prepared("emoji", prepared_root)
    _, test = held_out_vendor_split(src, "facebook", one_per_emoji=True)
    captions = [src.captions[i] for i in test]
    assert len(set(captions)) == len(captions)  # one caption per held-out drawing: chance is 1/n
    chance = 1 / len(captions)
    r1 = recall_at_1(load_model(tmp_path / "run" / "model"), src.images[test], captions)
    print(f"held-out facebook R@1 {r1:.4f} over {len(captions)} captions (chance {chance:.5f})")
    assert r1 >= 10 * chance, (r1, chance)
