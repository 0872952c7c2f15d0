"""dualbrain: export, compile and run the Qwen3.5 / Qwen3.6 hybrid model family."""
__version__ = "0.1.0"
