"""Exact and near-duplicate detection: recall and precision on planted paraphrase-level near-duplicates."""

from __future__ import annotations

import itertools
import random

from tests.conftest import write_jsonl
from tuneforge.data.dedup import DuplicateFinder, exact_key, jaccard, word_set
from tuneforge.data.quality import check_files

# A vocabulary with a Zipf-like use: common words are shared by many rows, as in real text.
VOCAB = [f"{stem}{suffix}" for stem in ("pla", "mor", "ven", "ska", "tri", "lou", "den", "fa", "gri", "ho", "ju",
                                        "ke", "ly", "mu", "no", "pe", "qua", "ru", "si", "tu")
         for suffix in ("n", "st", "ra", "do", "ke", "mi", "lo", "ta", "ve", "rix", "sel", "bo", "cu", "dri", "fen")]
COMMON = ["the", "a", "of", "to", "and", "in", "is", "it", "for", "on", "with", "as", "by", "at", "this"]


def sentence(rng: random.Random, words: int) -> list[str]:
    return [rng.choice(COMMON) if rng.random() < 0.35 else rng.choice(VOCAB) for _ in range(words)]


def paraphrase(rng: random.Random, words: list[str]) -> list[str]:
    """A few words changed (about 1 in 25), two clauses swapped, punctuation and case changed."""
    words = list(words)
    for _ in range(max(1, len(words) // 25)):
        words[rng.randrange(len(words))] = rng.choice(VOCAB)
    cut = rng.randrange(1, len(words) - 1)
    words = words[cut:] + words[:cut]  # reordered clauses
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return [w + rng.choice(["", "", ",", ";", "!"]) for w in words]


def rewrite(rng: random.Random, words: list[str], share: float) -> list[str]:
    """A related but different row: `share` of the words replaced (a hard negative at 20%: word Jaccard 0.6-0.8)."""
    words = list(words)
    for k in rng.sample(range(len(words)), round(len(words) * share)):
        words[k] = rng.choice(VOCAB)
    return words


def planted_rows(seed: int = 0, originals: int = 1200, planted: int = 200, near_misses: int = 150,
                 siblings: int = 100):
    """Rows (instruction + output), shuffled, and the true near-duplicate groups. The first `planted` originals get
    one or two paraphrased copies (true near-duplicates); the next `near_misses` get a rewrite with a fifth of the
    words replaced, and the next `siblings` a row with the same instruction but another answer (as templated data
    has): related rows that are NOT duplicates, there so that precision is measured on hard cases. Returns the rows,
    the true groups (row indices) and the hard negative pairs."""
    rng = random.Random(seed)
    groups: list[list[tuple[list[str], list[str]]]] = []
    related: list[tuple[int, int]] = []  # (group of an original, group of its near miss or sibling)
    for k in range(originals):
        instruction, output = sentence(rng, rng.randint(12, 25)), sentence(rng, rng.randint(20, 50))
        groups.append([(instruction, output)])
        if k < planted:
            groups[-1] += [(paraphrase(rng, instruction), paraphrase(rng, output)) for _ in range(rng.choice((1, 2)))]
        elif k < planted + near_misses:
            groups.append([(rewrite(rng, instruction, 0.2), rewrite(rng, output, 0.2))])
            related.append((len(groups) - 2, len(groups) - 1))
        elif k < planted + near_misses + siblings:
            groups.append([(instruction, sentence(rng, rng.randint(20, 50)))])
            related.append((len(groups) - 2, len(groups) - 1))
    order = [(g, m) for g, members in enumerate(groups) for m in range(len(members))]
    rng.shuffle(order)
    rows, truth = [], {}
    for index, (g, m) in enumerate(order):
        instruction, output = groups[g][m]
        rows.append({"instruction": " ".join(instruction) + "?", "output": " ".join(output) + "."})
        truth.setdefault(g, []).append(index)
    hard_negatives = [tuple(sorted((truth[a][0], truth[b][0]))) for a, b in related]
    return rows, [sorted(v) for v in truth.values() if len(v) > 1], hard_negatives


def same_group_pairs(groups) -> set[tuple[int, int]]:
    return {pair for g in groups for pair in itertools.combinations(sorted(g), 2)}


def test_planted_near_duplicates_recall_and_precision(tmp_path):
    rows, truth, hard_negatives = planted_rows()
    path = write_jsonl(tmp_path / "planted.jsonl", rows)
    report = check_files([str(path)])
    found = [[report.rows.where(i) for i in g] for g in report.duplicates.near]
    found_pairs = same_group_pairs([[int(w.rsplit(":", 1)[1]) - 1 for w in g] for g in found])
    true_pairs = same_group_pairs(truth)
    recall = len(found_pairs & true_pairs) / len(true_pairs)
    precision = len(found_pairs & true_pairs) / max(1, len(found_pairs))
    assert len(true_pairs) >= 250
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert not report.duplicates.exact
    assert not found_pairs & set(hard_negatives)


def test_the_planted_set_is_hard_where_it_should_be():
    """What the recall/precision test relies on: paraphrases stay near their original (most at >= 0.85 word
    Jaccard), while near misses and siblings are related to theirs (far above unrelated rows) yet below 0.85."""
    rows, truth, hard_negatives = planted_rows()
    text = [word_set(r["instruction"] + " " + r["output"]) for r in rows]
    similar = [jaccard(text[i], text[j]) for g in truth for i, j in itertools.combinations(g, 2)]
    assert sum(s >= 0.85 for s in similar) / len(similar) >= 0.9 and min(similar) >= 0.75
    related = [jaccard(text[i], text[j]) for i, j in hard_negatives]
    near_misses, siblings = related[:150], related[150:]
    # Near misses at 0.55-0.85: LSH makes candidates of many of them (a pair at 0.7 with probability 0.6), so it is
    # the exact-Jaccard verification that must keep them apart.
    assert len(siblings) == 100 and min(near_misses) >= 0.55 and max(related) < 0.85
    assert sum(siblings) / len(siblings) > 0.3  # unrelated rows of this vocabulary: about 0.15


def test_threshold_is_respected(tmp_path):
    rows, _, _ = planted_rows(seed=1, originals=300, planted=60)
    path = write_jsonl(tmp_path / "planted.jsonl", rows)
    strict = check_files([str(path)], near_threshold=0.99)
    loose = check_files([str(path)], near_threshold=0.85)
    assert sum(map(len, strict.duplicates.near)) < sum(map(len, loose.duplicates.near))
    for row, (_, similarity) in strict.duplicates.near_partner.items():
        assert similarity >= 0.99


def test_verified_similarity_is_the_exact_word_jaccard():
    finder = DuplicateFinder(threshold=0.8)
    texts = ["the quick brown fox jumps over the lazy dog today",
             "The quick brown fox jumps over the lazy cat, today!",
             "an entirely different sentence about something else"]
    for i, text in enumerate(texts):
        finder.add(i, text, text)
    pairs = finder.candidates()
    groups = finder.verify(pairs, {i: word_set(t) for i, t in enumerate(texts)})
    assert groups.near == [[0, 1]]
    assert groups.near_partner[1] == (0, jaccard(word_set(texts[0]), word_set(texts[1])))
    assert groups.near_partner[1][1] == 8 / 10  # 8 shared words of 10; "dog" vs "cat", punctuation ignored


def test_exact_duplicates_ignore_whitespace_and_case_only():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello world!")
    finder = DuplicateFinder()
    for i, text in enumerate(["Hello world", "hello  WORLD", "Hello world!", "hello world"]):
        finder.add(i, text, text)
    groups = finder.verify(finder.candidates(), {0: word_set("Hello world"), 2: word_set("Hello world!")})
    assert groups.exact == [[0, 1, 3]]
    assert groups.near == [[0, 2]]  # punctuation only: a near-duplicate, not an exact one
    assert groups.dropped() == {1: ("exact", 0, None), 3: ("exact", 0, None), 2: ("near", 0, 1.0)}


def test_a_large_bucket_of_alike_rows_still_forms_one_group(monkeypatch):
    """Over WINDOW rows sharing bands are paired with their neighbours only, yet all of them still join up."""
    from tuneforge.data import dedup

    monkeypatch.setattr(dedup, "WINDOW", 8)
    rng = random.Random(3)
    base = sentence(rng, 60)
    texts = []
    for i in range(150):
        words = list(base)
        words[i % 60] = f"change{i}"
        texts.append(" ".join(words))
    finder = DuplicateFinder(threshold=0.9)
    for i, text in enumerate(texts):
        finder.add(i, text, text)
    pairs = finder.candidates()
    assert len(pairs) < 150 * 149 // 2
    groups = finder.verify(pairs, {i: word_set(t) for i, t in enumerate(texts)})
    assert groups.near == [list(range(150))]


def test_candidate_pairs_equal_datasketch_minhash_lsh_with_the_same_bands():
    """Our band index is datasketch's `MinHashLSH` banding, kept in sorted arrays for memory: on the same
    signatures with the same 16 bands of 8 rows it must propose exactly the pairs `MinHashLSH.query` returns
    (before the b-bit pruning, which `MinHashLSH` does not have)."""
    import xxhash
    from datasketch import MinHash, MinHashLSH

    from tuneforge.data import dedup

    rows, _, _ = planted_rows(seed=2, originals=400, planted=80, near_misses=80, siblings=40)
    texts = [r["instruction"] + " " + r["output"] for r in rows]
    finder = DuplicateFinder()
    lsh = MinHashLSH(threshold=0.85, num_perm=dedup.NUM_PERM, params=(dedup.BANDS, dedup.ROWS_PER_BAND))
    signatures = []
    for i, text in enumerate(texts):
        finder.add(i, text, text)
        signature = MinHash(num_perm=dedup.NUM_PERM, hashfunc=xxhash.xxh32_intdigest)
        signature.update_batch([w.encode("utf-8") for w in word_set(text)])
        lsh.insert(i, signature)
        signatures.append(signature)
    theirs = {(min(i, j), max(i, j)) for i, signature in enumerate(signatures) for j in lsh.query(signature) if j != i}
    ours = {tuple(pair) for pair in finder.candidates(prune=False).tolist()}
    assert len(theirs) > 150  # the planted pairs and many of the near misses
    assert ours == theirs


def test_pruning_by_estimate_drops_candidates_but_no_near_duplicate():
    """The b-bit MinHash pruning removes most band collisions of related-but-different rows (near misses, shared
    templates) and changes no verified group: it only drops pairs that verification would have rejected."""
    rows, truth, hard_negatives = planted_rows(seed=3, originals=1500, planted=300, near_misses=300, siblings=300)
    texts = [r["instruction"] + " " + r["output"] for r in rows]
    # Templated rows as real data has them: a long shared instruction with a short answer.
    texts += [f"Classify the sentiment of this product review as positive or negative: {' '.join(sentence(rng, 6))}"
              for rng in [random.Random(4)] for _ in range(400)]
    word_sets = {i: word_set(t) for i, t in enumerate(texts)}
    finder = DuplicateFinder()
    for i, text in enumerate(texts):
        finder.add(i, text, text)
    unpruned, pruned = finder.candidates(prune=False), finder.candidates()
    assert len(pruned) < len(unpruned) / 3
    assert {tuple(p) for p in pruned.tolist()} <= {tuple(p) for p in unpruned.tolist()}
    assert finder.verify(pruned, word_sets) == finder.verify(unpruned, word_sets)
