"""Tests of rankclip.text: CLIP's BPE against open_clip's own tokenizer, deterministic training across
processes, special tokens, truncation, save/load (also of a Hugging Face-style folder) and errors."""
import json, pickle, subprocess, sys

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from rankclip.text import SETTINGS_FILE, TextTokenizer, fit_tokenizer, get_tokenizer, train_tokenizer

CAPTIONS = [
    "grinning face with big eyes; face, grin, happy, mouth, open, smile",
    "red apple; apple, fruit, red",
    "penguin; bird, penguin, antarctica, cold",
    "sun with face; bright, face, space, sun, weather",
    "cat face; animal, cat, face, pet",
    "flag: Bosnia & Herzegovina; flag",
    "A penguin is a bird that cannot fly, but it swims very well.",
    "The apple is a round fruit. It can be red, green or yellow.",
    "A snowman is made of three big balls of snow.",
    "Café au lait, naïve smile, ÉCOLE 2024",
]


@pytest.fixture(scope="module")
def clip():
    return get_tokenizer("clip")


@pytest.mark.parametrize("context_length", [77, 16])
def test_clip_bpe_matches_open_clip(clip, context_length):
    strings = CAPTIONS + ["", "  spaces\tand\nnewlines  ", "Tom &amp; Jerry &lt;3", "don't it's we'll",
                          "emoji 😀🐧 and 日本語のテキスト", "mojibake: cafÃ©", "word " * 100, "!!!???", "12345 3.14"]
    ours = get_tokenizer("clip", context_length=context_length)(strings)
    reference = SimpleTokenizer(context_length=context_length)(strings)
    assert torch.equal(ours["input_ids"], reference)
    # open_clip pads with 0; the mask marks everything up to the end-of-text token
    lengths = ours["attention_mask"].sum(1)
    assert torch.equal(ours["input_ids"][torch.arange(len(strings)), lengths - 1], torch.full((len(strings),), 49407))


def test_clip_special_tokens_and_padding(clip):
    batch = clip(["red apple"])
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    n = int(mask.sum())
    assert clip.vocab_size == 49408 and clip.pad_id == 0
    assert ids[0] == 49406 and ids[n - 1] == 49407 and (ids[n:] == 0).all() and (mask[:n] == 1).all() and (mask[n:] == 0).all()


@pytest.mark.parametrize("kind,start,end,pad", [("bert", "[CLS]", "[SEP]", "[PAD]"), ("roberta", "<s>", "</s>", "<pad>")])
def test_trained_special_tokens(kind, start, end, pad):
    tok = fit_tokenizer(kind, CAPTIONS, vocab_size=300, context_length=24)
    batch = tok(CAPTIONS[:3])
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        words = [tok.tokenizer.id_to_token(int(i)) for i in ids]
        assert words[0] == start and words[n - 1] == end and set(words[n:]) <= {pad}
        assert start not in words[1:n - 1] and end not in words[1:n - 1]
    assert tok.pad_id == tok.tokenizer.token_to_id(pad) and tok.vocab_size <= 300


def test_bert_lowercases_roberta_keeps_case():
    bert, roberta = (fit_tokenizer(k, CAPTIONS, 300) for k in ("bert", "roberta"))
    assert torch.equal(bert(["RED Apple"])["input_ids"], bert(["red apple"])["input_ids"])
    assert not torch.equal(roberta(["RED Apple"])["input_ids"], roberta(["red apple"])["input_ids"])


@pytest.mark.parametrize("kind", ["clip", "bert", "roberta"])
def test_context_truncation(kind):
    tok = get_tokenizer(kind, captions=CAPTIONS, vocab_size=300, context_length=12)
    batch = tok(["penguin apple face " * 30, "red"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"][0].all() and batch["attention_mask"][1].sum() < 12
    # a truncated caption keeps its end token last
    assert tok.tokenizer.id_to_token(int(batch["input_ids"][0, -1])) == {"clip": "<end_of_text>", "bert": "[SEP]", "roberta": "</s>"}[kind]


_TRAIN = """
import sys
from rankclip.text import train_tokenizer
captions = [line for line in open(sys.argv[1]).read().split("\\n") if line]
train_tokenizer(sys.argv[2], captions, 400, sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_training_is_deterministic_across_processes(tmp_path, kind):
    import random
    rng = random.Random(0)
    words = "face grin happy smile apple fruit penguin bird cold sun bright space weather cat pet snow ball tree".split()
    captions = CAPTIONS + [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    (tmp_path/"captions.txt").write_text("\n".join(captions))
    outs = []
    for run in range(3):
        out = tmp_path/f"run{run}"
        subprocess.run([sys.executable, "-c", _TRAIN, str(tmp_path/"captions.txt"), kind, str(out)], check=True)
        outs.append((out/"tokenizer.json").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    in_process = fit_tokenizer(kind, captions, 400)
    in_process.save(tmp_path/"here")
    assert (tmp_path/"here"/"tokenizer.json").read_bytes() == outs[0]


@pytest.mark.parametrize("kind", ["clip", "bert", "roberta"])
def test_save_load_round_trip(tmp_path, kind):
    tok = get_tokenizer(kind, captions=CAPTIONS, vocab_size=300, context_length=20)
    tok.save(tmp_path)
    assert json.loads((tmp_path/SETTINGS_FILE).read_text())["name"] == kind
    loaded = get_tokenizer(kind, path=tmp_path)
    assert loaded.settings == tok.settings and loaded.vocab_size == tok.vocab_size
    for a, b in zip(tok(CAPTIONS).values(), loaded(CAPTIONS).values()):
        assert torch.equal(a, b)
    assert get_tokenizer(kind, path=tmp_path, context_length=9)(CAPTIONS)["input_ids"].shape == (len(CAPTIONS), 9)
    unpickled = pickle.loads(pickle.dumps(loaded))  # DataLoader workers receive it pickled
    assert torch.equal(unpickled(CAPTIONS)["input_ids"], tok(CAPTIONS)["input_ids"])


def test_load_hugging_face_style_folder(tmp_path):
    tok = fit_tokenizer("bert", CAPTIONS, 300)
    folder = tmp_path/"my-bert"
    folder.mkdir()
    tok.tokenizer.no_padding()
    tok.tokenizer.no_truncation()
    (folder/"tokenizer.json").write_text(tok.tokenizer.to_str())
    (folder/"tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "model_max_length": 512}))
    loaded = TextTokenizer.load(folder)
    assert loaded.name == "my-bert" and loaded.context_length == 77 and loaded.pad_id == tok.tokenizer.token_to_id("[PAD]")
    ids = loaded(["red apple"])["input_ids"][0]
    assert loaded.tokenizer.id_to_token(int(ids[0])) == "[CLS]"
    # with transformers' own fast tokenizer as the independent reader of the same file
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder/"tokenizer.json"), pad_token="[PAD]")
    ref = hf(CAPTIONS, padding="max_length", max_length=77, truncation=True)
    assert torch.equal(loaded(CAPTIONS)["input_ids"], torch.tensor(ref["input_ids"]))
    assert torch.equal(loaded(CAPTIONS)["attention_mask"], torch.tensor(ref["attention_mask"]))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'gpt'.*clip.*bert.*roberta"):
        get_tokenizer("gpt")
    with pytest.raises(ValueError, match="train_tokenizer"):
        get_tokenizer("roberta")
    with pytest.raises(ValueError, match="non-empty list"):
        fit_tokenizer("bert", [], 100)
    with pytest.raises(ValueError, match="non-empty list"):
        train_tokenizer("roberta", "a single string", 100, tmp_path/"x")
    with pytest.raises(ValueError, match="vocab_size=50 cannot hold"):
        fit_tokenizer("roberta", CAPTIONS, 50)
    with pytest.raises(ValueError, match="not trained"):
        fit_tokenizer("clip", CAPTIONS, 100)
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json"):
        get_tokenizer("bert", path=tmp_path/"nowhere")
    train_tokenizer("bert", CAPTIONS, 300, tmp_path/"b")
    with pytest.raises(ValueError, match="holds a 'bert' tokenizer, not 'roberta'"):
        get_tokenizer("roberta", path=tmp_path/"b")
    (tmp_path/"b"/SETTINGS_FILE).write_text('{"name": "bert", "contxt_length": 5}')
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE}.*rewrite"):
        TextTokenizer.load(tmp_path/"b")
    with pytest.raises(TypeError, match="caption 1 is a int"):
        get_tokenizer("clip")(["ok", 3])
    with pytest.raises(ValueError, match="context_length=1"):
        get_tokenizer("clip", context_length=1)
