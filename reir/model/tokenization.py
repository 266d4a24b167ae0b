"""Built-in subword tokenizer for the ``tiny`` and ``small`` presets.

The vocabulary is a fixed literal list (never downloaded) so that a preset built on
any machine gets identical token ids. It covers the synthetic referring-expression
grammar (colors, shapes, sizes, spatial relations, numbers) plus a few hundred common
English words so that free-typed queries degrade gracefully instead of becoming [UNK].
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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
color colors colour colours coloured colorful shaded tinted hue furthest farthest very containing contains
also positioned situated sits lies rests appearing holding having featuring
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


# Real words the vocabulary lacks that the spelling corrector must leave as typed: each is
# one edit from a known word ("pick" -> "pink", "mark" -> "dark", "seek" -> "see"), and a
# person typing "pick the red circle" means no colour. They split into pieces like any
# unknown word. (Words of the vocabulary are never corrected anyway.)
AS_TYPED = frozenset(_words("""
am whom whose whether search pick wonder guess mean check notice seek locate identify select
choose mark highlight return please hey hello okay well really actually maybe perhaps thanks
thank quickly somewhere anywhere somehow
park bark dare ink link pint bed led rod rid glue clue greet tank wine bring
"""))


# Subword pieces after the words: any word the lists miss still splits into known pieces
# (a word start, then "##" continuations) instead of becoming [UNK]. Common English
# endings come whole, so "reddish" is "red ##d ##ish" and "crimson" "c ##r ##i ..."
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
_SUFFIXES = _words("""
s es ed er ers est ing ish ly y ness less ful al ic ive ous en ion ions ment able ible
ward wards most side shaped like th st nd rd
""")


def build_vocab() -> list[str]:
    """The fixed vocabulary: specials first (ids 0..3), then words, punctuation and subword
    pieces, deduplicated in order. Ids of earlier entries never move when pieces are added."""
    seen: dict[str, None] = {}
    pieces = [*_LETTERS, *(f"##{c}" for c in _LETTERS), *(f"##{s}" for s in _SUFFIXES)]
    for word in (*SPECIAL_TOKENS, *_GRAMMAR, *_PUNCTUATION, *_COMMON, *pieces):
        seen.setdefault(word.lower() if word not in SPECIAL_TOKENS else word, None)
    return list(seen)


def build_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """WordPiece tokenizer over :func:`build_vocab`, wrapped for ``transformers``: known
    words are one token, anything else is spelled with subword pieces."""
    vocab = {word: idx for idx, word in enumerate(build_vocab())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=40))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    # Whitespace first, then split punctuation off words ("square," -> "square" ",").
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
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


_WORD = re.compile(r"[A-Za-z]+")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TEXT_CACHE_SIZE = 200_000  # SpellingCorrector: corrected texts kept


class SpellingCorrector:
    """Maps a word the vocabulary lacks to a known word one edit away (a letter dropped,
    added, changed, or two neighbours swapped): "cirlce" -> "circle", "trinagle" ->
    "triangle". Typed queries carry typos that a model trained from scratch has never seen,
    and a subword split of a typo ("c ##i ##r ##l ##c ##e") means nothing to it.

    Only words of at least ``min_length`` letters are touched, and only when they are not
    known themselves nor real words listed in ``as_typed`` (:data:`AS_TYPED`); among several candidates the one earliest in ``known`` wins, so list
    the domain's words first (as :func:`build_vocab` does).
    """

    def __init__(self, known: list[str], *, min_length: int = 4, as_typed: Iterable[str] = AS_TYPED,
                 text_cache: int = TEXT_CACHE_SIZE) -> None:
        self.rank = {w: i for i, w in enumerate(known) if w.isalpha()}
        self.as_typed = frozenset(w.lower() for w in as_typed)
        self.min_length = min_length
        self._cache: dict[str, str] = {}
        # Whole texts as well: training sees each expression once an epoch (and the processor
        # corrects it twice a batch, to count its tokens and to encode it); one regex pass with a
        # call per word was ~2% of a stage-1 step on 2 cores. Emptied when full.
        self._texts: dict[str, str] = {}
        self._text_cache = int(text_cache)

    def __getstate__(self) -> dict[str, object]:
        # A processor shipped to another process (a Ray actor) starts with no texts kept.
        return {**self.__dict__, "_texts": {}}

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpellingCorrector:
        vocab = tokenizer.get_vocab()
        return cls(sorted((w for w in vocab if not w.startswith("##")), key=vocab.__getitem__))

    def word(self, word: str) -> str:
        low = word.lower()
        if len(low) < self.min_length or low in self.rank or low in self.as_typed:
            return word
        if low not in self._cache:
            found = [c for c in _edits(low) if c in self.rank]
            self._cache[low] = min(found, key=self.rank.__getitem__) if found else word
        return self._cache[low]

    def __call__(self, text: str) -> str:
        done = self._texts.get(text)
        if done is None:
            if len(self._texts) >= self._text_cache:
                self._texts.clear()
            done = self._texts[text] = _WORD.sub(lambda m: self.word(m.group(0)), text)
        return done


def _edits(word: str) -> set[str]:
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in _ALPHABET}
    out |= {a + c + b for a, b in splits for c in _ALPHABET}
    return out
