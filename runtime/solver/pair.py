"""Two exports as a pair: the large model and the small one must mean the same thing by every id.

Compared by the tokenizers' content -- vocabulary, merges and added tokens (`Tokenizer.fingerprint`) --
not by file hashes: Qwen3.6's chat template differs from Qwen3.5's while the vocabulary is the same.
The check runs before anything else loads or runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from dualbrain.errors import DualbrainError
from dualbrain.runtime.manifest import load_manifest


def check_pair(large_dir: str | os.PathLike, small_dir: str | os.PathLike) -> None:
    """Refuse (DualbrainError) a pair whose tokenizers or vocabulary sizes differ."""
    from dualbrain.runtime.chat import Tokenizer

    large_dir, small_dir = Path(large_dir), Path(small_dir)
    big, small = load_manifest(large_dir), load_manifest(small_dir)
    if big.model.vocab_size != small.model.vocab_size:
        raise DualbrainError(f"the models do not share a vocabulary: {large_dir} has {big.model.vocab_size} token "
                             f"ids, {small_dir} has {small.model.vocab_size}")
    has = (bool(big.tokenizer_files), bool(small.tokenizer_files))
    if has == (False, False):
        return                   # id-only exports of the same vocabulary size: nothing more to compare
    if has != (True, True):
        lacking = small_dir if has[0] else large_dir
        raise DualbrainError(f"cannot check the pair's tokenizers: {lacking} has no tokenizer")
    a, b = Tokenizer.from_dir(large_dir), Tokenizer.from_dir(small_dir)
    diff = a.difference(b)
    if diff:
        raise DualbrainError(f"the models' tokenizers differ ({diff}): {large_dir} and {small_dir} cannot be paired")
