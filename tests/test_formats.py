"""Bad-input checks of rankclip.formats; every malformed input is built here, in tmp_path. Shards and tables read by
index for training (rankclip.loading), bad shards included, are checked in tests/test_corpus.py."""
import io, json, socket, subprocess, warnings

import numpy as np
import pytest
from PIL import Image

from rankclip.formats import CsvImageText, ImageError, SampleError, Skipped, expand_shards, load_image, zero_shot_dataset


def save(im, path, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pixel(im, xy=(0, 0)):
    return np.array(im.getpixel(xy), dtype=float)


# --- image decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_image_names_file(tmp_path, fmt, suffix):
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    f = tmp_path / f"cut.{suffix}"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(f)
    assert str(f) in str(e.value) and e.value.reason == "corrupt image" and "re-encode" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_garbage_bytes_named_jpg(tmp_path):
    f = tmp_path / "page.jpg"
    f.write_bytes(b"<html><body>404</body></html>")
    with pytest.raises(ImageError, match="page.jpg: corrupt image"):
        load_image(f)
    with pytest.raises(ImageError, match="shard-7.tar: 0042.jpg: corrupt image"):
        load_image(b"\x00" * 100, name="shard-7.tar: 0042.jpg")


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match="gone.png: missing image file"):
        load_image(tmp_path / "gone.png")


def composite_on_white(rgba):
    "Independent reference: straight-alpha 'over' onto white."
    rgb, a = np.array(rgba[:3], float), rgba[3] / 255
    return rgb * a + 255 * (1 - a)


@pytest.mark.parametrize("rgba", [(0, 0, 0, 0), (10, 200, 30, 255), (255, 0, 0, 128), (0, 0, 255, 64)])
def test_rgba_png_composited_on_white(tmp_path, rgba):
    im = load_image(save(Image.new("RGBA", (3, 3), rgba), tmp_path / "a.png"))
    assert im.mode == "RGB"
    np.testing.assert_allclose(pixel(im), composite_on_white(rgba), atol=1)


def test_la_png(tmp_path):
    im = load_image(save(Image.new("LA", (2, 2), (40, 0)), tmp_path / "la.png"))
    np.testing.assert_allclose(pixel(im), [255, 255, 255])
    im = load_image(save(Image.new("LA", (2, 2), (40, 255)), tmp_path / "la2.png"))
    np.testing.assert_allclose(pixel(im), [40, 40, 40])


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([250, 0, 0, 0, 0, 200])
    p.putpixel((1, 0), 1)
    f = save(p, tmp_path / "p.png", transparency=0)
    assert Image.open(f).mode == "P"
    im = load_image(f)
    np.testing.assert_allclose(pixel(im, (0, 0)), [255, 255, 255])
    np.testing.assert_allclose(pixel(im, (1, 0)), [0, 0, 200])
    g = Image.new("P", (1, 1), 0)
    g.putpalette([1, 2, 3])
    np.testing.assert_allclose(pixel(load_image(save(g, tmp_path / "p.gif"))), [1, 2, 3])


def test_grey_l(tmp_path):
    np.testing.assert_allclose(pixel(load_image(save(Image.new("L", (2, 2), 77), tmp_path / "g.png"))), [77, 77, 77])


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("TIFF", "tif")])
def test_cmyk_cyan(tmp_path, fmt, suffix):
    f = save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / f"cyan.{suffix}", fmt)
    assert Image.open(f).mode == "CMYK"
    np.testing.assert_allclose(pixel(load_image(f), (4, 4)), [0, 255, 255], atol=3)


def test_sixteen_bit_grey_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    f = save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(f).mode.startswith("I")
    im = load_image(f)
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_exif_orientation(tmp_path):
    photo = Image.new("RGB", (30, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 10, 10, 20))  # bottom-left block; orientation 6 rotates it to top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    im = load_image(save(photo, tmp_path / "phone.jpg", exif=exif))
    assert im.size == (20, 30)
    np.testing.assert_allclose(pixel(im, (3, 3)), [255, 0, 0], atol=12)
    np.testing.assert_allclose(pixel(im, (16, 26)), [0, 0, 255], atol=12)


def test_size_limit_parameter(tmp_path):
    f = save(Image.new("RGB", (40, 30)), tmp_path / "big.png")
    with pytest.raises(ImageError) as e:
        load_image(f, max_pixels=1000)
    msg = str(e.value)
    assert "big.png" in msg and "40x30 = 1,200 pixels" in msg and "max_pixels=1200" in msg and e.value.reason == "image too large"
    assert load_image(f, max_pixels=1200).size == (40, 30)
    assert load_image(f, max_pixels=None).size == (40, 30)


@pytest.mark.parametrize("side", [12, 20])  # over Pillow's limit (a warning there) and over twice it (an error)
def test_pillow_limit_is_default_and_not_mutated(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    f = save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as e:
            load_image(f)
    assert "bomb.png" in str(e.value) and f"{side * side:,} pixels" in str(e.value) and "max_pixels=" in str(e.value)
    assert load_image(f, max_pixels=side * side).size == (side, side)
    assert Image.MAX_IMAGE_PIXELS == 100


# --- CSV / TSV ------------------------------------------------------------------------------------

def cc3m(tmp_path, rows, name="train.tsv", header="filepath\ttitle", sep="\t"):
    for i, colour in enumerate(["red", "green", "blue"]):
        save(Image.new("RGB", (8, 8), colour), tmp_path / "images" / f"{i}.png")
    f = tmp_path / name
    f.write_text("\n".join([header] + [sep.join(r) for r in rows]) + "\n", encoding="utf-8")
    return f


def test_csv_reads_relative_and_absolute_paths(tmp_path):
    absolute = str(tmp_path / "images" / "2.png")
    f = cc3m(tmp_path / "d", [("images/0.png", "a red square"), (absolute, "a blue square")])
    save(Image.new("RGB", (8, 8), "blue"), tmp_path / "images" / "2.png")
    ds = CsvImageText(f)
    assert len(ds) == 2
    (im0, c0), (im1, c1) = ds[0], ds[1]
    assert (c0, c1) == ("a red square", "a blue square")
    np.testing.assert_allclose(pixel(im0), [255, 0, 0], atol=2)
    np.testing.assert_allclose(pixel(im1), [0, 0, 255], atol=2)


def test_csv_comma_default_quoting_and_custom_keys(tmp_path):
    f = cc3m(tmp_path, [("images/1.png", '"green, like grass"', "x")], name="pairs.csv", header="url,caption,extra", sep=",")
    ds = CsvImageText(f, img_key="url", caption_key="caption")
    assert ds[0][1] == "green, like grass"
    g = cc3m(tmp_path, [("images/1.png", "green")], name="pairs.txt", header="url|caption", sep="|")
    assert CsvImageText(g, img_key="url", caption_key="caption", sep="|")[0][1] == "green"


def test_csv_missing_column(tmp_path):
    f = cc3m(tmp_path, [("images/0.png", "red")], header="filepath\tcaption")
    with pytest.raises(ValueError) as e:
        CsvImageText(f)
    msg = str(e.value)
    assert str(f) in msg and "'title'" in msg and "'filepath', 'caption'" in msg and "caption_key=" in msg


def test_csv_wrong_delimiter_hint(tmp_path):
    f = cc3m(tmp_path, [("images/0.png", "red")], header="filepath,title", sep=",", name="t.tsv")
    with pytest.raises(ValueError, match=r"t\.tsv: missing column 'filepath'.*sep="):
        CsvImageText(f)


def test_csv_empty_caption_names_line(tmp_path):
    f = cc3m(tmp_path, [("images/0.png", "red"), ("images/1.png", "green"), ("images/2.png", "  ")])
    with pytest.raises(SampleError) as e:
        CsvImageText(f)
    assert f"{f} line 4: empty caption" in str(e.value)


def test_csv_missing_image_file_names_line_and_path(tmp_path):
    f = cc3m(tmp_path, [("images/0.png", "red"), ("images/nope.png", "lost")])
    resolved = tmp_path / "images" / "nope.png"
    with pytest.raises(SampleError) as e:
        CsvImageText(f)
    assert f"{f} line 3 ({resolved}): missing image file" in str(e.value)
    ds = CsvImageText(f, check_files=False)
    with pytest.raises(ImageError) as e:
        ds[1]
    assert f"{f} line 3 ({resolved}): missing image file" in str(e.value)


def test_csv_corrupt_image_at_getitem_names_line(tmp_path):
    f = cc3m(tmp_path, [("images/0.png", "red"), ("images/bad.png", "broken")])
    (tmp_path / "images" / "bad.png").write_bytes(encoded(Image.new("RGB", (64, 64)), "PNG")[:60])
    ds = CsvImageText(f)
    with pytest.raises(ImageError, match=r"train\.tsv line 3 \(.*bad\.png\): corrupt image"):
        ds[1]


def test_csv_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        CsvImageText(tmp_path / "nothere.tsv")


def test_csv_skip_mode_returns_named_records(tmp_path):
    rows = [(f"images/{i % 3}.png", f"caption {i}") for i in range(12)]
    rows[2] = ("images/0.png", "")
    rows[5] = ("images/missing.png", "lost")
    rows[9] = ("images/bad.png", "broken")
    f = cc3m(tmp_path, rows)
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    ds = CsvImageText(f, on_error="skip")
    items = [ds[i] for i in range(len(ds))]
    assert [x[1] for x in items if not isinstance(x, Skipped)] == [f"caption {i}" for i in range(12) if i not in (2, 5, 9)]
    skipped = [x for x in items if isinstance(x, Skipped)]
    assert skipped[:2] == [Skipped("empty caption", f"{f} line 4"),
                           Skipped("missing image file", f"{f} line 7 ({tmp_path / 'images' / 'missing.png'})")]
    assert skipped[2] == Skipped("corrupt image", f"{f} line 11 ({tmp_path / 'images' / 'bad.png'})")
    with pytest.raises(ImageError, match=r"line 11 \(.*bad\.png\): corrupt image"):
        ds.read(9)  # the row without the skip policy


def test_on_error_value_checked(tmp_path):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        CsvImageText(cc3m(tmp_path, [("images/0.png", "red")]), on_error="ignore")


# --- webdataset shards ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["shard-{00000..00009}.tar", "a{1..3}b{x,yz}.tar", "s{8..11}.tar", "{10..7}"])
def test_brace_expansion_matches_bash(pattern):
    bash = subprocess.run(["bash", "-c", f"echo {pattern}"], capture_output=True, text=True, check=True).stdout.split()
    assert expand_shards(pattern) == bash


# --- zero-shot sets -------------------------------------------------------------------------------

def test_imagefolder_zero_shot(tmp_path):
    colours = {"fire_truck": (255, 0, 0), "sky": (0, 0, 255), "tree": (0, 128, 0)}
    for cls, rgb in colours.items():
        for i in range(2):
            save(Image.new("RGB", (5, 5), rgb), tmp_path / "test" / cls / f"{i}.png")
    ds, classnames = zero_shot_dataset("imagefolder", tmp_path, transform=None)
    assert classnames == ["fire truck", "sky", "tree"] and len(ds) == 6
    for i in range(len(ds)):
        im, label = ds[i]
        key = sorted(colours)[label]
        np.testing.assert_allclose(pixel(im), colours[key])


def test_imagenet_layout_with_class_map(tmp_path):
    for wnid in ["n01443537", "n01440764"]:
        save(Image.new("RGB", (5, 5)), tmp_path / "val" / wnid / "x.JPEG")
    (tmp_path / "map.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    (tmp_path / "map.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    for m in ["map.txt", "map.json"]:
        _, classnames = zero_shot_dataset("imagenet", tmp_path, class_map=tmp_path / m)
        assert classnames == ["tench", "goldfish"]
    with pytest.warns(UserWarning, match="WordNet ids"):
        assert zero_shot_dataset("imagenet", tmp_path, split="val")[1] == ["n01440764", "n01443537"]
    with pytest.raises(ValueError, match="class_map lacks 1 folders .*n01443537"):
        zero_shot_dataset("imagenet", tmp_path, class_map={"n01440764": "tench"})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'train'}"):
        zero_shot_dataset("imagenet", tmp_path, split="train")


def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_root_without_network(tmp_path, monkeypatch, name, folder):
    no_network(monkeypatch)
    with pytest.raises(FileNotFoundError) as e:
        zero_shot_dataset(name, tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / folder) in msg and "nothing is downloaded" in msg and ".tar.gz" in msg
    assert not (tmp_path / "nowhere").exists()


def test_cifar_corrupt_files(tmp_path, monkeypatch):
    no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / f).write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"{folder}.*fail torchvision's checks"):
        zero_shot_dataset("cifar10", tmp_path)


def test_unknown_zero_shot_set_lists_names(tmp_path):
    with pytest.raises(ValueError, match="'mnist'; available: cifar10, cifar100, imagefolder, imagenet"):
        zero_shot_dataset("mnist", tmp_path)
