"""Tests of rankclip.models: save/load round trips, normalisation, the logit scale, causality and
pooling of the text encoders, padding invariance, preprocessing against torchvision, and errors."""
import json, math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from rankclip.conv import TapCropConv2d
from rankclip.files import MissingFileError, UserError
from rankclip.models import (CLIP_MEAN, CLIP_STD, DualEncoder, ModelError, TEXT_ENCODERS, create_model, create_text_encoder,
                             load_model, preprocess)
from rankclip.text import fit_tokenizer, get_tokenizer, train_tokenizer

CAPTIONS = [
    "grinning face with big eyes; face, grin, happy, mouth, open, smile",
    "red apple; apple, fruit, red",
    "penguin; bird, penguin, antarctica, cold",
    "A penguin is a bird that cannot fly, but it swims very well.",
    "The apple is a round fruit. It can be red, green or yellow.",
]
SMALL = dict(width=64, layers=2, heads=2)


def images(n=3, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {kind: train_tokenizer(kind, CAPTIONS, 300, root/kind, context_length=24) for kind in ("bert", "roberta")}


def small_model(text="clip-2x128", tokenizer=None, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18", text, embed_dim=32, image_size=32, tokenizer=tokenizer, **SMALL).eval()


@pytest.mark.parametrize("text", ["clip-2x128", "bert-4x256", "roberta-4x256"])
def test_save_load_round_trip(tmp_path, tokenizers, text):
    family = TEXT_ENCODERS[text]["family"]
    model = small_model(text, tokenizers.get(family))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.image_encoder.trunk.bn1.running_mean.uniform_()  # buffers travel too
    model.save(tmp_path/"m")
    assert sorted(p.name for p in (tmp_path/"m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                               "tokenizer_settings.json"]
    assert json.loads((tmp_path/"m"/"config.json").read_text()) == model.config
    loaded = load_model(tmp_path/"m").eval()
    assert isinstance(loaded.image_encoder.trunk.layer4[0].conv1, TapCropConv2d)
    assert list(loaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        a, b = model(images(), CAPTIONS[:3]), loaded(images(), CAPTIONS[:3])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a fresh model of the same config differs: the weights really came from the file
    with torch.no_grad():
        assert not torch.equal(small_model(text, tokenizers.get(family), seed=1).encode_image(images()), a["image_features"])
    model.save(tmp_path/"m")  # overwriting leaves nothing else behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing") as e:
        load_model(tmp_path)
    assert isinstance(e.value, MissingFileError) and isinstance(e.value, UserError)
    with pytest.raises(MissingFileError, match="nothing/config.json: missing"):
        load_model(tmp_path/"nothing")
    model = small_model()
    model.save(tmp_path/"m")
    (tmp_path/"m"/"config.json").write_text(json.dumps({**model.config, "text_encoder": "nope"}))
    with pytest.raises(ValueError, match="config.json: unknown text encoder 'nope'") as e:
        load_model(tmp_path/"m")
    assert isinstance(e.value, ModelError) and isinstance(e.value, UserError)


@pytest.mark.parametrize("text", ["clip-2x128", "bert-4x256", "roberta-4x256"])
def test_embeddings_are_unit_norm(tokenizers, text):
    model = small_model(text, tokenizers.get(TEXT_ENCODERS[text]["family"]))
    with torch.no_grad():
        out = model(images(), CAPTIONS[:3])
        raw = model.encode_text(CAPTIONS[:3], normalize=False)
    for k in ("image_features", "text_features"):
        assert out[k].shape == (3, 32)
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(3), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    assert torch.allclose(F.normalize(raw, dim=-1), out["text_features"], atol=1e-6)


def test_logit_scale_init_and_clamp():
    model = small_model()
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.requires_grad
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    for t, s in [(math.log(1 / 0.07), 1 / 0.07), (10.0, 100.0), (2.0, math.exp(2.0)), (-3.0, 1.0)]:
        with torch.no_grad():
            model.logit_scale.fill_(t)
        assert math.isclose(model(images(2), CAPTIONS[:2])["logit_scale"].item(), s, rel_tol=1e-5)
    model.logit_scale.grad = None
    model(images(2), CAPTIONS[:2])["logit_scale"].backward()
    assert model.logit_scale.grad.item() == 0  # clamped at the lower bound: no gradient


def test_causal_mask_is_causal():
    tok = get_tokenizer("clip")
    torch.manual_seed(0)
    enc = create_text_encoder("clip-2x128", 32, tok.vocab_size).eval()
    ids = tok(["grinning face with big eyes and a smile"])["input_ids"]
    for j in (1, 4, 8):
        changed = ids.clone()
        changed[0, j] = 1234
        with torch.no_grad():
            a, b = enc.hidden_states(ids), enc.hidden_states(changed)
        assert torch.equal(a[:, :j], b[:, :j])
        assert not torch.allclose(a[:, j:], b[:, j:])


def test_clip_pools_at_end_of_text():
    tok = get_tokenizer("clip")
    torch.manual_seed(0)
    enc = create_text_encoder("clip-2x128", 32, tok.vocab_size).eval()
    batch = tok(["red apple", "a penguin is a bird that cannot fly", ""])
    eot = (batch["input_ids"] == 49407).int().argmax(1)  # independent of the attention mask
    with torch.no_grad():
        hidden = enc.hidden_states(batch["input_ids"])
        pooled = enc(**batch)
        expected = enc.proj(hidden[torch.arange(3), eot])
        # the padding after the end token changes nothing
        padded = batch["input_ids"].clone()
        padded[batch["attention_mask"] == 0] = 999
        assert torch.allclose(enc(padded, batch["attention_mask"]), pooled, atol=1e-6)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert not torch.allclose(pooled, enc.proj(hidden[:, -1]), atol=1e-3)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bidirectional_pools_first_token_and_ignores_padding(tokenizers, family):
    tok = tokenizers[family]
    torch.manual_seed(0)
    enc = create_text_encoder(f"{family}-4x256", 32, tok.vocab_size, tok.pad_id, **SMALL).eval()
    short = tok(CAPTIONS[1:3])
    longer = fit_tokenizer(family, CAPTIONS, 300, context_length=60)(CAPTIONS[1:3])
    assert (short["attention_mask"].sum(1) < 24).all()  # nothing truncated: only the padding differs
    assert torch.equal(longer["input_ids"][:, :24][short["attention_mask"] == 1], short["input_ids"][short["attention_mask"] == 1])
    with torch.no_grad():
        pooled = enc(**short)
        assert torch.allclose(pooled, enc(**longer), atol=1e-5)
        assert torch.allclose(pooled, enc.proj(enc.hidden_states(**short)[:, 0]), atol=1e-6)
        # changing a token changes the first position's state (attention is bidirectional)
        changed = short["input_ids"].clone()
        changed[:, 2] = tok.tokenizer.token_to_id("[UNK]" if family == "bert" else "<unk>")
        assert not torch.allclose(enc(changed, short["attention_mask"]), pooled, atol=1e-4)


def test_preprocess_layouts_dtypes_and_grey():
    x = images(2, 40)
    ref = preprocess(x, 32)
    assert ref.shape == (2, 3, 32, 32) and ref.dtype == torch.float32
    assert torch.equal(preprocess(x.permute(0, 3, 1, 2), 32), ref)
    assert torch.allclose(preprocess(x.float() / 255, 32), ref, atol=1e-6)
    grey = x[..., :1]
    assert torch.equal(preprocess(grey, 32), preprocess(grey.expand(-1, -1, -1, 3).contiguous(), 32))
    assert torch.equal(preprocess(grey.permute(0, 3, 1, 2), 32), preprocess(grey, 32))
    model = small_model()
    assert torch.equal(model.preprocess(x), ref)


RESIZE = dict(interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 48, 40, 3), (2, 20, 28, 3), (1, 225, 300, 3)])
def test_preprocess_matches_torchvision(shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(32, **RESIZE), v2.Lambda(lambda t: t.clamp(0, 1)),
                            v2.CenterCrop(32), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    expected = torch.stack([reference(img.permute(2, 0, 1)) for img in x])
    assert torch.allclose(preprocess(x, 32), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 48), (20, 28), (225, 300)])
def test_preprocess_close_to_clips_uint8_transform(shape):
    "On a smooth image, within 2 grey levels of torchvision's uint8 resize (which follows PIL's, as CLIP's transform does)."
    h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(6 * xx + 3 * yy)], -1)
    x = (img * 255).round().to(torch.uint8)[None]
    reference = v2.Compose([v2.Resize(32, **RESIZE), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True)])
    expected = reference(x[0].permute(2, 0, 1))
    ours = preprocess(x, 32)[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert (ours - expected).abs().max() * 255 < 2


def test_preprocess_errors():
    with pytest.raises(ValueError, match="4-d tensor"):
        preprocess(torch.zeros(32, 32, 3, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="1 .grey. or 3 .RGB. channels"):
        preprocess(torch.zeros(2, 32, 32, 4, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        preprocess(torch.zeros(2, 32, 32, 3, dtype=torch.long), 32)


def test_encode_accepts_tokens_and_moves_inputs():
    model = small_model()
    with torch.no_grad():
        assert torch.equal(model.encode_text(CAPTIONS), model.encode_text(model.tokenize(CAPTIONS)))
        assert torch.equal(model.encode_image(images()), model.encode_image(images().permute(0, 3, 1, 2)))


def test_no_weight_decay_names():
    model = small_model("clip-2x128")
    names = model.no_weight_decay_names()
    params = dict(model.named_parameters())
    assert {"logit_scale", "text_encoder.token_embedding.weight", "text_encoder.positional_embedding"} <= names
    assert all(params[n].ndim < 2 for n in names - {"text_encoder.token_embedding.weight", "text_encoder.positional_embedding"})
    assert all(n in names for n, p in params.items() if n.endswith("bias") or ".bn" in n or ".ln" in n)
    assert all(n not in names for n, p in params.items() if p.ndim >= 2 and "embedding" not in n)


def test_bert_embeddings_get_no_weight_decay(tokenizers):
    names = small_model("bert-4x256", tokenizers["bert"]).no_weight_decay_names()
    assert {"text_encoder.transformer.embeddings.word_embeddings.weight",
            "text_encoder.transformer.embeddings.position_embeddings.weight"} <= names


def test_presets_build_the_named_architecture(tokenizers):
    for name, spec in TEXT_ENCODERS.items():
        if spec["width"] > 256:
            continue  # the big presets are built in the notebook's cost table
        tok = tokenizers.get(spec["family"]) or get_tokenizer("clip")
        enc = create_text_encoder(name, 16, tok.vocab_size, tok.pad_id)
        blocks = enc.blocks if spec["family"] == "clip" else enc.transformer.encoder.layer
        assert len(blocks) == spec["layers"] and enc.proj.in_features == spec["width"]


def test_errors_name_what_is_available(tokenizers):
    with pytest.raises(ValueError, match="unknown text encoder 'gpt2'.*clip-12x512.*bert-base.*roberta-base") as e:
        create_model("resnet18", "gpt2")
    assert isinstance(e.value, ModelError) and issubclass(ModelError, UserError)
    with pytest.raises(ValueError, match="unknown image encoder 'resnet5'.*resnet50.*timm.list_models") as e:
        create_model("resnet5", "clip-2x128")
    assert isinstance(e.value, ModelError)
    with pytest.raises(ModelError, match="unknown text encoder 'clip-2x12' .closest known: clip-2x128.*TEXT_ENCODERS"):
        create_model("resnet18", "clip-2x12")
    with pytest.raises(ModelError, match="unknown image encoder 'nosuchnet' .closest known: .*timm.list_models"):
        create_model(image_encoder="nosuchnet")
    with pytest.raises(ValueError, match="width 128 is not divisible by heads 3"):
        create_model("resnet18", "clip-2x128", heads=3)
    with pytest.raises(ValueError, match="embed_dim=0"):
        create_model("resnet18", "clip-2x128", embed_dim=0)
    with pytest.raises(ValueError, match="embed_dim=-4"):
        create_model("resnet18", "clip-2x128", embed_dim=-4)
    with pytest.raises(ValueError, match="makes 77 tokens.*16 positions"):
        create_model("resnet18", "clip-2x128", tokenizer=get_tokenizer("clip"), context_length=16)
    with pytest.raises(ValueError, match="unknown setting.*'depth'"):
        create_model("resnet18", "clip-2x128", depth=3)
    with pytest.raises(ValueError, match="train_tokenizer\\('bert'") as e:
        create_model("resnet18", "bert-4x256")
    assert isinstance(e.value, UserError)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        create_model("resnet18", "bert-4x256", tokenizer="/nonexistent/tok")
    with pytest.raises(ValueError, match="100 tokens, but the positional table holds 77"):
        create_text_encoder("clip-2x128", 8, 100).hidden_states(torch.zeros(1, 100, dtype=torch.long))


def test_tokenizer_path_and_context_override(tmp_path, tokenizers):
    tokenizers["roberta"].save(tmp_path/"rob")
    model = small_model("roberta-4x256", str(tmp_path/"rob"))
    assert model.tokenizer.vocab_size == tokenizers["roberta"].vocab_size
    assert model.text_encoder.transformer.config.pad_token_id == tokenizers["roberta"].pad_id
    short = create_model("resnet18", "clip-2x128", embed_dim=8, image_size=32, context_length=16)
    assert short.tokenize(["a"])["input_ids"].shape == (1, 16) and short.text_encoder.positional_embedding.shape[0] == 16
    assert isinstance(short, DualEncoder)


def test_text_dropout_setting(tmp_path, tokenizers):
    "dropout reaches BERT/RoBERTa's hidden and attention dropout (default: the configs' 0.1), is saved with the model, and is refused where it has no meaning."
    for family, dropout in [("bert", None), ("bert", 0.0), ("roberta", 0.25)]:
        extra = {} if dropout is None else {"dropout": dropout}
        model = small_model(f"{family}-4x256", tokenizers[family]) if dropout is None else create_model(
            "resnet18", f"{family}-4x256", embed_dim=32, image_size=32, tokenizer=tokenizers[family], **SMALL, **extra)
        config = model.text_encoder.transformer.config
        want = 0.1 if dropout is None else dropout
        assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (want, want)
        modules = [m.p for m in model.text_encoder.modules() if isinstance(m, torch.nn.Dropout)]
        assert modules and set(modules) == {want}
    model.save(tmp_path / "m")
    assert load_model(tmp_path / "m").text_encoder.transformer.config.hidden_dropout_prob == 0.25
    with pytest.raises(ModelError, match="has no dropout"):
        create_model("resnet18", "clip-2x128", embed_dim=32, image_size=32, dropout=0.1)
    assert isinstance(create_model("resnet18", "clip-2x128", embed_dim=32, image_size=32, dropout=0.0).text_encoder, torch.nn.Module)
    with pytest.raises(ModelError, match=r"dropout 1.0 is not in \[0, 1\)"):
        create_text_encoder("bert-2x192", 32, 300, dropout=1.0)
