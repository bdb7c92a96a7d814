"""Generate autosp/data/corpus.txt: deterministic template-grammar English prose (no downloads).

Usage: ``python scripts/make_corpus.py [OUT]`` (stdout when OUT is omitted). With the fixed seed
the output is byte-for-byte the committed ``autosp/data/corpus.txt``.
"""

from __future__ import annotations

import random
import sys
import textwrap
from pathlib import Path

SEED = 1859
rng = random.Random(SEED)

PEOPLE = [
    "the miller",
    "the old shepherd",
    "a young weaver",
    "the ferryman",
    "the baker's daughter",
    "a travelling tinker",
    "the schoolmaster",
    "the widow of the mill",
    "a lame soldier",
    "the blacksmith",
    "the parson",
    "a poor fisherman",
    "the innkeeper",
    "the lighthouse keeper",
    "a wandering fiddler",
    "the clockmaker",
    "the shepherd's boy",
    "a grey-haired sailor",
]
ANIMALS = [
    "the fox",
    "the crow",
    "an old hound",
    "the hare",
    "a wise owl",
    "the tortoise",
    "a lean wolf",
    "the little wren",
    "the grey goose",
    "a patient heron",
    "the field mouse",
    "the stag",
]
PLACES = [
    "the village",
    "the valley",
    "the harbour",
    "the orchard",
    "the mill pond",
    "the moor",
    "the market square",
    "the churchyard",
    "the high road",
    "the forest",
    "the river bank",
    "the lighthouse",
    "the king's highway",
    "the meadow",
    "the old bridge",
    "the hill farm",
]
TIMES = [
    "At dawn",
    "Long ago",
    "In the winter of that year",
    "When the harvest was in",
    "On a grey morning",
    "Late in the evening",
    "Before the first frost",
    "In the spring",
    "One summer",
    "When the bells rang for vespers",
    "After the great storm",
    "At midnight",
]
ADJ = [
    "quiet",
    "cold",
    "golden",
    "narrow",
    "ancient",
    "restless",
    "silver",
    "lonely",
    "bright",
    "patient",
    "crooked",
    "gentle",
    "stubborn",
    "weary",
    "merry",
    "humble",
    "proud",
    "green",
]
THINGS = [
    "a lantern",
    "a loaf of bread",
    "a silver coin",
    "a letter",
    "an iron key",
    "a wooden box",
    "a basket of apples",
    "a map",
    "a broken wheel",
    "a sack of grain",
    "a fiddle",
    "a ring",
    "a rope",
    "a pair of boots",
    "a little bell",
    "a book of songs",
    "a clay jug",
    "a feather",
]
VERBS_T = {
    "carried": "carried",
    "found": "found",
    "mended": "mended",
    "sold": "sold",
    "hid": "hidden",
    "buried": "buried",
    "lost": "lost",
    "gave away": "given away",
    "kept": "kept",
    "polished": "polished",
    "opened": "opened",
    "dropped": "dropped",
    "forgot": "forgotten",
    "guarded": "guarded",
    "stole": "stolen",
    "broke": "broken",
}
VERBS_I = [
    "wandered",
    "waited",
    "sang",
    "laughed",
    "wept",
    "listened",
    "slept",
    "prayed",
    "worked",
    "watched",
    "hurried",
    "rested",
    "whistled",
    "wondered",
]
FEELINGS = [
    "glad",
    "afraid",
    "ashamed",
    "content",
    "angry",
    "sorrowful",
    "hopeful",
    "proud",
    "curious",
    "uneasy",
    "grateful",
    "tired",
]
WEATHER = [
    "the wind rose over {place}",
    "rain fell upon {place}",
    "snow lay thick on {place}",
    "the sun was warm on {place}",
    "a fog crept over {place}",
    "the stars shone above {place}",
    "thunder rolled beyond {place}",
]
MORALS = [
    "Patience is a better friend than haste.",
    "A kind word costs nothing and buys much.",
    "He who boasts of tomorrow forgets today.",
    "Many hands make light work.",
    "What is given freely returns twice over.",
    "Pride walks in front and falls first.",
    "The slow and steady are rarely left behind.",
    "A secret shared is a secret spent.",
    "Honest bread is sweeter than stolen cake.",
    "Look before you leap over the brook.",
]
SAYINGS = [
    "Truly, I did not think to see you here",
    "Come, sit by the fire and rest",
    "There is no road so long that it has no turning",
    "I have little, but you may share it",
    "Do not trust the river when it is quiet",
    "Keep it safe until I return",
    "We shall see what the morning brings",
    "A promise is a debt, and I will pay it",
]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def who() -> str:
    return rng.choice(PEOPLE + ANIMALS)


def past() -> str:
    return rng.choice(list(VERBS_T))


def participle() -> str:
    return VERBS_T[past()]


def the(s: str) -> str:
    """Second mention: 'a young weaver' -> 'the young weaver'."""
    return "the " + s.split(" ", 1)[1] if s.startswith(("a ", "an ")) else s


def sentence() -> str:
    a, b = rng.sample(PEOPLE + ANIMALS, 2)
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    forms = [
        lambda: f"{rng.choice(TIMES)}, {a} {rng.choice(VERBS_I)} by {place}.",
        lambda: f"{cap(a)} {past()} {thing} and took it to {place}.",
        lambda: f"{cap(a)} was {rng.choice(FEELINGS)}, for {b} had {participle()} {thing}.",
        lambda: f"The {rng.choice(ADJ)} road led from {place} to {rng.choice(PLACES)}.",
        lambda: f'"{rng.choice(SAYINGS)}," said {a} to {b}.',
        lambda: f"{cap(rng.choice(WEATHER).format(place=place))}, and {a} {rng.choice(VERBS_I)}.",
        lambda: f"Nobody in {place} knew why {a} had {participle()} {thing}.",
        lambda: f"{cap(a)} asked {b} for {thing}, but {the(b)} only {rng.choice(VERBS_I)}.",
        lambda: (
            f"It was a {rng.choice(ADJ)} {rng.choice(['night', 'day', 'season', 'hour'])}, "
            f"and {place} was {rng.choice(ADJ)} and still."
        ),
        lambda: f"So {a} {rng.choice(VERBS_I)} until {b} came home with {thing}.",
    ]
    return rng.choice(forms)()


def story(n: int) -> str:
    title = (
        f"{n}. {cap(rng.choice(ANIMALS + PEOPLE).split(' ', 1)[1]).title()} and "
        f"{cap(rng.choice(THINGS).split(' ', 1)[1]).title()}"
    )
    paras = []
    for _ in range(rng.randint(2, 4)):
        text = " ".join(sentence() for _ in range(rng.randint(3, 7)))
        paras.append(textwrap.fill(text, 76))
    paras.append(f"Moral: {rng.choice(MORALS)}")
    return title + "\n\n" + "\n\n".join(paras) + "\n"


def corpus(target_bytes: int = 80_000) -> str:
    """The whole corpus; reseeds first, so every call returns the same text."""
    rng.seed(SEED)
    out, n = ["TALES OF THE VALLEY\nA deterministic, generated corpus of short fables.\n"], 1
    while sum(len(s) for s in out) < target_bytes:
        out.append(story(n))
        n += 1
    return "\n\n".join(out)


def main(argv: list[str]) -> None:
    text = corpus()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8", newline="\n")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
