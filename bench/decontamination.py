"""Decontamination on this machine: the threshold, the speed, and what it adds to a default run.

1. Threshold: hand-written chat requests (no_robots-like), each with a paraphrase (a near duplicate: the
   same request reworded) and a different request on the same topic (not a duplicate). Prints the cosine
   of each kind under the packaged all-MiniLM-L6-v2 and, per candidate threshold, how many paraphrases are
   caught and how many distinct requests are wrongly flagged.
2. Speed: prompts embedded per second (batched), and indexing + querying in the in-memory store and
   Chroma (if installed).
3. The embedded default: decontaminating kitchen/arithmetic, cold (model load + embedding) and cached.

    PYTHONPATH=$PWD KITCHEN_HOME=$PWD/.kitchen python bench/decontamination.py [--rows 5000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

# (request, paraphrase of it, a different request on the same topic)
TRIPLES = [
    (
        "How do I reset my email password?",
        "What are the steps to change my email account's password?",
        "How do I set up a new email account?",
    ),
    (
        "Write a haiku about autumn leaves.",
        "Compose a haiku on the subject of falling autumn leaves.",
        "Write a limerick about a cat who loves autumn.",
    ),
    (
        "Summarize the plot of Romeo and Juliet in three sentences.",
        "Give me a three-sentence summary of the story of Romeo and Juliet.",
        "Who are the main characters in Hamlet?",
    ),
    (
        "What is the capital of Australia?",
        "Which city is Australia's capital?",
        "What is the largest city in Australia?",
    ),
    (
        "Give me a recipe for vegan chocolate chip cookies.",
        "Can you share a vegan recipe for chocolate chip cookies?",
        "How long should I bake oatmeal cookies?",
    ),
    (
        "Explain how photosynthesis works to a ten-year-old.",
        "Describe photosynthesis in a way a 10 year old child would understand.",
        "Explain how the human heart pumps blood.",
    ),
    (
        "Write a short cover letter for a junior data analyst job.",
        "Draft a brief cover letter applying for an entry-level data analyst position.",
        "What questions are asked in a data analyst interview?",
    ),
    (
        "List five tips for improving sleep quality.",
        "Give me 5 ways to sleep better at night.",
        "Why do we dream when we sleep?",
    ),
    (
        "Translate 'good morning, how are you?' into Spanish.",
        "How do you say 'good morning, how are you?' in Spanish?",
        "Translate 'where is the train station?' into French.",
    ),
    (
        "Write a tweet announcing our new coffee shop opening on Main Street.",
        "Compose a tweet to announce that our coffee shop on Main Street is now open.",
        "Write a menu description for a caramel latte.",
    ),
    (
        "What are the health benefits of green tea?",
        "How is drinking green tea good for your health?",
        "How much caffeine is in a cup of black tea?",
    ),
    (
        "Suggest names for a pet goldfish.",
        "Can you come up with some names for my goldfish?",
        "How often should I clean a goldfish tank?",
    ),
    (
        "Write a poem about the ocean at night.",
        "Compose a poem describing the sea at nighttime.",
        "Write a poem about a mountain sunrise.",
    ),
    (
        "Explain the difference between a virus and a bacterium.",
        "How do viruses differ from bacteria?",
        "How do vaccines train the immune system?",
    ),
    (
        "Plan a three-day itinerary for a trip to Rome.",
        "Make me a 3-day travel plan for visiting Rome.",
        "What is the best time of year to visit Paris?",
    ),
    (
        "Rewrite this sentence to sound more formal: 'We gotta fix this bug asap.'",
        "Make this sentence more formal: 'We gotta fix this bug asap.'",
        "Rewrite this sentence to sound more casual: 'Please submit the report by Friday.'",
    ),
    ("What causes the seasons on Earth?", "Why does Earth have seasons?", "What causes ocean tides?"),
    (
        "Write a birthday message for my grandmother turning 90.",
        "Compose a 90th birthday greeting for my grandma.",
        "Write a retirement card message for a coworker.",
    ),
    (
        "Give me a workout plan for building upper body strength.",
        "Suggest an exercise routine to get a stronger upper body.",
        "How many calories does running burn?",
    ),
    (
        "Explain what a blockchain is in simple terms.",
        "In plain language, what is a blockchain?",
        "How do I buy shares of a company?",
    ),
    (
        "Write a product description for noise-cancelling headphones.",
        "Create a product blurb for a pair of noise cancelling headphones.",
        "Compare wired and wireless earbuds.",
    ),
    (
        "How do I make my tomato plants produce more fruit?",
        "What can I do to get more tomatoes from my tomato plants?",
        "How do I get rid of aphids on roses?",
    ),
    (
        "Tell me a joke about programmers.",
        "Do you know a funny joke about software developers?",
        "Tell me a riddle about time.",
    ),
    (
        "What should I pack for a week-long camping trip?",
        "Make a packing list for camping for seven days.",
        "How do I start a campfire safely?",
    ),
]


def threshold_table(embedder) -> float:
    requests = [t[0] for t in TRIPLES]
    para = embedder.embed([t[1] for t in TRIPLES])
    other = embedder.embed([t[2] for t in TRIPLES])
    base = embedder.embed(requests)
    same = np.sum(base * para, axis=1)
    # A distinct request is compared with every request, as a held-out row is with every training row.
    distinct = (other @ base.T).max(axis=1)
    print(f"paraphrases: cosine min {same.min():.3f} median {np.median(same):.3f} max {same.max():.3f}")
    print(
        f"distinct   : nearest min {distinct.min():.3f} median {np.median(distinct):.3f} "
        f"max {distinct.max():.3f}"
    )
    print("threshold  paraphrases caught  distinct flagged")
    best, best_score = 0.0, -1.0
    for threshold in np.arange(0.60, 0.96, 0.05):
        caught = int((same >= threshold).sum())
        wrong = int((distinct >= threshold).sum())
        print(f"  {threshold:.2f}     {caught:2d}/{len(same)}               {wrong:2d}/{len(distinct)}")
        if wrong == 0 and caught > best_score:
            best, best_score = float(threshold), caught
    print(f"highest recall with no distinct request flagged: {best:.2f}")
    return best


def speed(embedder, rows: int) -> None:
    from kitchen.data.decontaminate import cached_embeddings
    from resources.vector_store import ChromaVectorStore, InMemoryVectorStore

    rng = np.random.default_rng(0)
    words = [t for triple in TRIPLES for text in triple for t in text.split()]
    texts = [" ".join(rng.choice(words, size=12)) for _ in range(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        vectors, _ = cached_embeddings(embedder, texts, cache_dir=Path(tmp))
        seconds = time.perf_counter() - started
        print(f"embedding: {rows} prompts in {seconds:.1f} s = {rows / seconds:.0f} rows/s")
        started = time.perf_counter()
        cached_embeddings(embedder, texts, cache_dir=Path(tmp))
        print(f"embedding again (cached): {time.perf_counter() - started:.3f} s")
        stores = {"in-memory": InMemoryVectorStore()}
        try:
            import chromadb  # noqa: F401

            stores["chroma"] = ChromaVectorStore(path=str(Path(tmp) / "chroma"))
        except ImportError:
            print("chroma: not installed")
        half = rows // 2
        for name, store in stores.items():
            started = time.perf_counter()
            store.add("bench-train", [str(i) for i in range(half)], vectors[:half], texts[:half])
            indexed = time.perf_counter() - started
            started = time.perf_counter()
            store.query("bench-train", vectors[half:], k=1)
            queried = time.perf_counter() - started
            print(
                f"{name}: index {half} in {indexed:.2f} s ({half / indexed:.0f}/s), "
                f"query {rows - half} in {queried:.2f} s ({(rows - half) / queried:.0f}/s)"
            )


def arithmetic(threshold: float) -> None:
    from kitchen.data.decontaminate import decontaminate
    from kitchen.workflows.config import DatasetSection
    from resources.embeddings import SentenceTransformerEmbeddings
    from resources.vector_store import InMemoryVectorStore

    loaded = DatasetSection().load()
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold (model load + embedding)", "cached"):
            started = time.perf_counter()
            _, report = decontaminate(
                loaded,
                SentenceTransformerEmbeddings(),
                InMemoryVectorStore(),
                threshold=threshold,
                cache_dir=Path(tmp),
            )
            print(
                f"kitchen/arithmetic {label}: {time.perf_counter() - started:.1f} s; "
                f"{report.flagged}/{report.test_rows} held-out rows at cosine >= {threshold}; "
                f"top pair {report.pairs[:1]}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    from resources.embeddings import SentenceTransformerEmbeddings

    embedder = SentenceTransformerEmbeddings()
    started = time.perf_counter()
    embedder.embed(["warm up"])
    print(f"model load: {time.perf_counter() - started:.1f} s")
    threshold = threshold_table(embedder)
    speed(embedder, args.rows)
    arithmetic(threshold)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
