"""Synthetic corpora and MELD-like data for `clap demo` and the tests; not part of the library."""
