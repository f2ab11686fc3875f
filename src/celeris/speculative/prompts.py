"""Prompts for local distillation and for evaluation, built offline.

Training prompts: instructions written from the standard library's docstrings (the function's name
and the first line of its documentation, under a few instruction templates) plus hand-written
everyday prompts (a list, topic × task combinations and small coding tasks). Validation prompts are
disjoint: docstring prompts of functions whose name hashes to the `test` split (never used for
training) and a hand-written validation set. The benchmark prompts (`EVAL_PROMPTS`) are a third,
disjoint set, used neither for training nor for choosing the checkpoint.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

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

VALIDATION_PROMPTS = (  # for the drafter's validation and early stopping; not benchmark prompts
    "Write a Python function that checks whether a year is a leap year.",
    "Explain how a compass works.",
    "Write a short story about a child who befriends a stray dog.",
    "List seven things to bring to a picnic.",
    "Write a JavaScript function that returns the largest number in an array.",
    "Explain why we have seasons.",
    "Write a short note congratulating a colleague on a promotion.",
    "Give me a list of six vegetables that grow well in pots.",
    "Write a Python function that converts a string to title case without using str.title.",
    "Explain what an echo is.",
    "Write a short poem about snow falling at night.",
    "List the main steps of planting a tree.",
)

EVAL_PROMPTS = (  # benchmark prompts, never used for training or validation: coding, explanation, writing, lists
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


TOPICS = (  # everyday subjects; none is the subject of an evaluation prompt
    "volcanoes", "honey bees", "the printing press", "electric cars", "black holes", "coffee", "the Roman empire",
    "earthquakes", "penguins", "solar panels", "the internet", "chess", "the human heart", "tides", "recycling",
    "the violin", "deserts", "spiders", "airplanes", "tea ceremonies", "glaciers", "the Olympic games", "bridges",
    "mushrooms", "the immune system", "trains", "coral reefs", "owls", "the microscope", "public libraries",
    "thunderstorms", "compost", "the piano", "rivers", "wolves", "satellites", "bamboo", "museums", "sourdough",
    "friendship",
)

MORE_TOPICS = (  # a second, wider set of subjects for the extended task list; none is an evaluation subject
    "elephants", "the ancient Egyptians", "wind turbines", "cheese", "lightning", "dolphins", "the metric system",
    "hot air balloons", "kites", "the Great Wall of China", "jellyfish", "volunteering", "yoga", "submarines",
    "rainforests", "the telephone", "clocks", "rice", "octopuses", "the Arctic", "dinosaurs", "board games",
    "gardening", "the postal service", "maps", "bicycles", "the Wright brothers", "sharks", "wool", "pottery",
    "origami", "caves", "butterflies", "the Amazon river", "ice cream", "camels", "canals",
    "public transport", "the calendar", "crystals", "hedgehogs", "paper", "the theatre", "football", "salt",
    "windmills", "frogs", "the human brain", "earth's atmosphere", "magnets", "sundials",
    "the ukulele", "castles", "hurricanes", "olive oil", "beavers", "the first computers", "tulips",
    "marathons", "the Sahara", "chocolate", "electric guitars", "cloud computing", "the periodic table",
    "kangaroos", "sleep", "mountains", "the Renaissance", "robots", "ants", "the stock exchange",
    "street food", "space stations", "honey", "nuclear energy", "train journeys", "lakes", "parrots",
    "handwriting", "the Vikings",
)

MORE_TOPIC_TASKS = (
    "Explain how {topic} work, step by step.",
    "List six things most people do not know about {topic}.",
    "Write a friendly letter to a pen pal about {topic}.",
    "Describe {topic} to someone who has never heard of them.",
    "Write a short poem about {topic} in four lines.",
    "Give me a list of questions a child might ask about {topic}, with short answers.",
    "Why are {topic} important? Answer in a short paragraph.",
    "Write a short story for children about {topic}.",
)

TOPIC_TASKS = (
    "Explain {topic} in simple terms.",
    "Write a short poem about {topic}.",
    "Give me a list of five interesting facts about {topic}.",
    "Write a short story in which {topic} play an important part.",
    "Write a short blog post introduction about {topic}.",
)

CODING_TASKS = (
    "removes duplicates from a list while keeping the order", "computes the greatest common divisor of two numbers",
    "checks whether a number is a perfect square", "converts a temperature from Celsius to Fahrenheit",
    "finds the longest word in a sentence", "flattens a nested list", "counts the vowels in a string",
    "returns the n-th Fibonacci number", "reverses the words of a sentence", "checks whether two strings are anagrams",
    "computes the average of a list of numbers", "finds the second largest number in a list",
    "capitalises the first letter of every word", "converts a binary string to an integer",
    "groups a list of words by their first letter", "validates a simple email address",
    "rotates a list by k positions", "computes the factorial of n iteratively", "transposes a matrix",
    "finds the most common element in a list", "sums the digits of an integer", "checks for balanced parentheses",
    "splits a list into chunks of size n", "converts a Roman numeral to an integer", "computes a running total",
    "checks whether a list is sorted", "counts how often each character appears in a string",
    "returns the minimum and maximum of a list", "removes the whitespace at both ends of every string in a list",
    "converts minutes into hours and minutes", "checks whether a number is even", "merges two dictionaries",
    "finds all indices of a value in a list", "computes the median of a list", "generates a random password",
    "converts a list of strings to upper case", "returns the last n elements of a list",
    "computes compound interest", "checks whether a string contains only digits", "computes the area of a circle",
    "finds the intersection of two lists", "counts the lines in a string", "replaces every vowel with a star",
    "returns the sum of the even numbers in a list", "computes the power set of a small list",
)

CODING_LANGUAGES = ("Python", "JavaScript")

NEW_TOPICS = (  # a third set of subjects, added with EXTRA_TOPIC_TASKS; none is an evaluation or validation subject
    "giraffes", "sailing ships", "photography", "tigers", "wildfires", "the Silk Road", "skateboarding", "whales",
    "bats", "glass", "fireworks", "snails", "the Northern Lights", "ancient Greece", "typewriters", "eagles", "apples",
    "potatoes", "cotton", "mirrors", "soap", "umbrellas", "volleyball", "jazz", "sculpture", "ballet", "knitting",
    "camping", "fishing", "birdwatching", "astronauts", "telescopes", "comets", "asteroids", "the Pacific Ocean",
    "islands", "waterfalls", "wetlands", "foxes", "rabbits", "horses", "goats", "the Industrial Revolution",
    "steam engines", "the Titanic", "cartoons", "video games", "podcasts", "newspapers", "radio", "batteries",
    "3D printing", "drones", "elevators", "traffic lights", "passports", "bees' wax candles", "lanterns",
    "the Andes", "tortoises",
)

EXTRA_TOPIC_TASKS = (
    "Give me a list of seven words that describe {topic}, with one sentence about each.",
    "Write a short, friendly email recommending a book about {topic} to a friend.",
    "List five common mistakes people make when they first learn about {topic}.",
    "Write a short news report about a surprising discovery involving {topic}.",
    "Write a four-line rhyming poem about {topic} for a child.",
    "What are three surprising facts about {topic}? Explain each briefly.",
    "Write a short dialogue between two friends talking about {topic}.",
    "Explain the history of {topic} in a few sentences.",
)

CODING_FORMS = (
    "Write a {lang} function that {task}, and show how to call it.",
    "How can I write a Python program that {task}? Explain the code.",
)

VALIDATION_TOPICS = ("zebras", "the Eiffel Tower", "lemons", "sand dunes")  # everyday validation subjects only


def everyday_prompts() -> list[str]:
    """Hand-written prompts, topic × task prompts and coding tasks: all disjoint from `EVAL_PROMPTS`."""
    out = list(TRAIN_PROMPTS)
    out += [task.format(topic=t) for t in TOPICS for task in TOPIC_TASKS]
    out += [f"Write a {lang} function that {task}." for task in CODING_TASKS for lang in CODING_LANGUAGES]
    out += [task.format(topic=t) for t in MORE_TOPICS for task in MORE_TOPIC_TASKS]
    return out


def wider_prompts() -> list[str]:
    """More everyday prompts: every topic set crossed with the task lists it was not crossed with above,
    the extra tasks over all topics, and the coding tasks under other phrasings. Disjoint from
    `everyday_prompts()`, from the validation prompts and from `EVAL_PROMPTS`."""
    out = [task.format(topic=t) for t in TOPICS for task in MORE_TOPIC_TASKS]
    out += [task.format(topic=t) for t in MORE_TOPICS for task in TOPIC_TASKS]
    out += [task.format(topic=t) for t in TOPICS + MORE_TOPICS + NEW_TOPICS for task in EXTRA_TOPIC_TASKS]
    out += [task.format(topic=t) for t in NEW_TOPICS for task in TOPIC_TASKS + MORE_TOPIC_TASKS]
    out += [form.format(lang=lang, task=task) for task in CODING_TASKS for form in CODING_FORMS
            for lang in (CODING_LANGUAGES if "{lang}" in form else ("Python",))]
    return list(dict.fromkeys(out))


@functools.cache  # also makes the warning once per module and process
def _stdlib_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        warnings.warn(f"stdlib module {name} does not import here ({e}); the drafter's docstring prompts leave it "
                      "out, so they differ from a machine where it imports", stacklevel=2)
        return None


def missing_stdlib_modules() -> list[str]:
    """The `STDLIB_MODULES` that do not import on this machine (their docstring prompts are left out)."""
    return [m for m in STDLIB_MODULES if _stdlib_module(m) is None]


def docstring_prompts(split: str, templates_per_name: int = 1) -> list[str]:
    """Instructions from stdlib docstrings whose qualified name falls in `split` (train|validation|test).

    Each name gets `templates_per_name` of the instruction templates (chosen by a hash of the name).
    """
    out = []
    for mod_name in STDLIB_MODULES:
        mod = _stdlib_module(mod_name)
        if mod is None:
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
            first = int.from_bytes(name.encode(), "little") % len(TEMPLATES)
            for k in range(min(templates_per_name, len(TEMPLATES))):
                out.append(TEMPLATES[(first + k) % len(TEMPLATES)].format(name=name, doc=doc))
    return out


def training_prompts(limit: int | None = None, seed: int = 0) -> list[str]:
    """Everyday prompts, docstring instructions of the `train` split (two templates per name), then the
    wider everyday prompts (last, so the distillation shards of a run made before they existed are reused).

    With `limit`, everyday prompts come first (up to `limit`) and the rest is a seeded random sample of
    the docstring prompts, so a small run still covers every kind of request.
    """
    import random

    every, docs, wider = everyday_prompts(), docstring_prompts("train", templates_per_name=2), wider_prompts()
    if limit is None:
        return every + docs + wider
    rng = random.Random(seed)
    every = every + wider
    return every[:limit] + rng.sample(docs, min(len(docs), max(0, limit - len(every))))


def evaluation_prompts() -> list[str]:
    """Validation prompts: the hand-written validation set + docstring instructions of the `test` split.

    Disjoint from the training prompts and from `EVAL_PROMPTS`, which the benchmark and the demo use, so
    the checkpoint chosen on validation is not chosen on the benchmark's prompts."""
    everyday = [task.format(topic=t) for t in VALIDATION_TOPICS for task in TOPIC_TASKS + EXTRA_TOPIC_TASKS[:1]]
    return list(VALIDATION_PROMPTS) + everyday + docstring_prompts("test")
