"""Built-in word-level tokenizer for the ``tiny`` and ``small`` presets.

The vocabulary is a fixed literal list (never downloaded) so that a preset built on
any machine gets identical token ids. It covers the synthetic referring-expression
grammar (colors, shapes, sizes, spatial relations, numbers) plus a few hundred common
English words so that free-typed queries degrade gracefully instead of becoming [UNK].
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _words(block: str) -> list[str]:
    return block.split()


_GRAMMAR = _words("""
the a an this that these those one ones object objects shape shapes thing things item items
is are which who with without and or not of to in on at by from for as than
red green blue yellow purple orange cyan magenta pink brown black white gray grey
violet gold silver teal navy maroon olive lime beige dark light bright pale colored
square squares circle circles triangle triangles rectangle rectangles ellipse ellipses
oval ovals star stars diamond diamonds pentagon pentagons hexagon hexagons cross crosses
disk disc dot dots ring rings box boxes block blocks ball balls cube cubes cylinder
sphere polygon round
small smaller smallest large larger largest big bigger biggest tiny huge medium little
tall taller tallest short shorter shortest wide wider widest narrow size sized same
left right above below top bottom middle center centre central next near nearest far
farthest furthest close closer closest beside besides between behind front under over
upper lower leftmost rightmost topmost bottommost uppermost lowermost side corner edge
horizontal vertical up down across around inside outside along toward towards away
first second third fourth fifth last other another only all both each every any no
zero two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9
background backgrounds plain striped stripes checkered checkerboard gradient noisy noise
textured dotted against picture image photo scene highest lowest
""")

_PUNCTUATION: tuple[str, ...] = tuple(",.;:!?'\"-()/&")

_COMMON = _words("""
i you he she it we they me him her us them my your his its our their mine yours
be was were been being have has had do does did done can could will would shall should
may might must get got make made take took see seen look looking find found show shown
give go going come want need like use used put place placed located sitting standing
lying appears appear picture image photo scene background foreground area part piece
what where when why how there here then now very more most less least much many few
some several lot lots also just even still again too so but if about into onto out off
through after before while during until since because although however without within
man woman person people boy girl child kid men women player guy lady dog cat bird horse
car bus truck bike bicycle train plane boat chair table couch sofa bed bench tree plant
flower grass sky water road street building house window door wall floor sign light
lamp cup bowl bottle glass plate food pizza cake sandwich banana apple orange umbrella
bag hat shirt jacket coat shoe shoes hand head face arm leg eye hair phone laptop
screen tv book clock vase toy kite frisbee surfboard skateboard skis ball pole fence
line lines pattern stripe striped spotted plain solid empty full open closed
new old young good bad best better high low long full half whole single double pair
group row column set number piece pieces edge edges border frame space spot point
day night time year way world life hand part place case week company system program
question work government fact home water room mother area money story month lot eye
say said know think thought tell told ask asked feel felt seem try tried leave call
keep let begin began help talk turn start run move live hold bring write sit stand
lose pay meet include continue learn change lead understand watch follow stop create
speak read spend grow offer remember love consider buy wait serve die send expect build
stay fall cut reach kill remain suggest raise pass sell require report decide pull
""")


def build_vocab() -> list[str]:
    """The fixed vocabulary: specials first (ids 0..3), then words, deduplicated in order."""
    seen: dict[str, None] = {}
    for word in (*SPECIAL_TOKENS, *_GRAMMAR, *_PUNCTUATION, *_COMMON):
        seen.setdefault(word.lower() if word not in SPECIAL_TOKENS else word, None)
    return list(seen)


def build_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`build_vocab`, wrapped for ``transformers``."""
    vocab = {word: idx for idx, word in enumerate(build_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    # Whitespace first, then split punctuation off words ("square," -> "square" ",").
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=model_max_length,
    )
