"""Instructions as people write them. Each task's instruction is drawn from a grammar of sentence
frames, verbs, names for objects and colours, and politeness, far richer than a few templates.

Disjoint sets of phrasings: "train" (what data collection and training draw from) and, for
evaluation only (`vla eval --phrasings heldout|synonyms`), "heldout" (other sentence frames and
verbs, the same names for objects: what is new is how the request is put) and "synonyms" (the
held-out frames and verbs, and names for colours, shapes and bins that neither other split uses:
"stash the crimson brick in the navy bucket"), so that how well a policy follows instructions it was
never trained on can be measured honestly.

`instruction(task, words, split, rng)` phrases one request; `words` holds the episode's slots:
colour and shape of the target, bin_colour (place), direction (push: left, right, forward, back).
"""
from __future__ import annotations

import functools
import itertools
import re

import numpy as np

SPLITS = ("train", "heldout", "synonyms")

# ---- naming objects (shared by both splits) ------------------------------------------------------
COLOUR_WORDS = {
    "red": ("red", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "tangerine"),
}
SHAPE_WORDS = {"cube": ("cube", "block", "square block"), "ball": ("ball", "sphere"),
               "cylinder": ("cylinder", "can", "round post")}
BIN_WORDS = ("bin", "box", "basket", "container", "tray")
# the synonyms split's names: words no training instruction holds
UNSEEN_COLOUR_WORDS = {
    "red": ("crimson", "ruby"),
    "green": ("lime", "jade"),
    "blue": ("navy", "cobalt"),
    "yellow": ("lemon", "mustard"),
    "purple": ("lilac", "lavender"),
    "orange": ("amber", "apricot"),
}
UNSEEN_SHAPE_WORDS = {"cube": ("brick", "cuboid"), "ball": ("orb", "globe"), "cylinder": ("tube", "pillar")}
UNSEEN_BIN_WORDS = ("bucket", "crate", "bowl")
NAMES = {"train": (COLOUR_WORDS, SHAPE_WORDS, BIN_WORDS), "heldout": (COLOUR_WORDS, SHAPE_WORDS, BIN_WORDS),
         "synonyms": (UNSEEN_COLOUR_WORDS, UNSEEN_SHAPE_WORDS, UNSEEN_BIN_WORDS)}
DIRECTION_WORDS = {
    "left": ("to the left", "left", "leftwards", "over to the left side"),
    "right": ("to the right", "right", "rightwards", "over to the right side"),
    "forward": ("forward", "away from the robot", "to the far side", "away from you"),
    "back": ("back", "towards the robot", "to the near side", "towards you"),
}

# ---- requests: {verb}s and sentence {frame}s per split -------------------------------------------
# A frame holds {act}: the verb phrase with its object, e.g. "pick up the red block".
VERBS = {
    "train": {
        "reach": ("touch the {obj}", "reach the {obj}", "move to the {obj}", "put the gripper on the {obj}",
                  "go to the {obj}", "tap the {obj}", "reach out and touch the {obj}", "move your hand to the {obj}"),
        "pick": ("pick up the {obj}", "lift the {obj}", "grasp the {obj} and lift it", "raise the {obj}",
                 "grab the {obj} and lift it up", "take the {obj} off the table", "pick the {obj} up"),
        "push": ("push the {obj} {direction}", "slide the {obj} {direction}", "nudge the {obj} {direction}",
                 "shove the {obj} {direction}", "push the {obj} a bit {direction}"),
        "place": ("put the {obj} in the {bin}", "place the {obj} into the {bin}", "drop the {obj} in the {bin}",
                  "move the {obj} into the {bin}", "put the {obj} inside the {bin}",
                  "pick up the {obj} and put it in the {bin}"),
    },
    "heldout": {
        "reach": ("bring your gripper over to the {obj}", "make contact with the {obj}",
                  "head for the {obj} and touch it", "point your fingers at the {obj} and touch it"),
        "pick": ("hoist the {obj} into the air", "get the {obj} up off the table",
                 "grab hold of the {obj} and raise it"),
        "push": ("give the {obj} a push {direction}", "move the {obj} {direction} by pushing it",
                 "shift the {obj} {direction}"),
        "place": ("toss the {obj} into the {bin}", "stash the {obj} in the {bin}",
                  "get the {obj} into the {bin}"),
    },
}
FRAMES = {
    "train": ("{act}", "please {act}", "{act} please", "could you {act}", "i want you to {act}", "now {act}",
              "can you {act} please", "your job is to {act}", "go ahead and {act}"),
    "heldout": ("would you {act}?", "i'd like you to {act} for me", "{act} for me, thanks",
                "next, {act}", "here is the task, {act}"),
}
VERBS["synonyms"], FRAMES["synonyms"] = VERBS["heldout"], FRAMES["heldout"]


# the slots of `words` each task's phrasings name
TASK_SLOTS = {"reach": ("colour", "shape"), "pick": ("colour", "shape"),
              "push": ("colour", "shape", "direction"), "place": ("colour", "shape", "bin_colour")}
# the tasks a request names without its verb: push by a direction, place by a bin
NAMED_WITHOUT_VERB = tuple(task for task, slots in TASK_SLOTS.items() if len(slots) > 2)


def instruction(task: str, words: dict[str, str], split: str, rng: np.random.Generator,
                verb_word: str | None = None) -> str:
    """A request to do `task` with this episode's `words`, phrased from `split`; `verb_word`
    replaces the verb's first word ("shift the red cube left" from "push the red cube left")."""
    if split not in SPLITS:
        raise ValueError(f"unknown phrasing split {split!r}; choose from {SPLITS}")
    verb = _pick(VERBS[split][task], rng)
    if verb_word is not None:
        verb = f"{verb_word} {verb.split(' ', 1)[1]}"
    frame = _pick(FRAMES[split], rng)
    colours, shapes, bins = NAMES[split]
    obj = f"{_pick(colours[words['colour']], rng)} {_pick(shapes[words.get('shape', 'cube')], rng)}"
    slots = {"obj": obj}
    if "direction" in TASK_SLOTS[task]:
        slots["direction"] = _pick(DIRECTION_WORDS[words["direction"]], rng)
    if "bin_colour" in TASK_SLOTS[task]:
        slots["bin"] = f"{_pick(colours[words['bin_colour']], rng)} {_pick(bins, rng)}"
    return frame.format(act=verb.format(**slots))


def parse(text: str, split: str = "train") -> tuple[str, dict[str, str]] | None:
    """(task, words) of a sentence `instruction(task, words, split, rng)` could have written (lower
    case, as it writes them), or None for any other text."""
    found = _match(text, split)
    if found is None:
        return None
    task, _, match = found
    colours, shapes, _ = _names(split)
    slots = {"colour": colours, "shape": shapes, "bin_colour": colours, "direction": _DIRECTIONS}
    return task, {slot: slots[slot][name] for slot, name in match.groupdict().items() if slot in slots}


def verb_of(text: str, split: str) -> str | None:
    """The verb phrase of `split` that a sentence `instruction` wrote was built on ("shift the {obj}
    {direction}"), or None for any other text: success per verb shows which ways of asking fail."""
    found = _match(text, split)
    return None if found is None else found[1]


def _match(text: str, split: str) -> tuple[str, str, re.Match] | None:
    """(task, verb, match) of the first frame and verb of `split` that wrote `text`, or None."""
    for task, verb, pattern in _patterns(split):
        match = pattern.fullmatch(text)
        if match:
            return task, verb, match
    return None


@functools.cache
def _names(split: str) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
    """The split's colour and shape names -> their canonical colour or shape, and its bin names."""
    colours, shapes, bins = NAMES[split]
    return ({w: c for c, words in colours.items() for w in words},
            {w: s for s, words in shapes.items() for w in words}, bins)


_DIRECTIONS = {w: d for d, words in DIRECTION_WORDS.items() for w in words}


@functools.cache
def _patterns(split: str) -> list[tuple[str, str, re.Pattern]]:
    """(task, verb, regex) for every frame and verb of `split`."""
    colours, shapes, bins = _names(split)

    def either(name: str | None, words) -> str:  # longest first: "square block" before "block"
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        return f"(?P<{name}>{alternatives})" if name else f"(?:{alternatives})"

    slots = {"obj": f"{either('colour', colours)} {either('shape', shapes)}",
             "bin": f"{either('bin_colour', colours)} {either(None, bins)}",
             "direction": either("direction", _DIRECTIONS)}
    patterns = []
    for task, verbs in VERBS[split].items():
        for frame, verb in itertools.product(FRAMES[split], verbs):
            parts = re.split(r"(\{\w+\})", frame.format(act=verb))
            regex = "".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
            patterns.append((task, verb, re.compile(regex)))
    return patterns


def _pick(options, rng: np.random.Generator):
    return options[rng.integers(len(options))]


def corpus(split: str = "train", per_task: int = 2000, seed: int = 0, tasks=None) -> list[str]:
    """Instructions drawn from `split` for every task (or those of `tasks`) and target (a tokenizer's
    training corpus)."""
    return [text for text, _, _ in requests(split, per_task, np.random.default_rng(seed), tasks)]


def requests(split: str, per_task: int, rng: np.random.Generator, tasks=None):
    """Yields (instruction, task, words) for random requests, `per_task` of every task (or those of
    `tasks`); `words` holds the task's slots only."""
    for task in tasks or VERBS[split]:
        for _ in range(per_task):
            colour, other = rng.choice(list(COLOUR_WORDS), size=2, replace=False)
            words = {"colour": str(colour), "bin_colour": str(other), "shape": _pick(list(SHAPE_WORDS), rng),
                     "direction": _pick(list(DIRECTION_WORDS), rng)}
            text = instruction(task, words, split, rng)
            yield text, task, {k: v for k, v in words.items() if k in TASK_SLOTS[task]}


def vocabulary(split: str = "train") -> set[str]:
    """Every word `split` can use."""
    colours, shapes, bins = NAMES[split]
    texts = itertools.chain(*colours.values(), *shapes.values(), bins, *DIRECTION_WORDS.values(),
                            *VERBS[split].values(), FRAMES[split])
    return {word for text in texts for word in _words(text)}


def _words(text: str) -> list[str]:
    return [w.strip(",.:") for w in text.replace("{", " {").split() if not w.startswith("{")]
