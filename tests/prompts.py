"""Varied prompts for lossless checks on real models (chat, code, maths, grounded copying...)."""
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarise this: The city council met on Tuesday to discuss the new park. Residents asked for "
    "more trees, a playground and longer opening hours. The council agreed to plant 40 trees.",
    "Translate to French: The weather is nice today and I want to go for a walk.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h? Think step by step.",
    "List five colours of the rainbow.",
    "Rewrite this code with better names:\ndef f(a, b):\n    c = a + b\n    return c * c\n",
    "Tell me a short story about a robot who learns to paint.",
    "Extract the names from: Alice met Bob and Carol at the station, then they called Dave.",
    "Explain what a hash table is to a ten-year-old.",
    "def quicksort(xs):\n",
    "Q: Why is the sky blue?\nA:",
]
