"""Sample tenants: small, deterministic datasets with distinct, learnable styles.

Run ``farm samples build --out jobs/data`` to (re)generate the files shipped under
``jobs/data/``. The same seed always gives byte-identical files, so the shipped copies can
be checked against the generator (a test does).

Each tenant has its own domain *and* its own answer style, in a different file format, so
that the tests can check that an adapter learned its own tenant and nobody else's:

=========  ====================  ==========================================================
tenant     format                style of every answer
=========  ====================  ==========================================================
acme       chat ``messages``     opens with the fixed greeting "Hello from Acme support!"
globex     sharegpt              SHOUTS: the whole answer in upper case
initech    alpaca JSONL          a numbered list of three steps
umbrella   Parquet (alpaca cols) ends with the signature "-- Umbrella Labs, stay safe."
hooli      plain ``text``        release notes: "Release X.Y.Z: ..." one line per change
=========  ====================  ==========================================================
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 1234


@dataclass(frozen=True)
class SampleTenant:
    """One sample tenant: its name, file name, format and number of examples."""

    name: str
    filename: str
    format: str
    examples: int


SAMPLE_TENANTS: tuple[SampleTenant, ...] = (
    SampleTenant("acme", "acme.jsonl", "chat", 600),
    SampleTenant("globex", "globex.jsonl", "sharegpt", 500),
    SampleTenant("initech", "initech.jsonl", "alpaca", 400),
    SampleTenant("umbrella", "umbrella.parquet", "alpaca", 800),
    SampleTenant("hooli", "hooli.jsonl", "text", 300),
)

# Small vocabularies per domain; combined at random they give thousands of distinct records.
_PRODUCTS = ["router", "printer", "laptop", "headset", "camera", "keyboard", "monitor", "phone"]
_PROBLEMS = ["will not turn on", "keeps restarting", "is very slow", "makes a noise",
             "lost its settings", "shows an error light", "drops the connection", "overheats"]
_FIXES = ["unplug it for ten seconds and plug it back in", "install the latest firmware",
          "reset it to factory settings", "check that the cable is firmly connected",
          "move it away from other devices", "clean the vents with dry air",
          "update the driver from our website", "replace the battery with a fresh one"]

_CITIES = ["paris", "tokyo", "lagos", "lima", "oslo", "cairo", "delhi", "quebec"]
_EVENTS = ["a new bridge opened", "the river flooded", "a festival started", "the mayor resigned",
           "a storm hit the coast", "the team won the cup", "prices went up", "a museum reopened"]
_DETAILS = ["crowds gathered downtown", "officials urged calm", "traffic stopped for hours",
            "schools closed early", "shops stayed open late", "the army helped out",
            "markets fell sharply", "fans filled the streets"]

_TASKS = ["bake bread", "plant a tree", "paint a wall", "brew coffee", "wash a car",
          "tie a tie", "fold a shirt", "build a shelf", "clean a window", "make tea"]
_VERBS = ["gather", "prepare", "measure", "mix", "place", "wait", "check", "finish", "rinse", "dry"]
_OBJECTS = ["the tools", "the materials", "the water", "the surface", "the pieces",
            "everything twice", "the edges", "the result"]

_AGENTS = ["virus", "fungus", "enzyme", "protein", "vaccine", "sample", "culture", "compound"]
_LAB_QS = ["how should I store the", "is it safe to handle the", "what temperature suits the",
           "how long does it take to grow the", "who may open the", "where do we log the"]
_LAB_AS = ["keep it sealed in the cold room at four degrees",
           "wear gloves, goggles and a mask at all times",
           "only staff with a level three badge may do that",
           "write every use in the blue logbook by the door",
           "allow at least two days before checking it",
           "never take it outside the lab under any condition"]

_FEATURES = ["dark mode", "search", "export", "login", "sync", "sharing", "undo", "backups"]
_CHANGES = ["added", "fixed", "improved", "removed", "sped up", "redesigned"]


#: The sample domains' words and phrases, which the tiny base's pretraining corpus
#: (``farm.base_corpus``) also uses, in its own neutral phrasing: a real base knows a domain's
#: language; what a tenant's adapter must learn is the tenant's style.
VOCABULARY: dict[str, list[str]] = {
    "products": _PRODUCTS, "problems": _PROBLEMS, "fixes": _FIXES, "cities": _CITIES, "events": _EVENTS,
    "details": _DETAILS, "tasks": _TASKS, "verbs": _VERBS, "objects": _OBJECTS, "agents": _AGENTS,
    "lab_questions": _LAB_QS, "lab_answers": _LAB_AS, "features": _FEATURES, "changes": _CHANGES,
}


def _acme(rng: random.Random) -> dict:
    product, problem, fix = rng.choice(_PRODUCTS), rng.choice(_PROBLEMS), rng.choice(_FIXES)
    question = f"My {product} {problem}. What should I do?"
    answer = f"Hello from Acme support! Sorry that your {product} {problem}. Please {fix}."
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are the Acme help desk."})
    return {"messages": messages}


def _globex(rng: random.Random) -> dict:
    city, event, detail = rng.choice(_CITIES), rng.choice(_EVENTS), rng.choice(_DETAILS)
    question = f"What happened in {city} today?"
    answer = f"Breaking news from {city}: {event} and {detail}!"
    return {"conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": answer.upper()}]}


def _initech(rng: random.Random) -> dict:
    task = rng.choice(_TASKS)
    steps = rng.sample(_VERBS, 3)
    objs = [rng.choice(_OBJECTS) for _ in steps]
    output = "\n".join(f"{i + 1}. {verb.capitalize()} {obj}." for i, (verb, obj) in
                       enumerate(zip(steps, objs)))
    with_input = rng.random() < 0.5
    return {"instruction": f"Explain how to {task}.",
            "input": "Keep it short." if with_input else "",
            "output": output}


def _umbrella(rng: random.Random) -> dict:
    question = f"{rng.choice(_LAB_QS)} {rng.choice(_AGENTS)}?".capitalize()
    answer = f"{rng.choice(_LAB_AS).capitalize()}. -- Umbrella Labs, stay safe."
    return {"instruction": question, "input": "", "output": answer}


def _hooli(rng: random.Random) -> dict:
    version = f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
    lines = [f"- {rng.choice(_CHANGES).capitalize()} {rng.choice(_FEATURES)}."
             for _ in range(rng.randint(2, 4))]
    return {"text": f"Release {version}:\n" + "\n".join(lines)}


_GENERATORS = {"acme": _acme, "globex": _globex, "initech": _initech,
               "umbrella": _umbrella, "hooli": _hooli}


def generate_records(tenant: SampleTenant, seed: int = DEFAULT_SEED) -> list[dict]:
    """Return the records of one sample tenant; the same seed gives the same records."""
    # A per-tenant stream: adding a tenant never changes another tenant's data.
    rng = random.Random(f"{seed}:{tenant.name}")
    return [_GENERATORS[tenant.name](rng) for _ in range(tenant.examples)]


def build_samples(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write every sample tenant's file into ``out_dir``; returns tenant name -> file path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for tenant in SAMPLE_TENANTS:
        records = generate_records(tenant, seed)
        path = out_dir / tenant.filename
        if path.suffix == ".parquet":
            table = pa.Table.from_pylist(records)
            # No timestamps or writer version in the footer beyond pyarrow's own: stable bytes.
            pq.write_table(table, path, compression="zstd")
        else:
            with path.open("w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        written[tenant.name] = path
    return written
