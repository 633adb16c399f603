#!/usr/bin/env python
"""Generate the tiny, offline test fixtures shipped with the repository.

Writes, deterministically and without any network access:

* ``data/fixtures/tiny_corpus.txt``: a synthetic English-like corpus of short stories produced by
  a small seeded grammar. Documents are separated by one blank line. The stories carry simple,
  learnable regularities (a protagonist named in the first sentence and referred to by a
  consistent pronoun afterwards, counting sequences, small additions and subtractions, fixed
  story openings and endings) so that a tiny transformer shows a falling loss within a few
  hundred steps.
* ``data/fixtures/tiny_tokenizer/``: a byte-level BPE tokenizer (vocabulary 512) trained on that
  corpus with the ``tokenizers`` library, saved so that
  ``transformers.AutoTokenizer.from_pretrained("data/fixtures/tiny_tokenizer")`` returns a fast
  tokenizer with ``bos_token == eos_token == "<|endoftext|>"`` (id 0) and no pad token.

Running the script twice produces byte-identical files.

Usage::

    python data/make_fixtures.py [--out data/fixtures]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

SEED = 1234
# The generator adds whole stories until the corpus reaches this many characters (~200 KB).
TARGET_CHARS = 200_000
VOCAB_SIZE = 512
SPECIAL_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 1024

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
CORPUS_NAME = "tiny_corpus.txt"
# Held-out stories from the same grammar (another seed), for validation in experiments/debug.yaml.
VAL_CORPUS_NAME = "tiny_corpus_val.txt"
VAL_SEED_OFFSET = 1
VAL_TARGET_CHARS = 20_000
TOKENIZER_DIRNAME = "tiny_tokenizer"

# --------------------------------------------------------------------------------------------
# The grammar's word lists
# --------------------------------------------------------------------------------------------

# (name, subject pronoun, object pronoun, possessive)
CHARACTERS = [
    ("Anna", "she", "her", "her"), ("Ben", "he", "him", "his"), ("Clara", "she", "her", "her"),
    ("David", "he", "him", "his"), ("Emma", "she", "her", "her"), ("Finn", "he", "him", "his"),
    ("Grace", "she", "her", "her"), ("Henry", "he", "him", "his"), ("Ida", "she", "her", "her"),
    ("Jack", "he", "him", "his"), ("Lily", "she", "her", "her"), ("Max", "he", "him", "his"),
    ("Nora", "she", "her", "her"), ("Oscar", "he", "him", "his"), ("Rosa", "she", "her", "her"),
    ("Sam", "he", "him", "his"), ("Tina", "she", "her", "her"), ("Tom", "he", "him", "his"),
]
# Creatures of either gender; GENDERED adds the ones that must agree with the pronoun.
CREATURES = ["cat", "dog", "fox", "bird", "rabbit", "bear", "mouse", "farmer", "baker",
             "sailor", "owl", "frog"]
GENDERED = {"she": ["girl", "queen", "princess"], "he": ["boy", "king", "prince"]}
ADJECTIVES = ["little", "big", "happy", "sad", "brave", "quiet", "clever", "old", "young",
              "kind", "tired", "curious", "funny", "shy", "small", "tall"]
THING_ADJECTIVES = ["old", "new", "small", "big", "shiny", "pretty", "heavy", "soft"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "golden"]
PLACES = ["village", "forest", "house", "garden", "town", "castle", "farm", "valley", "city",
          "cottage"]
PLACE_ADJECTIVES = ["little", "big", "quiet", "old", "small", "busy", "sunny", "pretty"]
LANDMARKS = ["river", "lake", "hill", "sea", "bridge", "mountain", "road", "market", "well"]
# (singular, plural) objects that can be counted, found and given away.
OBJECTS = [("apple", "apples"), ("ball", "balls"), ("book", "books"), ("stone", "stones"),
           ("flower", "flowers"), ("coin", "coins"), ("cake", "cakes"), ("box", "boxes"),
           ("shell", "shells"), ("key", "keys"), ("hat", "hats"), ("cup", "cups"),
           ("leaf", "leaves"), ("egg", "eggs"), ("star", "stars"), ("toy", "toys")]
# Transitive verbs in the past tense.
VERBS = ["found", "saw", "liked", "painted", "carried", "cleaned", "opened", "picked up",
         "washed", "hid", "lost", "dropped", "fixed", "counted", "held", "wanted"]
ACTIVITIES = ["sang a song", "read a book", "went for a walk", "played in the sun",
              "baked some bread", "watched the clouds", "drew a picture", "ate a big lunch",
              "took a nap", "looked at the sky", "ran very fast", "danced with a friend"]
WEATHER = ["The sun was bright", "It was raining", "The wind was cold", "The sky was grey",
           "It was a warm day", "Snow was falling"]
TIMES = ["One morning", "One day", "Later that day", "That evening", "The next day",
         "After lunch", "In the afternoon", "At night"]
FEELINGS = ["happy", "sad", "surprised", "proud", "tired", "glad", "angry", "calm"]
QUOTES = ["Look at this!", "Can I help you?", "What a nice day!", "Let us go home.",
          "I am very hungry.", "Where are you going?", "Thank you, my friend.",
          "This is my favourite place."]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


# --------------------------------------------------------------------------------------------
# Corpus generation
# --------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    """Return the indefinite article that fits ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _cap(sentence: str) -> str:
    """Capitalise the first letter of a sentence (pronouns start some sentences)."""
    return sentence[0].upper() + sentence[1:]


def make_story(rng: random.Random) -> str:
    """Return one story: an opening sentence, 1-6 middle sentences and an ending (3-8 in all).

    The protagonist (name + pronouns) and a counted object are fixed for the whole story, so
    the model can learn agreement across sentences.
    """
    name, subj, obj, poss = rng.choice(CHARACTERS)
    friend = rng.choice([c for c in CHARACTERS if c[0] != name])[0]
    adj = rng.choice(ADJECTIVES)
    creature = rng.choice(CREATURES + GENDERED[subj])
    place = rng.choice(PLACES)
    landmark = rng.choice(LANDMARKS)
    thing, things = rng.choice(OBJECTS)
    count = rng.randint(3, 12)  # how many ``things`` the protagonist has

    opening = rng.choice([
        f"Once upon a time, there was {_article(adj)} {adj} {creature} named {name}.",
        f"{name} was {_article(adj)} {adj} {creature} who lived in a {place} near the {landmark}.",
        f"There once lived {_article(adj)} {adj} {creature} called {name}.",
    ])

    def counted_sentences() -> list[str]:
        """A short arithmetic episode about the counted object."""
        nonlocal count
        give = rng.randint(1, count - 1)
        out = [
            f"{rng.choice(TIMES)}, {name} found {NUMBER_WORDS[count]} {things}.",
            f"{_cap(subj)} counted them: {', '.join(str(i) for i in range(1, count + 1))}.",
            f"{_cap(subj)} gave {give} to {friend}, so {subj} had {count - give} left.",
        ]
        count -= give
        return out

    # Middle sentences are drawn from these templates (lambdas so each draw is fresh).
    templates = [
        lambda: f"{name} lived in a {rng.choice(PLACE_ADJECTIVES)} {place} near the {landmark}.",
        lambda: f"Every morning, {subj} {rng.choice(VERBS)} the {rng.choice(COLOURS)} {thing}.",
        lambda: f"{rng.choice(WEATHER)}, so {name} {rng.choice(ACTIVITIES)}.",
        lambda: f"{rng.choice(TIMES)}, {subj} {rng.choice(ACTIVITIES)} with {friend}.",
        lambda: f"{friend} said, \"{rng.choice(QUOTES)}\"",
        lambda: f"{_cap(poss)} {thing} was very {rng.choice(THING_ADJECTIVES)} and {rng.choice(COLOURS)}.",
        lambda: f"{friend} {rng.choice(VERBS)} {_article(thing)} {thing} and showed it to {obj}.",
        lambda: f"The {landmark} was {rng.choice(['far', 'near', 'big', 'quiet', 'beautiful'])}.",
        lambda: f"{name} had {rng.randint(2, 9)} friends and {rng.randint(1, 5)} {things}.",
    ]

    n_middle = rng.randint(1, 6)
    middle: list[str] = []
    while len(middle) < n_middle:
        # Now and then tell the arithmetic episode (3 sentences) if there is room for it.
        if count > 1 and n_middle - len(middle) >= 3 and rng.random() < 0.3:
            middle.extend(counted_sentences())
        else:
            middle.append(rng.choice(templates)())

    ending = rng.choice([
        f"In the end, {name} was very {rng.choice(FEELINGS)}.",
        f"And {subj} lived happily ever after.",
        f"That night, {name} went to sleep with a smile.",
        f"{_cap(subj)} never forgot that day.",
    ])
    return " ".join([opening, *middle, ending])


def generate_corpus(seed: int = SEED, target_chars: int = TARGET_CHARS) -> str:
    """Return the whole corpus: stories separated by a blank line, ending with a newline."""
    rng = random.Random(seed)
    stories: list[str] = []
    size = 0
    while size < target_chars:
        story = make_story(rng)
        stories.append(story)
        size += len(story) + 2  # + the "\n\n" separator
    return "\n\n".join(stories) + "\n"


def write_corpus(out_dir: Path, seed: int = SEED, target_chars: int = TARGET_CHARS, name: str = CORPUS_NAME) -> Path:
    """Generate a corpus and write it to ``out_dir/name``; return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    # newline="\n": identical bytes on every platform.
    path.write_text(generate_corpus(seed, target_chars), encoding="utf-8", newline="\n")
    return path


# --------------------------------------------------------------------------------------------
# Tokenizer training
# --------------------------------------------------------------------------------------------

def train_tokenizer(corpus_path: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus_path``; save it under ``out_dir``.

    The special token is added first so it gets id 0; the 256 byte symbols follow, and the rest
    of the vocabulary is BPE merges. Only the ``tokenizers`` library is used here; the two JSON
    files written are what ``transformers.AutoTokenizer`` needs to build a fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact; the post-processor adds no special tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus_path)], trainer)
    assert tokenizer.token_to_id(SPECIAL_TOKEN) == 0

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    # Written by hand (rather than with transformers' save_pretrained) so the file does not
    # depend on the installed transformers version and stays byte-identical between runs.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKEN,
        "eos_token": SPECIAL_TOKEN,
        "unk_token": SPECIAL_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    config_path = out_dir / "tokenizer_config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8", newline="\n")
    return out_dir


def make_fixtures(out_dir: Path = FIXTURES_DIR, seed: int = SEED) -> tuple[Path, Path]:
    """Write the corpus and the tokenizer under ``out_dir``; return both paths."""
    corpus = write_corpus(out_dir, seed)
    write_corpus(out_dir, seed + VAL_SEED_OFFSET, VAL_TARGET_CHARS, VAL_CORPUS_NAME)
    tokenizer_dir = train_tokenizer(corpus, out_dir / TOKENIZER_DIRNAME)
    return corpus, tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES_DIR,
                        help="output folder (default: data/fixtures next to this script)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    corpus, tokenizer_dir = make_fixtures(args.out, args.seed)
    text = corpus.read_text(encoding="utf-8")
    print(f"corpus: {corpus} ({len(text.encode()):,} bytes, "
          f"{len(text.split(chr(10) * 2)):,} documents)")
    print(f"tokenizer: {tokenizer_dir} (vocab {VOCAB_SIZE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
