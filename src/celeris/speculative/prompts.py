"""Prompts for local distillation and for evaluation, built offline.

Training prompts: instructions written from the standard library's docstrings (the function's name
and the first line of its documentation, under a few instruction templates) plus a hand-written
set of everyday prompts. Evaluation prompts are disjoint: docstring prompts come from functions whose
name hashes to the `test` split (never used for training), and the hand-written evaluation set
shares no prompt with the training set.
"""

from __future__ import annotations

import importlib
import inspect

from celeris.corpora import split_of

STDLIB_MODULES = (
    "json", "os.path", "re", "textwrap", "itertools", "functools", "collections", "string", "math", "statistics",
    "random", "datetime", "pathlib", "shutil", "csv", "heapq", "bisect", "difflib", "fnmatch", "glob", "base64",
    "hashlib", "urllib.parse", "uuid", "zipfile", "gzip", "copy", "operator", "secrets", "calendar", "html",
    "tempfile", "time", "fractions", "decimal", "contextlib", "shlex", "pprint", "struct", "queue", "logging",
    "subprocess", "threading", "sqlite3", "unicodedata", "zlib", "io", "tarfile", "configparser", "email.utils",
)

TEMPLATES = (
    "Explain what the Python function `{name}` does. Its documentation says: \"{doc}\"",
    "Write a short Python example that uses `{name}` and explain the output.",
    "List three situations where `{name}` from the Python standard library is useful.",
    "In simple words, what does `{name}` do? ({doc})",
    "Write a Python function that uses `{name}` to solve a small practical task.",
)

TRAIN_PROMPTS = (
    "Write a short poem about the sea at night.",
    "Give me five tips for sleeping better.",
    "What is photosynthesis? Explain it to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List the planets of the solar system in order from the sun.",
    "Write a polite email asking my landlord to fix the heating.",
    "Explain the difference between a list and a tuple in Python.",
    "What are the main causes of climate change?",
    "Write a haiku about autumn leaves.",
    "How do I make a simple tomato pasta sauce?",
    "Give me a list of ten healthy snacks.",
    "Explain how a bicycle stays upright.",
    "Write a JavaScript function that reverses an array.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a short story about a robot who learns to paint.",
    "Explain what a binary search is and when to use it.",
    "List five ways to save money on groceries.",
    "What is the difference between weather and climate?",
    "Write a SQL query that counts the orders per customer.",
    "How does a refrigerator keep food cold?",
    "Write a motivational message for someone starting a new job.",
    "Explain recursion with a simple example.",
    "Give me a packing list for a weekend camping trip.",
    "What are the benefits of regular exercise?",
    "Write a Python class representing a bank account with deposit and withdraw methods.",
    "Explain why leaves change color in the fall.",
    "Write a thank-you note to a teacher.",
    "List the steps to change a flat tire.",
    "What is machine learning? Answer in a short paragraph.",
    "Write a limerick about a cat who loves cheese.",
    "How do vaccines work?",
    "Write a bash command that finds all .txt files in a directory.",
    "Describe the water cycle.",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Explain what an API is to a non-technical person.",
    "Write a product description for a reusable water bottle.",
    "What should I consider when buying a used car?",
    "Write a Python script that reads a CSV file and prints the average of a column.",
    "Explain how the stock market works in simple terms.",
    "List some good habits for learning a new language.",
    "Write a short speech for a friend's wedding.",
    "What is the Pythagorean theorem? Give an example.",
    "Explain the difference between HTTP and HTTPS.",
    "Write a recipe for chocolate chip cookies.",
    "Give me a weekly workout plan for beginners.",
    "Why is the ocean salty?",
    "Write a function in C that computes the factorial of a number.",
    "Explain what inflation is and why it matters.",
    "List the pros and cons of working from home.",
)

EVAL_PROMPTS = (  # held out: coding, explanation, writing, lists
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List six things to do on a rainy day.",
    "Write a Python function that counts the words in a text file.",
    "Explain what DNA is and what it does.",
    "Write a friendly letter inviting a neighbour to a garden party.",
    "Give me a list of eight fruits that are high in vitamin C.",
    "Write a Python function that returns the prime numbers below n.",
    "Explain why the moon has phases.",
    "Write a short poem about a city waking up in the morning.",
    "List the main steps of making bread at home.",
)


def docstring_prompts(split: str) -> list[str]:
    """Instructions from stdlib docstrings whose qualified name falls in `split` (train|validation|test)."""
    out = []
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").strip().split("\n")[0].strip()
            if len(doc) < 12 or len(doc) > 200:
                continue
            name = f"{mod_name}.{attr}"
            if split_of(name) != split:
                continue
            template = TEMPLATES[int.from_bytes(name.encode(), "little") % len(TEMPLATES)]
            out.append(template.format(name=name, doc=doc))
    return out


def training_prompts() -> list[str]:
    """Hand-written everyday prompts + docstring instructions of the `train` split."""
    return list(TRAIN_PROMPTS) + docstring_prompts("train")


def evaluation_prompts() -> list[str]:
    """Held-out prompts: the hand-written evaluation set + docstring instructions of the `test` split."""
    return list(EVAL_PROMPTS) + docstring_prompts("test")
