"""open_clip and CLIP_benchmark: every encoder preset this project trains exports to open_clip and embeds
real images and captions as rankclip does; CLIP_benchmark's own zero-shot code agrees with
`zero_shot_folder`; a run starts from an open_clip checkpoint, trains and resumes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rankclip.data import load_prepared
from rankclip.models import TEXT_ENCODERS, create_model, load_model, text_spec
from rankclip.openclip import ExportError, export_open_clip, load_open_clip

PARAMS = yaml.safe_load(Path("params.yaml").read_text())


def trained_encoders(kind: str) -> list[str]:
    "Every image (or text) encoder name the study's profiles train: the paper's names and each profile's stand-ins."
    key = f"{kind}_encoder"
    names = {PARAMS["train"][key]} | {c[key] for c in PARAMS["study"]["cells"].values() if key in c}
    for prof in PARAMS["profiles"].values():
        mapping = prof.get("encoders") or {}
        names |= {mapping.get(n, n) for n in list(names)}
    return sorted(n for n in names if (n in TEXT_ENCODERS) == (kind == "text"))


@pytest.fixture(scope="module")
def batch(prepared_root):
    "Eight real drawings and their captions."
    src = load_prepared("emoji", prepared_root)
    idx = np.arange(0, len(src), len(src) // 8)[:8]
    return torch.from_numpy(np.asarray(src.images[idx])), [src.captions[i] for i in idx]


@pytest.fixture(scope="module")
def tokenizers(prepared_root, tmp_path_factory):
    "BERT and RoBERTa tokenizers trained on the training captions."
    from rankclip.text import train_tokenizer
    captions = load_prepared("emoji", prepared_root).captions[:4000]
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: root / f for f in ("bert", "roberta") if train_tokenizer(f, captions, 2048, root / f)}


def exported_gap(model, images, captions, out) -> tuple[float, float]:
    "Largest difference between rankclip's and open_clip's image and text embeddings of the exported `model`."
    oc, _, tokenizer = load_open_clip(export_open_clip(model.eval(), out))
    with torch.no_grad():
        image = (oc.encode_image(model.preprocess(images), normalize=True) - model.encode_image(images)).abs().max()
        text = (oc.encode_text(tokenizer(captions), normalize=True) - model.encode_text(captions)).abs().max()
    return float(image), float(text)


def test_every_trained_encoder_is_covered():
    assert {"RN50", "RN101", "densenet121", "resnet18", "resnet34"} <= set(trained_encoders("image"))
    assert {"clip-12x512-quickgelu", "bert-base", "roberta-base", "clip-2x128", "bert-2x192"} <= set(trained_encoders("text"))


@pytest.mark.parametrize("image_encoder", trained_encoders("image"))
def test_image_encoder_exports_with_equal_embeddings(image_encoder, batch, tmp_path):
    torch.manual_seed(0)
    model = create_model(image_encoder, "clip-2x128", embed_dim=32, image_size=32)
    image_gap, text_gap = exported_gap(model, *batch, tmp_path / "export")
    assert image_gap < 1e-5 and text_gap < 1e-5, (image_gap, text_gap)


@pytest.mark.parametrize("text_encoder", sorted(set(trained_encoders("text")) | set(TEXT_ENCODERS)))
def test_text_encoder_exports_with_equal_embeddings(text_encoder, batch, tokenizers, tmp_path):
    family = text_spec(text_encoder)["family"]
    torch.manual_seed(0)
    model = create_model("resnet10t", text_encoder, embed_dim=32, image_size=32,
                         tokenizer=None if family == "clip" else tokenizers[family])
    image_gap, text_gap = exported_gap(model, *batch, tmp_path / "export")
    assert image_gap < 1e-5 and text_gap < 1e-5, (image_gap, text_gap)


def test_clip_text_encoder_with_another_tokenizer_is_refused(tokenizers, tmp_path):
    model = create_model("resnet10t", "clip-2x128", embed_dim=32, image_size=32, tokenizer=tokenizers["bert"])
    with pytest.raises(ExportError, match="CLIP's BPE"):
        export_open_clip(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_export_command_writes_what_open_clip_loads(batch, tmp_path):
    import open_clip
    torch.manual_seed(0)
    create_model("resnet10t", "clip-2x128", embed_dim=32, image_size=32).save(tmp_path / "model")
    r = subprocess.run([str(Path(sys.executable).parent / "rankclip"), "export", str(tmp_path / "model"), "--format",
                        "open_clip", str(tmp_path / "oc")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "rankclip-oc.json"):
        assert (tmp_path / "oc" / name).is_file()
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    model = load_model(tmp_path / "model").eval()
    images, _ = batch
    pil = [Image.fromarray(im.numpy()) for im in images]
    with torch.no_grad():  # open_clip's own PIL preprocessing against rankclip's tensor preprocessing
        gap = (oc.eval().encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True) - model.encode_image(images)).abs().max()
    assert gap < 1e-5, gap


def test_clip_benchmark_zero_shot_agrees_with_zero_shot_folder(prepared_root, tmp_path):
    from clip_benchmark.metrics import zeroshot_classification
    from rankclip.benchmarks import load_templates, zero_shot_folder
    from rankclip.openclip import patch_clip_benchmark
    from torchvision.datasets import ImageFolder
    src = load_prepared("emoji", prepared_root)
    vendor = np.asarray(src.labels["vendor"]) == src.label_names["vendor"].index("facebook")
    category = np.asarray(src.labels["category"])
    for c, name in enumerate(src.label_names["category"]):
        for i in np.flatnonzero(vendor & (category == c))[:25]:
            (tmp_path / "folder" / name.lower()).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(src.images[i])).save(tmp_path / "folder" / name.lower() / f"{i}.png")
    torch.manual_seed(0)
    model = create_model("resnet10t", "clip-2x128", embed_dim=32, image_size=32).eval()
    templates = load_templates("cifar")
    ours, info = zero_shot_folder(model, "imagefolder", tmp_path / "folder", templates=templates, n_boot=0)

    oc, _, tokenizer = load_open_clip(export_open_clip(model, tmp_path / "oc"))
    preprocess = __import__("open_clip").create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")[2]
    loader = torch.utils.data.DataLoader(ImageFolder(str(tmp_path / "folder"), transform=preprocess), batch_size=64)
    patch_clip_benchmark()
    their_templates = [t.replace("{}", "{c}") for t in templates]  # CLIP_benchmark's spelling of the same templates
    theirs = zeroshot_classification.evaluate(oc, loader, tokenizer, info["class_names"], their_templates, "cpu", amp=False)
    assert info["n_classes"] >= 8 and ours["top1"]["n"] == len(loader.dataset)
    assert theirs["acc1"] == pytest.approx(ours["top1"]["value"], abs=1e-12)
    assert theirs["acc5"] == pytest.approx(ours["top5"]["value"], abs=1e-12)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"]["value"], abs=1e-9)


def test_training_starts_from_an_open_clip_checkpoint_and_resumes(prepared_root, tmp_path):
    import open_clip
    from rankclip.checkpoint import latest_checkpoint, read_checkpoint
    from rankclip.config import TrainConfig
    from rankclip.train import fit
    torch.manual_seed(0)
    arch = dict(image_encoder="resnet10t", text_encoder="clip-2x128", embed_dim=32, image_size=32)
    oc, _, _ = load_open_clip(export_open_clip(create_model(**arch), tmp_path / "arch"))
    torch.manual_seed(1)
    for p in oc.parameters():
        torch.nn.init.normal_(p, std=0.02)  # a "pretrained" open_clip model: weights rankclip never made
    torch.save(oc.state_dict(), tmp_path / "pretrained.pt")
    kw = dict(**arch, init_from=str(tmp_path / "pretrained.pt"), data_root=str(prepared_root), limit=128,
              batch_size=32, epochs=1, warmup_steps=1, threads=1, progress=False, checkpoint_every=1)
    first = fit(TrainConfig(**kw, max_steps=1, out_dir=str(tmp_path / "run")))
    start = read_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert first["steps"] == 1 and start["state"]["config"]["init_from"].endswith("pretrained.pt")
    loaded = torch.load(tmp_path / "pretrained.pt")["token_embedding.weight"]
    moved = (start["model"]["text_encoder.token_embedding.weight"] - loaded).abs().max()
    assert 0 < moved < 0.1, "one step from the checkpoint, not from a random start"
    resumed = fit(TrainConfig(**kw, max_steps=3, out_dir=str(tmp_path / "run")))
    straight = fit(TrainConfig(**kw, max_steps=3, out_dir=str(tmp_path / "straight")))
    assert resumed["steps"] == straight["steps"] == 3
    a = load_model(tmp_path / "run" / "model").state_dict()
    b = load_model(tmp_path / "straight" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming a fine-tuning run equals running it straight"
    with pytest.raises(Exception, match="pretrained.pt"):
        fit(TrainConfig(**{**kw, "image_encoder": "resnet18"}, max_steps=1, out_dir=str(tmp_path / "other")))
