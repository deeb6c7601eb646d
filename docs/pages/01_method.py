# %% [markdown]
# # Method
#
# > RankCLIP in equations: the CLIP loss, the Plackett-Luce likelihood of a ranking, the two
# > ranking-consistency terms, and where the official code departs from the paper.

# %% [markdown]
# CLIP learns from one bit per pair: this caption belongs to this image, every other caption in the
# batch does not. RankCLIP (Zhang et al., ICCV 2025) keeps that loss and adds a second signal: the
# *order* in which one side ranks the other should agree across modalities and within them. Captions
# that are similar to an image's caption should rank high for that image, even though they are
# "negatives" for CLIP. This page states the method; [Losses](09_losses.ipynb) implements it and
# checks each piece against an independent reference.
#
# ## Similarities
#
# For a batch of $N$ image-text pairs with L2-normalised embeddings $u_i$ (rows of $U$) and $v_i$
# (rows of $V$), and the learnable logit scale $s = e^t$ ($t$ starts at $\ln(1/0.07)$, clamped to
# $[0, \ln 100]$):
#
# $$S_{IT} = s\,UV^\top,\qquad S_{TI} = S_{IT}^\top,\qquad S_{II} = s\,UU^\top,\qquad S_{TT} = s\,VV^\top.$$
#
# Row $i$ of $S_{IT}$ scores every text against image $i$; row $i$ of $S_{TI}$ scores every image
# against text $i$.
#
# ## CLIP loss
#
# The symmetric cross-entropy with the matching pair as the label:
#
# $$L_\text{clip} = \tfrac12\big(\mathrm{CE}(S_{IT}, \mathrm{diag}) + \mathrm{CE}(S_{TI}, \mathrm{diag})\big).$$
#
# ## Plackett-Luce likelihood of a ranking (ListMLE)
#
# A score row $x$ defines a distribution over orderings: pick the first item with probability
# $\mathrm{softmax}(x)$, then the second among the rest, and so on. The negative log-likelihood of the
# ordering that a target row $y$ gives, with $\pi$ sorting $y$ in descending order, is
#
# $$\mathrm{PL}(x; y) = \sum_{k=1}^{N} \Big[\log\sum_{j\ge k} e^{x_{\pi(j)}} - x_{\pi(k)}\Big].$$
#
# This is ListMLE (Xia et al. 2008). The target enters only through its ordering: no gradient flows
# through $y$. `plackett_luce_nll` computes it in closed form, stable at logit scale 100.
#
# ## Ranking consistency
#
# **Cross-modal.** The ranking of texts by image $i$ should agree with the ranking of images by
# text $i$, and the reverse:
#
# $$L_\text{cross} = \frac1N\sum_i \tfrac12\Big[\mathrm{PL}(S_{IT}[i]; S_{TI}[i]) + \mathrm{PL}(S_{TI}[i]; S_{IT}[i])\Big].$$
#
# **In-modal.** The ranking of images by similarity to image $i$ should agree with the ranking of
# texts by similarity to text $i$, and the reverse:
#
# $$L_\text{in} = \frac1N\sum_i \tfrac12\Big[\mathrm{PL}(S_{II}[i]; S_{TT}[i]) + \mathrm{PL}(S_{TT}[i]; S_{II}[i])\Big].$$
#
# **Total.**
#
# $$L = L_\text{clip} + \lambda_c\,L_\text{cross} + \lambda_i\,L_\text{in},\qquad \lambda_c = \lambda_i = \tfrac1{16}\ \text{in the paper}.$$
#
# The paper's text also mentions a position decay $\mu_k = 1/\log(k+1)$ that weights the top of the
# ranking more (`position_decay=True`); the official code has none.
#
# ## Variants compared
#
# | variant | $\lambda_c$ | $\lambda_i$ | extra terms |
# |---|---|---|---|
# | CLIP | 0 | 0 | none |
# | RankCLIP | 1/16 | 1/16 | both ranking terms |
# | RankCLIP$^C$ | 1/16 | 0 | cross-modal only |
# | RankCLIP$^I$ | 0 | 1/16 | in-modal only |
# | CyCLIP (Goel et al. 2022) | | | $\lambda\,\tfrac1N\sum_{i,j}\big(\langle u_i,u_j\rangle-\langle v_i,v_j\rangle\big)^2$ and $\lambda\,\tfrac1N\sum_{i,j}\big(\langle u_i,v_j\rangle-\langle u_j,v_i\rangle\big)^2$, $\lambda = 0.25$ |
#
# The ablations of the study: $\lambda_c = \lambda_i \in \{1/16, 1/32, 1/64\}$, and the image encoder
# (ResNet-50/101, DenseNet-121) and text encoder (CLIP's transformer, BERT-base, RoBERTa-base) swapped.
#
# ## Paper versus the official code
#
# - **Scale of the ranking terms.** The code divides each direction's ListMLE by 32 (the $\tfrac1{16}$
#   times the mean of two directions) and then by $N$, so each ranking term is a per-position mean:
#   $\tfrac1N\,L_\text{cross}$ and $\tfrac1N\,L_\text{in}$ above. `RankCLIPLoss` does the same, so
#   that $\lambda = 1/16$ means the paper's weight.
# - **Ramp.** The code multiplies the ranking terms by $w(e) = \mathrm{clamp}\big(3(e-1)/(E-1), 0, 2\big)$
#   over epochs $e = 1..E$, so the weight ends at $2/16$ (`official_ramp=True`).
# - **Numerics.** The code's ListMLE (from allRank) subtracts the row maximum and takes
#   $\log(\text{cumsum}(e^{x}) + 10^{-10})$: at logit scale 100 a row spans 200 logits, the tail
#   underflows in float32 and the term degenerates. [Losses](09_losses.ipynb) shows the failure.
# - **Gradients across GPUs.** `all_gather` carries no gradient in the code (only local rows get
#   gradients); `gather_with_grad` chooses here, and the local-loss decomposition makes both exact.
#
# ## Evaluation
#
# Zero-shot classification with prompt ensembles, a linear probe on frozen features, image-text
# retrieval, and the geometry of the embedding space: the **modality gap** (Liang et al. 2022), the
# distance between the centroids of the image and text embeddings,
#
# $$\Delta = \Big\lVert \tfrac1n\textstyle\sum_i u_i - \tfrac1n\sum_i v_i \Big\rVert,$$
#
# with alignment $\tfrac1n\sum_i \lVert u_i - v_i\rVert^2$ and uniformity beside it. Every number is
# reported with a bootstrap confidence interval and the chance and majority baselines:
# [Evaluate](17_evaluate.ipynb).
