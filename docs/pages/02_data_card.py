# %% [markdown]
# # Data card
#
# > What the study trains and evaluates on: real images and captions that install from package
# > registries, pinned by version and checksum; and the loaders for data people bring.

# %% [markdown]
# The machines this study runs on reach PyPI, Debian and npm, and nothing else: CC3M, ImageNet or
# CIFAR cannot be downloaded there, and no code fetches from a model or data hub at run time. The study
# therefore trains on an embedded corpus built from packages, pinned by version and by the sha256 of
# each archive (`rankclip fetch-data`, checked against `data.dvc`), and keeps real loaders for
# CC3M-style tables, webdataset shards and ImageNet folders ([How-to: real data](how_to_real_data.ipynb)).
#
# ## Sources
#
# The table is computed from the fetched data when the docs are built:

# %%
#| echo: false
from rankclip.data import emoji_catalogue, openmoji_catalogue, fashion_catalogue, tuxpaint_catalogue, data_card, montage
cats = {"emoji": emoji_catalogue("../data"), "openmoji": openmoji_catalogue("../data"),
        "fashion_mnist": fashion_catalogue("../data"), "tuxpaint": tuxpaint_catalogue("../data")}
data_card(cats)

# %% [markdown]
# A random row of each, decoded from the fetched archives:

# %%
#| echo: false
fig = montage(cats, per_source=10)

# %% [markdown]
# ## What each source is for
#
# - **Emoji in four vendor styles** (`emoji-datasource` 16.0.0, npm): the pretraining pairs. One 32 px
#   drawing per emoji and vendor (Apple, Google, Twitter, Facebook), captioned with its Unicode name,
#   the skin tone in words, and OpenMoji's tags for the same code point, e.g. *"woman in manual
#   wheelchair facing right; accessibility, facing, manual, right, wheelchair, woman"*. The same
#   caption belongs to four drawings: the data are many-to-many by construction, which is what ranking
#   consistency claims to exploit. Three vendors train; the fourth is held out.
# - **OpenMoji** (`openmoji` 17.0.0, npm, CC-BY-SA-4.0): another artist's drawings of the same emoji,
#   rasterised from SVG. Zero-shot category (9 classes) and subcategory classification on it is a
#   style-shift test, the embedded analogue of ImageNet-R or -Sketch.
# - **Fashion-MNIST** (Debian `dataset-fashion-mnist`, MIT): 60,000 training and 10,000 test images of
#   10 classes, 28 px grey; the standard linear-probe benchmark, and zero-shot with
#   *"a photo of a {class}"* prompts.
# - **Tux Paint stamps** (Debian `tuxpaint-stamps-default`, GPL-2.0-or-later): about 950 images with
#   an English sentence each, a small real image-text retrieval set.
#
# ## Care points
#
# - **Zero-shot is kept honest**: an OpenMoji tag that contains a category or subcategory name is
#   dropped from the training captions. The Unicode names stay as they are ("red heart", "flag:
#   Germany"): that is how the emoji are named, as an ImageNet class name inside a CC3M caption is.
# - **Licences differ per vendor**: Google's drawings are Apache-2.0, Twitter's CC-BY-4.0, Apple's not
#   for commercial use, Facebook's unclear. Images are fetched at set-up time and never committed.
# - **Scale**: about 15,000 emoji drawings are more than two orders of magnitude below CC3M's 3.3
#   million pairs, and the drawings are small and clean. Results here compare methods under these
#   conditions; they are no prediction of CC3M-scale numbers.
# - **Skin-tone variants** of one emoji are near-duplicates that share most of their caption.
