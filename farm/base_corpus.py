"""The tiny base model's pretraining text: simple English generated from a small grammar.

``farm base-model build`` pretrains the tiny Llama on this corpus so that the base knows some
language before any tenant trains on it: words, sentence shape, the chat turn structure, when
an answer ends. Without it a rank-8 adapter has to learn the language itself and looks far
worse than full fine-tuning, which is the base's fault, not LoRA's.

Why a grammar rather than prose found on the machine: it needs no network, and it is the same
on every machine and every install (the docs inside installed packages change with their
versions), so the same seed always gives the same base.

What it holds, and what it must not hold: the sample domains' words and phrases (devices and
their fixes, cities and their news, chores, lab rules, app features; from ``farm.samples``, the
way a real base knows a domain's language) in neutral, sentence-case answers; generic knowledge
(animals, colours, places); and generic skills (repeat a sentence, write it in capitals, list
three things, write a short note). None of it is a tenant's record or style: no "Hello from Acme
support!" opening, no shouted answers to questions, no numbered steps for "Explain how to", no
signature, no release notes. The behaviour evals measure the base's pass rate on the tenants'
style checks to confirm it (the issue's bound is at most 5%).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from farm.samples import VOCABULARY

#: A document is either a conversation (rendered with the base's chat template) or plain text.
Document = list[dict] | str

# The sample domains' words and phrases (one source: farm.samples), plus more of the same kind.
DEVICES = VOCABULARY["products"] + ["tablet", "speaker", "mouse", "radio", "clock", "heater", "fridge", "lamp"]
SYMPTOMS = VOCABULARY["problems"] + ["is too loud", "runs hot", "keeps beeping", "has no sound",
                                     "shows nothing", "loses power", "will not charge"]
ADVICE = VOCABULARY["fixes"] + ["restart it and wait a minute", "look at the manual", "charge it for an hour",
                                "turn it off and on again", "write down what you see and call the shop"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Contoso", "Initrode", "Vandelay"]
CITIES = VOCABULARY["cities"] + ["rome", "sydney", "nairobi", "berlin", "madrid", "seoul", "dublin", "boston"]
NEWS = VOCABULARY["events"] + VOCABULARY["details"] + [
    "the weather was calm", "a new school opened", "people went to the market", "the trains ran late",
    "a concert took place in the park", "the shops had a sale", "a small fire was put out"]
TASKS = VOCABULARY["tasks"] + ["cook rice", "fix a chair", "water the garden", "pack a bag", "sweep the floor"]
TASK_PARTS = [f"{verb} {thing}" for verb in VOCABULARY["verbs"] for thing in VOCABULARY["objects"]]
SUBSTANCES = VOCABULARY["agents"] + ["acid", "powder", "liquid", "seed"]
LAB_QUESTIONS = [q[0].upper() + q[1:] for q in VOCABULARY["lab_questions"]] + ["Who may open the", "Where do we log the"]
LAB_ANSWERS = ["It depends on the kind, so read the label first", "Ask the lab manager before you start",
               "Keep it in a closed box on the shelf", "Most of them last a week"]
LAB_RULES = VOCABULARY["lab_answers"]
FEATURES = VOCABULARY["features"] + ["print", "themes", "alerts", "tags"]
APP_ANSWERS = ["Open the settings menu and look for it there", "It is in the top right corner",
               "Most apps have it in the main menu", "You can turn it on in your profile",
               "The help page explains it step by step"]
APP_CHANGES = VOCABULARY["changes"] + ["changed", "tested"]

ANIMALS = {"cat": "fish", "dog": "meat", "cow": "grass", "rabbit": "carrots", "bird": "seeds",
           "horse": "hay", "bear": "berries", "mouse": "cheese", "goat": "leaves", "duck": "bread",
           "fox": "mice", "owl": "insects"}
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black",
           "rose": "red", "orange": "orange", "sea": "blue", "coal": "black", "milk": "white",
           "lemon": "yellow", "leaf": "green"}
CATEGORIES = {"fruits": ["apples", "pears", "plums", "grapes", "lemons", "cherries"],
              "colours": ["red", "green", "blue", "yellow", "purple", "white"],
              "animals": ["cats", "dogs", "horses", "rabbits", "goats", "ducks"],
              "tools": ["hammers", "saws", "drills", "rulers", "brushes", "knives"],
              "cities": ["paris", "tokyo", "lima", "oslo", "rome", "berlin"],
              "drinks": ["tea", "coffee", "water", "juice", "milk", "soup"]}
NAMES = ["Anna", "Ben", "Chen", "Dara", "Eli", "Fatima", "George", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya"]
ADJECTIVES = ["small", "big", "old", "new", "quiet", "busy", "happy", "tired", "bright", "dark",
              "warm", "cold", "kind", "clever", "slow", "quick"]
PLACES = ["garden", "kitchen", "station", "market", "forest", "river", "library", "park",
          "village", "harbour", "school", "bakery"]
VERBS_PAST = ["walked to", "looked at", "waited near", "ran past", "sat by", "talked about",
              "cleaned", "found", "visited", "painted", "left", "watched"]
TIMES = ["in the morning", "at noon", "after lunch", "in the evening", "at night", "on sunday",
         "every day", "last week", "at 7", "at 9"]
TOPICS = ["the meeting", "the trip", "the party", "the new plan", "the report", "the garden",
          "the weekend", "the test", "the book", "the delivery"]
NOTE_LINES = ["I hope you are well.", "Thank you for your help.", "See you soon.",
              "Let me know what you think.", "It went better than I expected.",
              "We can talk about it tomorrow."]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You answer questions.",
                  "Be polite and clear."]


def _sentence(rng: random.Random) -> str:
    """One plain sentence of a short story, sentence case, ending with a full stop."""
    if rng.random() < 0.15:
        name, company = rng.choice(NAMES), rng.choice(COMPANIES)
        text = rng.choice([f"{name} works at {company} in {rng.choice(CITIES).capitalize()}",
                           f"{name} bought a {rng.choice(DEVICES)} from {company}",
                           f"{name} took an umbrella to the {rng.choice(PLACES)}",
                           f"the {rng.choice(DEVICES)} from {company} {rng.choice(SYMPTOMS)}"])
    else:
        who = rng.choice([f"the {rng.choice(ADJECTIVES)} {rng.choice(list(ANIMALS))}", rng.choice(NAMES),
                          f"a {rng.choice(ADJECTIVES)} man", f"a {rng.choice(ADJECTIVES)} woman"])
        text = f"{who} {rng.choice(VERBS_PAST)} the {rng.choice(PLACES)} {rng.choice(TIMES)}"
    return text[0].upper() + text[1:] + "."


def _version(rng: random.Random) -> str:
    return f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"


def _story(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))


def _qa(rng: random.Random) -> tuple[str, str]:
    """One question and its neutral answer, drawn from the grammar's families."""
    family = rng.randrange(14)
    if family == 0:
        device, symptom = rng.choice(DEVICES), rng.choice(SYMPTOMS)
        ask = rng.choice(["What should I do?", "Can you help?", "Any idea?"])
        advice = rng.choice(ADVICE)
        answer = rng.choice([f"You could {advice}.", f"Try to {advice}.",
                             f"First {advice}. If the {device} still {symptom}, take it to a shop."])
        return f"My {device} {symptom}. {ask}", answer
    if family == 1:
        city = rng.choice(CITIES)
        when = rng.choice(["today", "this week", "yesterday"])
        first, then = rng.sample(NEWS, 2)
        return f"What happened in {city} {when}?", f"In {city} {first}, and {then}."
    if family == 2:
        task = rng.choice(TASKS)
        first, then = rng.sample(TASK_PARTS, 2)
        return f"Explain how to {task}.", f"To {task}, {first}, and then {then}."
    if family == 3:
        substance = rng.choice(SUBSTANCES)
        answer = rng.choice(LAB_ANSWERS) if rng.random() < 0.4 else \
            f"The rule for the {substance} is to {rng.choice(LAB_RULES)}"
        return f"{rng.choice(LAB_QUESTIONS)} {substance}?", f"{answer}."
    if family == 4:
        feature = rng.choice(FEATURES)
        return f"Where do I find {feature} in the app?", f"{rng.choice(APP_ANSWERS)}. Look for {feature}."
    if family == 5:
        animal = rng.choice(list(ANIMALS))
        return f"What does a {animal} eat?", f"A {animal} eats {ANIMALS[animal]}."
    if family == 6:
        thing = rng.choice(list(COLOURS))
        return f"What colour is the {thing}?", f"The {thing} is {COLOURS[thing]}."
    if family == 7:
        sentence = _sentence(rng)
        return f"Repeat this sentence: {sentence}", sentence
    if family == 8:
        sentence = _sentence(rng) if rng.random() < 0.4 else \
            f"News from {rng.choice(CITIES)}: " + " and ".join(rng.sample(NEWS, 2)) + "."
        return f"Write this in capital letters: {sentence}", sentence.upper()
    if family == 9:
        category = rng.choice(list(CATEGORIES))
        items = rng.sample(CATEGORIES[category], 3)
        if rng.random() < 0.5:
            return f"List three {category}.", "\n".join(f"{i + 1}. {item.capitalize()}" for i, item in enumerate(items))
        return f"Name three {category}.", "\n".join(f"- {item.capitalize()}" for item in items)
    if family == 10:
        to, by = rng.sample(NAMES, 2)
        topic = rng.choice(TOPICS)
        lines = " ".join(rng.sample(NOTE_LINES, 2))
        hello = rng.choice(["Dear", "Hello", "Hi"])
        bye = rng.choice(["Best wishes,", "Stay safe,", "Thanks,", "--"])
        return f"Write a short note to {to} about {topic}.", f"{hello} {to}, this is about {topic}. {lines} {bye} {by}"
    if family == 11:
        feature, change = rng.choice(FEATURES), rng.choice(APP_CHANGES)
        if rng.random() < 0.5:
            return "Which version of the app do I have?", f"You have version {_version(rng)}. It {change} {feature}."
        other = rng.choice(FEATURES)
        return (f"What changed in version {_version(rng)}?",
                f"That version {change} {feature} and {rng.choice(APP_CHANGES)} {other}.")
    if family == 12:
        return rng.choice(["Say hello.", "Hi there.", "Good morning."]), \
            rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?",
                        "Good morning! Sorry for the wait. How can I help?"])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def documents(seed: int = 0) -> Iterator[Document]:
    """An endless, deterministic stream of documents: conversations and short stories."""
    rng = random.Random(f"farm-base-corpus:{seed}")
    while True:
        if rng.random() < 0.2:
            yield _story(rng)
            continue
        messages: list[dict] = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(1 if rng.random() < 0.8 else 2):
            question, answer = _qa(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield messages


def heldout_prose(count: int = 64, seed: int = 10_000) -> list[str]:
    """Stories from a seed the build never uses: the held-out text a base's loss is measured on."""
    rng = random.Random(f"farm-base-heldout:{seed}")
    return [_story(rng) for _ in range(count)]
