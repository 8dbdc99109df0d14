"""Write tuneforge's bundled general instruction set: tuneforge/data/general/general_instructions.jsonl.

Written for the project (Apache-2.0, like tuneforge): short, factual, varied instructions with answers checked by
construction (arithmetic, conversions, word operations) or well-known facts (capitals, chemical symbols, opposites,
plurals and past tenses, definitions). Mixed into a narrow task's data it keeps the model answering ordinary requests
in ordinary prose — the guide's "mix in general instruction data" against forgetting. Deterministic: re-running it
writes the same file.

    python scripts/make_general_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tuneforge" / "data" / "general" / "general_instructions.jsonl"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin", "Austria": "Vienna",
    "Switzerland": "Bern", "Netherlands": "Amsterdam", "Belgium": "Brussels", "South Korea": "Seoul",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogotá", "Morocco": "Rabat", "Nigeria": "Abuja", "Hungary": "Budapest", "Czechia": "Prague",
    "New Zealand": "Wellington",
}
ELEMENTS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "phosphorus": "P", "sulfur": "S", "chlorine": "Cl",
    "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "gold": "Au",
    "mercury": "Hg", "lead": "Pb", "tin": "Sn", "neon": "Ne", "argon": "Ar", "uranium": "U", "nickel": "Ni",
}
OPPOSITES = {
    "hot": "cold", "tall": "short", "early": "late", "happy": "sad", "open": "closed", "light": "dark",
    "fast": "slow", "full": "empty", "strong": "weak", "rich": "poor", "inside": "outside", "above": "below",
    "begin": "end", "buy": "sell", "remember": "forget", "accept": "refuse", "ancient": "modern", "wide": "narrow",
    "heavy": "light", "quiet": "loud", "wet": "dry", "young": "old", "hard": "soft", "win": "lose",
}
PLURALS = {
    "child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "person": "people", "city": "cities",
    "box": "boxes", "knife": "knives", "leaf": "leaves", "woman": "women", "goose": "geese", "bus": "buses",
    "baby": "babies", "wolf": "wolves", "potato": "potatoes", "sheep": "sheep", "cactus": "cacti", "day": "days",
}
PAST = {
    "go": "went", "eat": "ate", "write": "wrote", "see": "saw", "run": "ran", "swim": "swam", "take": "took",
    "bring": "brought", "think": "thought", "teach": "taught", "fly": "flew", "begin": "began", "sing": "sang",
    "drink": "drank", "find": "found", "walk": "walked", "play": "played", "study": "studied", "stop": "stopped",
}
DEFINITIONS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to make sugar and release "
                      "oxygen",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action, state or occurrence",
    "gravity": "the force that pulls objects with mass towards each other, such as things falling to the ground",
    "evaporation": "the change of a liquid into a gas, as when water dries from a puddle",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "democracy": "a system of government in which citizens choose their leaders by voting",
    "a mammal": "a warm-blooded animal with hair or fur that feeds its young with milk",
    "an ecosystem": "a community of living things together with the environment they live in",
    "inflation": "a general rise in prices over time, so that money buys less",
    "a thermometer": "an instrument that measures temperature",
    "a synonym": "a word that means the same or nearly the same as another word",
    "the equator": "the imaginary line around the middle of the Earth, halfway between the North and South Poles",
    "a volcano": "an opening in the Earth's crust through which molten rock, ash and gases escape",
    "an algorithm": "a step-by-step procedure for solving a problem or completing a task",
    "a budget": "a plan for how money will be earned and spent over a period of time",
    "erosion": "the gradual wearing away of rock or soil by water, wind or ice",
    "a metaphor": "a figure of speech that describes something by saying it is something else",
}
ADVICE = [
    ("Give one tip for sleeping better.", "Go to bed and get up at the same time every day, even at weekends."),
    ("Suggest a healthy breakfast.", "Porridge made with oats and milk, topped with fruit and a few nuts."),
    ("How can I remember new vocabulary?", "Review the words a little every day, and use each one in a sentence of "
                                           "your own."),
    ("Give one way to save energy at home.", "Switch off lights and devices when you leave a room."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sun protection, a rain layer and a charged "
                                          "phone."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, wait three to five minutes, then "
                                   "remove the bag and add milk or sugar if you like."),
    ("Give a tip for writing a clear email.", "Put the main point or request in the first sentence and keep it "
                                              "short."),
    ("How can I focus better while studying?", "Work in short blocks of about 25 minutes with your phone out of "
                                               "reach, then take a short break."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("Name the four seasons.", "Spring, summer, autumn and winter."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea "
                                                                    "level."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
WORDS = ["garden", "planet", "window", "orange", "bridge", "candle", "forest", "letter", "silver", "market",
         "pencil", "rocket", "island", "summer", "travel", "yellow", "animal", "button", "circle", "doctor"]


# Each table of facts as one question and answer pattern.
FACT_QUESTIONS = [
    (CAPITALS, "What is the capital of {key}?", "The capital of {key} is {value}."),
    (ELEMENTS, "What is the chemical symbol for {key}?", "The chemical symbol for {key} is {value}."),
    (OPPOSITES, 'What is the opposite of "{key}"?', 'The opposite of "{key}" is "{value}".'),
    (PLURALS, 'What is the plural of "{key}"?', 'The plural of "{key}" is "{value}".'),
    (PAST, 'What is the past tense of "{key}"?', 'The past tense of "{key}" is "{value}".'),
]


def rows(rng: random.Random) -> list[dict]:
    out = [(question.format(key=key), answer.format(key=key, value=value))
           for facts, question, answer in FACT_QUESTIONS for key, value in facts.items()]
    for term, meaning in DEFINITIONS.items():
        out.append((f"Explain what {term} is in one sentence.", f"{term[0].upper() + term[1:]} is {meaning}."))
    out += ADVICE
    for _ in range(30):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        name = {"+": "plus", "-": "minus", "*": "times"}[op]
        out.append((f"What is {a} {name} {b}?", f"{a} {name} {b} is {value}."))
    for _ in range(12):
        km = rng.randint(1, 40)
        out.append((f"How many metres are in {km} kilometres?", f"{km} kilometres is {km * 1000} metres."))
    for _ in range(12):
        hours = rng.randint(2, 48)
        out.append((f"How many minutes are in {hours} hours?", f"{hours} hours is {hours * 60} minutes."))
    for word in WORDS:
        out.append((f"Spell the word \"{word}\" backwards.", f"\"{word}\" spelled backwards is \"{word[::-1]}\"."))
        out.append((f"How many letters are in the word \"{word}\"?",
                    f"The word \"{word}\" has {NUMBER_WORDS[len(word)] if len(word) < 13 else len(word)} letters."))
    for _ in range(12):
        picked = rng.sample(WORDS, 4)
        out.append((f"Put these words in alphabetical order: {', '.join(picked)}.",
                    f"In alphabetical order: {', '.join(sorted(picked))}."))
    rng.shuffle(out)
    return [{"instruction": q, "output": a} for q, a in out]


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = rows(random.Random(20261129))
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    print(f"wrote {len(data)} rows to {OUT}")


if __name__ == "__main__":
    main()
