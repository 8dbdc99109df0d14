"""Generate the demo task: pull the person and the city out of a sentence, answering in one fixed house format
(`NAME=...; CITY=...`) that the instruction does not spell out.

The untuned model answers in free prose or its own layout, so exact match starts near 0; a short LoRA run teaches
the format. Held-out rows use first names, surnames and cities never seen in training.
Run: python scripts/make_demo_data.py  (deterministic; writes examples/demo/{train,test}.jsonl)
"""

import json
import random
from pathlib import Path

FIRST = """Maria James Aisha Chen Lukas Sofia Omar Elena Mateo Priya Noah Hana Diego Fatima Ivan Chloe Kofi Yuki Leon
Amara Pedro Ingrid Ravi Zara Tomas Mei Samuel Nadia Felix Lucia Arjun Greta Malik Rosa Emil Leila Hugo Anya Kenji
Clara Victor Naomi Pablo Sara Aleksander Ines Daniel Olga Marco Freya Rafael Yara Jonas Alma Theo Dina Bruno Vera""".split()
LAST = """Lopez Smith Khan Wang Becker Rossi Haddad Petrova Garcia Sharma Brown Sato Fernandez Ali Novak Martin Mensah
Tanaka Fischer Okafor Silva Larsen Patel Ahmed Horvat Li Cohen Kowalski Weber Moreau Gupta Nilsen Diallo Costa Berg
Rahimi Dubois Ivanova Mori Schmidt Romero Adeyemi Ruiz Lindqvist Santos Keller Jensen Bianchi Moreno Eriksen""".split()
CITIES = """Lisbon Toronto Nairobi Osaka Berlin Madrid Cairo Oslo Lima Mumbai Dublin Seoul Vienna Accra Prague Quito
Helsinki Manila Dakar Porto Zurich Hanoi Denver Krakow Tunis Bergen Austin Lyon Gdansk Perth Cusco Tbilisi Malmo
Bogota Sevilla Turin Leeds Kyoto Lagos Ghent Riga Nantes Bilbao Odense Graz Split Utrecht Tampere Adelaide Sapporo
Valencia Geneva Rotterdam Kampala Montreal Santiago Halifax Auckland Marseille Bordeaux""".split()
TEMPLATES = [
    "{name} moved to {city} last spring.",
    "Yesterday {name} flew to {city} for a conference.",
    "After ten years abroad, {name} finally settled in {city}.",
    "The new bakery in {city} is run by {name}.",
    "{name} was born and raised in {city}.",
    "Our guide in {city} was a cheerful woman called {name}.",
    "Last week {name} gave a talk at the library in {city}.",
    "{name} commutes to {city} by train every Monday.",
    "In {city}, {name} opened a small bicycle repair shop.",
    "The marathon in {city} was won by {name} this year.",
    "{name} spent the whole summer painting murals in {city}.",
    "According to the letter, {name} now lives in {city}.",
]
INSTRUCTION = "Extract the person's full name and the city from the sentence."


def rows(firsts, lasts, cities, count, rng):
    out = []
    for _ in range(count):
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        city = rng.choice(cities)
        sentence = rng.choice(TEMPLATES).format(name=name, city=city)
        answer = f"NAME={name}; CITY={city}"
        out.append({"instruction": INSTRUCTION, "input": sentence, "output": answer})
    return out


def main() -> None:
    rng = random.Random(7)
    # Held-out names and cities never appear in training: the model must learn to copy, not to remember.
    train_rows = rows(FIRST[:46], LAST[:40], CITIES[:48], 320, rng)
    test_rows = rows(FIRST[46:], LAST[40:], CITIES[48:], 40, rng)
    out = Path(__file__).resolve().parent.parent / "examples" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        with (out / name).open("w", encoding="utf-8") as fh:
            for row in data:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
