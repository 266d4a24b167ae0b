"""``ReirConfig``: the single serializable description of a REIR model.

Sub-configs are stored as plain dicts (so ``config.json`` stays human-editable and
``PretrainedConfig`` serializes them without custom code) and exposed as typed
dataclasses through the ``*_spec`` properties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers import PretrainedConfig


@dataclass
class VisionSpec:
    """Visual branch: backbone -> token grid -> transformer encoder -> per-token heads."""

    backbone: str = "cnn"  # "cnn" (built-in conv stem, stride 8) | "siglip" (HF SiglipVisionModel)
    image_size: int = 64  # S: images are resized to S x S
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    box_prior_cells: float = 2.0  # initial predicted box side, in grid cells
    geometry_freqs: int = 8  # sine frequencies of the box-geometry encoding fed to the embedding head
    # > 0: a class head on every query, trained on matched queries (DETR's class loss);
    # it makes the instance features carry the category, which retrieval needs.
    num_classes: int = 0
    # A head on every query that predicts the mean colour of the centre of its box (trained on
    # matched queries, ``LossSpec.w_appearance``). Detection alone teaches the trunk the
    # category and the box, and a trunk trained from scratch then drops colour: weak mode,
    # which has no other signal that names it, ends with instance embeddings from which a
    # linear probe reads colour at chance. Predicting it keeps it in the tokens.
    appearance_head: bool = False
    # Probes on the stored vector itself: the class and the appearance colour are also
    # predicted from every matched query's L2-normalized instance embedding (linear heads,
    # ``LossSpec.w_probe``). The heads above keep them in the tokens; the embedding MLP then
    # kept only what the contrastive loss asked for: after the demo's stages 1 and 2 a linear
    # probe read colour at 75.6% from the stored vectors (99.8% with the probes), which caps
    # what the re-ranker can verify (docs/model.md, "Training stages").
    embedding_probes: bool = False
    # > 0 (with ``embedding_probes``): a third probe reads the image's scene label (one of
    # ``num_scene_classes``, e.g. the synthetic benchmark's five backgrounds) from every
    # matched query's stored vector. Expressions name the scene ("on the striped background")
    # and the re-ranker can only check what the stored vector carries; without it a linear
    # probe read the background from the demo's stored vectors at 32.7% (majority 24%)
    # against 96.8% from the visual tokens. Images without a label (-1) add nothing.
    num_scene_classes: int = 0
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    model_path: str | None = None  # local HF dir, read only when a model is first created
    hf_config: dict[str, Any] | None = None  # tower config, kept so checkpoints rebuild offline


@dataclass
class TextSpec:
    """Text branch: encoder -> pooled vector -> Mixture of Relation Experts -> embed_dim."""

    encoder: str = "bert"  # "bert" (built-in subword vocab, random init) | "hf" (local HF dir)
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    max_length: int = 32
    padding: str = "longest"  # "max_length" for towers that pool the last position (SigLIP)
    pooling: str = "mean"  # "mean" over the mask | "cls" | "pooler" (the tower's pooler_output)
    vocab_size: int | None = None  # built-in tokenizer size, filled in at creation
    model_path: str | None = None
    hf_config: dict[str, Any] | None = None


@dataclass
class MoreSpec:
    """Mixture of Relation Experts on the pooled text vector."""

    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 0  # 0: linear experts; >0: two-layer MLP experts of this width


@dataclass
class RerankSpec:
    """Relation-aware re-ranker (``reir.model.rerank``); ``hidden_size == 0``: none."""

    hidden_size: int = 0
    num_relations: int = 8  # learned geometric relations (soft "left of", "bigger than", ...)
    geometry_hidden: int = 32
    # dropout on the stored instance vectors while training: the re-ranker trains on vectors
    # of images the stage-2 model fit, and scores vectors of images it never saw
    input_dropout: float = 0.4
    # transformer layers over the expression's token states before the relation slots pool
    # them: the frozen text tower was trained to name the referent, not to mark which words
    # describe the landmark or the context (0: pool the tower's states directly)
    text_layers: int = 0
    # an image-level term: the expression's own slot against the projected mean of the image's
    # stored vectors; what every instance shares (the background) is clearer in their mean than
    # in any one of them. Discover mode's presence head uses it (reir.training.rerank).
    image_term: bool = False
    # one more relation whose weight is 1 for every other instance of the image, whatever the
    # geometry: "in the image with a white hexagon" names a landmark anywhere, which the learned
    # geometric relations (each near 0 for most pairs) cannot say; its existential term is then
    # log(eps + soft count of fitting instances), near 0 with one and about -3.9 with none
    context_relation: bool = False
    # layers of a text-conditioned transformer over an image's instances after the relation
    # terms (0: none): each instance's token holds its vector, box and what the expression asks
    # of it (its own slot, its landmark matches and soft counts); attention between instances is
    # biased by their relative geometry; the last layer adds a logit per instance (zero at the start)
    set_layers: int = 0
    set_hidden: int = 32
    # the relation slots' learned queries start at this many times the unit-variance scale; a new
    # re-ranker of a model (ReirModel.add_reranker) starts at NEW_RERANKER_QUERY_INIT (4)
    query_init: float = 1.0


@dataclass
class ImageRetrievalSpec:
    """Image-level retrieval head (``reir.model.image_retrieval``): one global vector per image,
    trained on expressions; the first stage of the two-stage baseline. ``hidden_size == 0``: none."""

    hidden_size: int = 0  # width of the pooled token's MLP
    num_heads: int = 4  # attention-pooling heads (must divide vision.hidden_size)


@dataclass
class LossSpec:
    """Matching costs and loss weights (DETR-style defaults, tuned for dense queries)."""

    match_obj: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0
    w_obj: float = 2.0
    w_l1: float = 5.0
    w_giou: float = 2.0
    w_rec: float = 1.0
    w_rec_stage2: float = 0.5
    w_clia: float = 1.0
    w_cls: float = 1.0
    w_aux: float = 0.01
    w_appearance: float = 1.0  # the appearance head's loss (models with ``vision.appearance_head``)
    w_probe: float = 1.0  # the embedding probes' loss (models with ``vision.embedding_probes``)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Weak stage (expressions without their referent's box), see ``reir.model.losses_weak``.
    w_weak: float = 1.0
    weak_detection: bool = True  # keep the detection losses on the images' (unlinked) boxes
    weak_temperature: float = 1.0  # MIL smooth max over an image's queries, in logit units
    weak_objectness_weight: float = 1.0  # alpha of the objectness prior alpha * log p(object)
    # Cosines (after removing the batch mean) above which a negative pair is a likely false
    # negative. High on purpose: a text tower trained from scratch spans few directions for
    # a long while (2 significant ones after 300 tiny-model steps), where 0.99 already
    # masked 2/3 of all negatives.
    weak_text_threshold: float = 0.999  # another image's expression vs this one
    weak_instance_threshold: float = 0.99  # that image's best instance vs the own image's best
    weak_suppressed_weight: float = 0.0  # weight of a suppressed negative pair (0: masked)
    # At most this fraction of an expression's negative images is suppressed (the most alike
    # first). Unbounded, a run collapsed: once every expression is one vector and one
    # embedding is every image's best candidate, every negative looks like a false negative,
    # the loss (positives only) falls to ~0 and nothing pushes back (lr 2e-3, step ~600:
    # 100% of the negatives masked, image retrieval at chance).
    weak_max_suppressed: float = 0.2
    # Within-image competition (``within_image_loss``): the candidate an expression picks must
    # fit it better than the image's other expressions, which mostly describe other objects.
    # On by default since the appearance head: with both, 96.5% of the weak model's answers on
    # the training set are right, 72.4% without this term (docs/model.md, weak mode).
    w_weak_within: float = 1.0
    weak_mil_matched: bool = False  # the cross-image MIL pools over those matched queries only


def _merge(spec_cls: type, value: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of ``spec_cls`` updated by ``value``; unknown keys are an error (typos)."""
    known = {f.name for f in fields(spec_cls)}
    value = dict(value or {})
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown {spec_cls.__name__} keys: {sorted(unknown)}")
    return asdict(spec_cls(**value))


class ReirConfig(PretrainedConfig):
    """Configuration of :class:`reir.model.modeling.ReirModel`.

    Args:
        vision / text / more / loss / rerank / image_retrieval: dicts of :class:`VisionSpec`,
            :class:`TextSpec`, :class:`MoreSpec`, :class:`LossSpec`, :class:`RerankSpec`,
            :class:`ImageRetrievalSpec` fields (missing keys take defaults; ``hidden_size == 0``:
            no re-ranker / no image-level retrieval head).
        embed_dim: D, the shared instance/text embedding size.
        logit_scale_init / logit_bias_init: SigLIP-style score ``exp(scale) * cos + bias``.
        max_instances: K, default number of instances kept per image by post-processing.
        nms_iou: default IoU threshold of post-processing NMS.
        preset: name of the preset the model was created from (informational).
    """

    model_type = "reir"

    def __init__(
        self,
        vision: dict[str, Any] | None = None,
        text: dict[str, Any] | None = None,
        more: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        rerank: dict[str, Any] | None = None,
        image_retrieval: dict[str, Any] | None = None,
        presence: dict[str, Any] | None = None,
        embed_dim: int = 32,
        logit_scale_init: float = 2.302585,  # log(10)
        logit_bias_init: float = -10.0,
        max_instances: int = 10,
        nms_iou: float = 0.7,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision = _merge(VisionSpec, vision)
        self.text = _merge(TextSpec, text)
        self.more = _merge(MoreSpec, more)
        self.loss = _merge(LossSpec, loss)
        self.rerank = _merge(RerankSpec, rerank)
        # Discover mode's own head (a RelationReranker trained for presence); hidden_size 0: none.
        self.presence = _merge(RerankSpec, presence or {"hidden_size": 0})
        self.image_retrieval = _merge(ImageRetrievalSpec, image_retrieval)
        self.embed_dim = embed_dim
        self.logit_scale_init = logit_scale_init
        self.logit_bias_init = logit_bias_init
        self.max_instances = max_instances
        self.nms_iou = nms_iou
        self.preset = preset
        super().__init__(**kwargs)

    @property
    def vision_spec(self) -> VisionSpec:
        return VisionSpec(**self.vision)

    @property
    def text_spec(self) -> TextSpec:
        return TextSpec(**self.text)

    @property
    def more_spec(self) -> MoreSpec:
        return MoreSpec(**self.more)

    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(**self.loss)

    @property
    def rerank_spec(self) -> RerankSpec:
        return RerankSpec(**self.rerank)

    @property
    def presence_spec(self) -> RerankSpec:
        return RerankSpec(**self.presence)

    @property
    def image_retrieval_spec(self) -> ImageRetrievalSpec:
        return ImageRetrievalSpec(**self.image_retrieval)
